"""Each dilated depthwise convolution of a bench model: oneDNN's grouped convolution vs XLA's
shifted products (``layers.depthwise_shifted``), per layer, in time and in kept memory.

  python experiments/performance/dw_geoms.py --models=fastfcn,deeplabv3plus [--batch=4 --size=256]

The geometries are collected by tracing each model's training step at the bench preset
(every call of ``layers.onednn_depthwise_without_gemm``). Per geometry: oneDNN's
implementation names (forward, input gradient, kernel gradient), the median ms of forward
+ both gradients on each path, and XLA's temporaries (``memory_analysis``) of a jitted
function that runs the forward, keeps what the backward needs and runs the backward (the
memory one layer adds to a training step), and which path jseg takes now.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="fastfcn,deeplabv3plus")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=10)
  a = p.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jseg import parallel, trainer
  from jseg.bench.models import bench_config
  from jseg.models import layers
  from jseg.native import onednn_impl
  from timing import median_ms

  routed = layers.onednn_depthwise_without_gemm
  for model in a.models.split(","):
    seen: dict[tuple, int] = {}

    def record(x_shape, k, s, d, pad, _seen=seen):
      key = (tuple(x_shape), k, s, d, pad)
      _seen[key] = _seen.get(key, 0) + 1
      return routed(*key)

    layers.onednn_depthwise_without_gemm = record
    run = trainer.setup(bench_config(model, a.size, a.batch))
    host = {"image": np.zeros((a.batch, a.size, a.size, 3), np.float32),
            "label": np.zeros((a.batch, a.size, a.size), np.int32)}
    b = parallel.shard_batch(host, run.mesh)
    jax.eval_shape(run.step_fn, run.state, b, run.step_rng)
    layers.onednn_depthwise_without_gemm = routed
    print(f"== {model} (bench preset, batch {a.batch}, {a.size}^2): {len(seen)} geometries", flush=True)
    for (shape, k, s, d, pad), count in sorted(seen.items(), key=lambda kv: -kv[0][3]):
      if d == 1:
        continue
      c = shape[-1]
      x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
      m = layers.DepthwiseConv(k, s, d)
      v = m.init(jax.random.key(0), x)
      g = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
      row = []
      for mode in ("onednn", "xla"):
        layers.onednn_depthwise_without_gemm = (lambda *args, m=mode: m == "onednn")

        def fwd_bwd(v, x, g):
          y, vjp = jax.vjp(lambda v, x: m.apply(v, x), v, x)
          return vjp(g)

        f = jax.jit(fwd_bwd)
        temp = f.lower(v, x, g).compile().memory_analysis().temp_size_in_bytes / 2**20
        row.append(f"{mode} {median_ms(f, v, x, g, n=a.repeats):6.2f} ms {temp:5.1f} MB")
      layers.onednn_depthwise_without_gemm = routed
      oh = (shape[1] + 2 * pad - d * (k - 1) - 1) // s + 1
      ow = (shape[2] + 2 * pad - d * (k - 1) - 1) // s + 1
      impl = [onednn_impl(kind, shape, (k, k, 1, c), (shape[0], oh, ow, c), (s, s), (d, d),
                          ((pad, pad), (pad, pad)), c) for kind in "fdw"]
      now = "oneDNN" if routed(shape, k, s, d, pad) else "XLA"
      print(f"{'x'.join(map(str, shape))} k{k} s{s} d{d} (x{count}): " + " | ".join(row)
            + f" | oneDNN f/d/w: {', '.join(impl)} | jseg uses {now}", flush=True)


if __name__ == "__main__":
  main()
