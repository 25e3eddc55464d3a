"""Depthwise convolutions: the native kernel gradient and where each form is faster.

  python experiments/performance/dw_native_grad.py            # AVX-512 here
  ONEDNN_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 python experiments/performance/dw_native_grad.py

Three tables (medians of jitted calls, 2 threads; nineteenth pass of the README):
1. the kernel gradient alone: XLA's per-tap sums (``layers._shifted_kernel_grad``, with its
   kernel count) vs ``layers.depthwise_kernel_grad_native``, each one's max error against
   float64 sums;
2. forward + both gradients: oneDNN's grouped convolution vs ``depthwise_shifted`` (whose
   kernel gradient is the native call), with where jseg routes the geometry now;
3. the forward alone at batch 1: oneDNN's grouped convolution vs the shifted products, with
   oneDNN's implementation names (forward, input gradient, kernel gradient).
"""
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_ms  # noqa: E402

from jseg.models import conv, layers  # noqa: E402


def _rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def kernel_grads() -> None:
  for n, hw, c, d in [(4, 16, 128, 2), (4, 16, 192, 2), (4, 16, 256, 6), (4, 16, 256, 12),
                      (4, 16, 256, 18), (2, 33, 20, 3), (1, 5, 7, 1), (4, 32, 192, 4),
                      (4, 64, 384, 8)]:
    x, g = _rand((n, hw, hw, c)), _rand((n, hw, hw, c), 1)
    fx = jax.jit(lambda x, g, d=d: layers._shifted_kernel_grad(layers._same_pad(x, d), g, 3, d))
    fn = jax.jit(lambda x, g, d=d: layers.depthwise_kernel_grad_native(x, g, 3, d))
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (d, d), (d, d), (0, 0)))
    exact = np.stack([np.einsum("nhwc,nhwc->c", xp[:, i * d:i * d + hw, j * d:j * d + hw],
                                np.asarray(g, np.float64)) for i in range(3) for j in range(3)])
    exact = exact.reshape(3, 3, c)
    kx = len(re.findall(r"= \S+ fusion\(", fx.lower(x, g).compile().as_text()))
    ex, en = (float(np.abs(np.asarray(f(x, g)) - exact).max()) for f in (fx, fn))
    print(f"{n}x{hw}x{hw}x{c} d{d}: xla {median_ms(fx, x, g, n=20):.3f} ms ({kx} kernels) err "
          f"{ex:.1e} | native {median_ms(fn, x, g, n=20):.3f} ms err {en:.1e}", flush=True)


def _grouped(c, d):
  return lambda x, k: conv.conv_general_dilated(
      x, k, (1, 1), ((d, d), (d, d)), rhs_dilation=(d, d),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def train_paths() -> None:
  for n, hw, c, d in [(4, 16, 128, 2), (4, 16, 192, 2), (4, 16, 256, 6), (4, 32, 256, 2),
                      (4, 64, 128, 2), (4, 32, 192, 4), (4, 32, 192, 8), (4, 128, 16, 1),
                      (4, 64, 32, 1), (4, 32, 64, 1), (4, 16, 128, 1), (4, 16, 728, 1),
                      (4, 64, 128, 1), (4, 32, 256, 1)]:
    x, k = _rand((n, hw, hw, c)), _rand((3, 3, 1, c), 1)
    row = []
    for name, fn in [("onednn", _grouped(c, d)),
                     ("shifted", lambda x, k, d=d: layers.depthwise_shifted(x, k, 3, d))]:
      f = jax.jit(jax.value_and_grad(lambda x, k, fn=fn: jnp.sum(fn(x, k) ** 2), argnums=(0, 1)))
      row.append(f"{name} {median_ms(f, x, k, n=20):.2f} ms")
    routed = "onednn" if layers.depthwise_on_onednn((n, hw, hw, c), 3, 1, d, d) else "shifted"
    print(f"{n}x{hw}x{hw}x{c} d{d} fwd+grads: " + " | ".join(row) + f" | jseg: {routed}",
          flush=True)


def forwards() -> None:
  for n, hw, c, d in [(1, 16, 128, 2), (1, 16, 192, 2), (1, 16, 256, 6), (1, 16, 256, 12),
                      (1, 32, 256, 2), (1, 64, 128, 2), (1, 32, 192, 4), (1, 32, 192, 8),
                      (4, 32, 192, 4), (1, 128, 192, 8)]:
    x, k = _rand((n, hw, hw, c)), _rand((3, 3, 1, c), 1)
    one = jax.jit(_grouped(c, d))
    sh = jax.jit(lambda x, k, d=d: layers._shifted_products(layers._same_pad(x, d), k, 3, d, hw,
                                                            hw))
    print(f"{n}x{hw}x{hw}x{c} d{d} forward: onednn {median_ms(one, x, k, n=30):.3f} ms | "
          f"shifted {median_ms(sh, x, k, n=30):.3f} ms | oneDNN f/d/w "
          f"{conv._depthwise_impls((n, hw, hw, c), 3, 1, d, d)}", flush=True)


if __name__ == "__main__":
  kernel_grads()
  train_paths()
  forwards()
