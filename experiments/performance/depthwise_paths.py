"""Depthwise 3x3 convolution: oneDNN grouped convolution vs XLA shifted products, per geometry.

  python experiments/performance/depthwise_paths.py [--batch=8]

Forward + both gradients (input and kernel), median ms, for DeepLab v3+'s geometries
(Xception at output stride 16 with batch 8 at 256^2, ASPP rates 6/12/18), plus oneDNN's
implementation names (``jit_dw`` is its depthwise kernel; ``gemm`` its fallback).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=10)
  a = p.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jseg.models import layers
  from jseg.native import onednn_impl
  from timing import median_ms

  geoms = [(128, 16, 1, 1), (128, 16, 1, 2), (64, 32, 1, 1), (32, 64, 1, 1), (16, 128, 1, 1),
           (16, 256, 2, 1), (16, 256, 6, 1), (16, 256, 12, 1), (16, 256, 18, 1)]
  for hw, c, d, s in geoms:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((a.batch, hw, hw, c)), jnp.float32)
    m = layers.DepthwiseConv(3, s, d)
    v = m.init(jax.random.key(0), x)
    row = []
    outs = {}
    routed = layers.onednn_depthwise_without_gemm
    for mode in ("onednn", "xla"):
      os.environ["JSEG_CONV"] = mode  # read at trace time
      # "onednn": the grouped convolution for every geometry (jseg routes dilated ones to XLA).
      layers.onednn_depthwise_without_gemm = (lambda *args: True) if mode == "onednn" else routed
      f = jax.jit(jax.value_and_grad(lambda v, x: jnp.sum(m.apply(v, x) ** 2), argnums=(0, 1)))
      outs[mode] = f(v, x)
      row.append(f"{mode} {median_ms(f, v, x, n=a.repeats):7.2f} ms")
    os.environ.pop("JSEG_CONV")
    layers.onednn_depthwise_without_gemm = routed
    gx = [np.asarray(o[1][1]) for o in outs.values()]
    err = float(np.abs(gx[0] - gx[1]).max() / np.abs(gx[1]).max())
    pad = d
    oh = (hw + 2 * pad - 2 * d - 1) // s + 1
    impl = [onednn_impl(k, x.shape, (3, 3, 1, c), (a.batch, oh, oh, c), (s, s), (d, d),
                        ((pad, pad), (pad, pad)), c) for k in "fdw"]
    print(f"{a.batch}x{hw}x{hw}x{c} d{d} s{s}: " + " | ".join(row) +
          f" | dx rel diff {err:.1e} | oneDNN f/d/w: {', '.join(impl)}"
          f" | jseg uses {'oneDNN' if routed(tuple(x.shape), 3, s, d, pad) else 'XLA'}", flush=True)


if __name__ == "__main__":
  main()
