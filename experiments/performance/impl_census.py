"""Which oneDNN implementation each convolution call of a network's programs gets.

  python experiments/performance/impl_census.py --models=fcn8s,pspnet [--batch=4 --size=256]
      [--preset=bench] [--all]

Lowers the training step (batch ``--batch``) and the inference forward (batch 1) of each
network, records every oneDNN call (``conv._call``: kind, geometry and cut) and asks oneDNN
which implementation it picks (``native.onednn_impl``). Prints the calls that get its GEMM
or reference code (``--all``: every call). Nothing is run: lowering only.
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
  a = p.parse_args()
  import jax
  import checks
  from jseg import native, parallel, trainer
  from jseg.models import conv

  seen: list[tuple] = []
  call = conv._call

  def spy(target, kind, out_shape, x_shape, k_shape, y_shape, strides, dilation, padding,
          groups, *args, **kw):
    seen.append((kind, tuple(x_shape), tuple(k_shape), tuple(y_shape), tuple(strides),
                 tuple(dilation), tuple(tuple(q) for q in padding), int(groups)))
    return call(target, kind, out_shape, x_shape, k_shape, y_shape, strides, dilation, padding,
                groups, *args, **kw)

  conv._call = spy
  for model in a.models.split(","):
    for mode, batch in (("train", a.batch), ("infer", 1)):
      seen.clear()
      run, host_batch = checks._setup(model, batch, a.size, preset=a.preset)
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


if __name__ == "__main__":
  main()
