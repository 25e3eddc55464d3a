"""The 3-channel first convolution three ways: oneDNN direct, XLA, im2col + 1x1 (oneDNN).

  python experiments/performance/first_conv.py

Forward and forward + kernel gradient (no input gradient: the image needs none), median ms.
"""
import os, sys, time, jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_ms
from jseg.models.conv import conv_general_dilated as cgd
from jax import lax
dn = ("NHWC", "HWIO", "NHWC")
def direct(x, k, s, p):
  return cgd(x, k, (s, s), p, dimension_numbers=dn)
def xla(x, k, s, p):
  return lax.conv_general_dilated(x, k, (s, s), p, dimension_numbers=dn)
def im2col(x, k, s, p):
  kh, kw, ci, co = k.shape
  xp = jnp.pad(x, ((0, 0), p[0], p[1], (0, 0)))
  n, H, W, _ = x.shape
  oh = (H + p[0][0] + p[0][1] - kh) // s + 1; ow = (W + p[1][0] + p[1][1] - kw) // s + 1
  cols = [xp[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :] for i in range(kh) for j in range(kw)]
  pt = jnp.concatenate(cols, -1)
  return cgd(pt, k.reshape(1, 1, kh * kw * ci, co), (1, 1), ((0, 0), (0, 0)), dimension_numbers=dn)
for (n, H, kh, co, s) in [(1, 512, 3, 32, 1), (4, 256, 3, 32, 1), (2, 512, 7, 16, 2), (4, 256, 7, 16, 2)]:
  p = ((kh // 2, kh // 2),) * 2
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, H, H, 3)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((kh, kh, 3, co)) * 0.1, jnp.float32)
  ref = xla(x, k, s, p)
  row = []
  for name, f in [("onednn", direct), ("xla", xla), ("im2col", im2col)]:
    fw = jax.jit(lambda x, k, f=f: f(x, k, s, p))
    err = float(jnp.abs(fw(x, k) - ref).max())
    gw = jax.jit(jax.grad(lambda k, x, f=f: jnp.sum(f(x, k, s, p) ** 2)))
    row.append(f"{name}: fwd {median_ms(fw, x, k, n=10):.2f} ms, fwd+dk {median_ms(gw, k, x, n=10):.2f} ms (err {err:.1e})")
  print(f"{n}x{H}x{H}x3 k{kh} s{s} -> {co}: " + " | ".join(row), flush=True)
