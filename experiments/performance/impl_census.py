"""Which oneDNN implementation each convolution call of a network's programs gets.

  python experiments/performance/impl_census.py --models=fcn8s,pspnet [--batch=4 --size=256]
      [--preset=bench] [--all] [--time [--below=0.3]]

Lowers the training step (batch ``--batch``) and the inference forward (batch 1) of each
network, records every oneDNN call (``conv._call``: kind, geometry and cut) and asks oneDNN
which implementation it picks (``native.onednn_impl``). Prints the calls that get its GEMM
or reference code (``--all``: every call). Nothing is run: lowering only, unless ``--time``:
then each geometry's call is also run alone on random operands (median of 5 after one
warm-up) and the calls below ``--below`` of the machine's convolution peak
(``jseg.bench``'s probe, measured first) and above 0.05 GFLOP are printed with their
GFLOP/s, heaviest first: where a network's convolutions lose time to their geometry.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="fcn8s")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--preset", default="bench")
  p.add_argument("--all", action="store_true")
  p.add_argument("--time", action="store_true")
  p.add_argument("--below", type=float, default=0.3)
  a = p.parse_args()
  import jax
  import checks
  from jseg import native, parallel, trainer
  from jseg.models import conv

  seen: list[tuple] = []
  calls: dict[tuple, tuple] = {}
  call = conv._call

  def spy(target, kind, out_shape, x_shape, k_shape, y_shape, strides, dilation, padding,
          groups, *args, **kw):
    geom = (kind, tuple(x_shape), tuple(k_shape), tuple(y_shape), tuple(strides),
            tuple(dilation), tuple(tuple(q) for q in padding), int(groups))
    seen.append(geom)
    calls[geom] = (target, tuple(out_shape), [(v.shape, v.dtype) for v in args],
                   kw.get("relu"))
    return call(target, kind, out_shape, x_shape, k_shape, y_shape, strides, dilation, padding,
                groups, *args, **kw)

  conv._call = spy
  peak = None
  if a.time:
    from jseg.bench import models as bench_models
    peak = bench_models.measure_peak_conv()
  for model in a.models.split(","):
    for mode, batch in (("train", a.batch), ("infer", 1)):
      run, host_batch = checks._setup(model, batch, a.size, preset=a.preset)
      seen.clear()  # not the calls of the setup's own programs (initialisation)
      if mode == "train":
        run.step_fn.lower(run.state, parallel.shard_batch(host_batch(), run.mesh), run.step_rng)
      else:
        v = trainer.variables(run.state.params, run.state.batch_stats)
        jax.jit(lambda v, x: run.model.apply(v, x, train=False)[0]).lower(v, host_batch()["image"])
      counts = collections.Counter(seen)
      slow = 0
      for geom, n in counts.items():
        split, chunks = conv.conv_split(geom[0], geom[1], geom[3], geom[2])
        try:
          name = native.onednn_impl(*geom, split, chunks)
        except native.NativeBuildError:
          name = native.onednn_impl(*geom, 0, 1) + " (whole)"
        bad = "gemm" in name or name.startswith("ref")
        slow += bad
        if bad or a.all:
          print(f"  {model} {mode} x{n} {geom[0]} x{geom[1]} k{geom[2]} s{geom[4]} d{geom[5]} "
                f"p{geom[6]} g{geom[7]} cut({split},{chunks}): {name}", flush=True)
      print(f"{model} {mode}: {len(counts)} geometries, {len(seen)} calls, {slow} on GEMM/ref",
            flush=True)
      if a.time:
        _time_calls(call, calls, counts, peak, a.below, f"{model} {mode}")


def _flops(geom) -> float:
  kind, xs, ks, ys, *_ , groups = geom
  del kind, xs, groups  # HWIO kernel: its input channels already per group
  return 2.0 * ys[0] * ys[1] * ys[2] * ys[3] * ks[0] * ks[1] * ks[2]


def _time_calls(call, calls, counts, peak, below, label) -> None:
  import time
  import jax
  import jax.numpy as jnp
  import numpy as np
  rows = []
  for geom, n in counts.items():
    target, out_shape, operands, relu = calls[geom]
    kind, xs, ks, ys, strides, dilation, padding, groups = geom
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.standard_normal(shape).astype(dtype)) for shape, dtype in operands]
    kw = {} if relu is None else {"relu": relu}
    f = jax.jit(lambda *v: call(target, kind, out_shape, xs, ks, ys, strides, dilation,
                                padding, groups, *v, **kw))
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      ts.append(time.perf_counter() - t0)
    ms = float(np.median(ts)) * 1e3
    gf = _flops(geom) / 1e9
    rows.append((ms * n, ms, gf / (ms / 1e3), gf, n, geom))
  total = sum(r[0] for r in rows)
  print(f"{label}: the calls alone {total:.1f} ms (peak {peak:.0f} GFLOP/s)", flush=True)
  for tot, ms, rate, gf, n, geom in sorted(rows, reverse=True):
    if gf >= 0.05 and rate < below * peak:
      kind, xs, ks, ys, strides, dilation, padding, groups = geom
      print(f"  {kind} x{xs} k{ks} s{strides} d{dilation} p{padding} g{groups} (x{n}): "
            f"{ms:.2f} ms, {gf:.3f} GFLOP, {rate:.0f} GFLOP/s ({rate / peak:.0%})", flush=True)


if __name__ == "__main__":
  main()
