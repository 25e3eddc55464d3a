"""Not-kept lever: dilated 3x3 convolutions by space-to-batch (TensorFlow's atrous form).

The input's d x d phases go into the batch, an undilated convolution runs, the phases
come back. Checks values/gradients against ``lax.conv_general_dilated`` and times forward
and VJP alone, for the dilated shapes of the bench PSPNet/DeepLab v3:

  python experiments/performance/atrous_s2b.py      # 2 threads; prefix taskset -c 0 for one

Measured 2026-11-30, 2 threads, VJP ms stock -> space-to-batch: 4x32x32x128 d4 15.8 -> 15.4,
4x32x32x64 d2 8.4 -> 4.9, 4x16x16x128 d2 3.5 -> 3.1, d4 4.7 -> 3.7, 4x16x16x256->64 d6
8.0 -> 5.4, but 4x16x16x64 d8 (2x2 phases) 2.8 -> 13.5. In whole steps, as a
``layers.AtrousConv`` in the ResNet's dilated blocks (``levers.py --variants=base,default``,
three alternated rounds each, ``ab_atrous_s2b_*.json``): phases >= 3x3: PSPNet x1.11,
DeepLab v3 x0.97; phases >= 8x8: DeepLab v3 x0.82; phases >= 16x16: PSPNet x0.83. The
machine's own spread was +-20% that hour and the results contradict each other, so it
was not kept.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jseg  # noqa: F401  (sets the XLA flags jseg runs with)
from timing import median_ms as tm

DN = ("NHWC", "HWIO", "NHWC")
def conv(x, w, d):
  p = d * (w.shape[0] - 1) // 2
  return lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)), rhs_dilation=(d, d), dimension_numbers=DN)
def conv_s2b(x, w, d):
  n, h, wd, c = x.shape
  k = w.shape[0]
  hp, wp = -(-h // d) * d, -(-wd // d) * d
  if (hp, wp) != (h, wd):
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - wd), (0, 0)))
  xb = x.reshape(n, hp // d, d, wp // d, d, c).transpose(2, 4, 0, 1, 3, 5).reshape(d * d * n, hp // d, wp // d, c)
  p = (k - 1) // 2
  y = lax.conv_general_dilated(xb, w, (1, 1), ((p, p), (p, p)), dimension_numbers=DN)
  o = y.shape[-1]
  y = y.reshape(d, d, n, hp // d, wp // d, o).transpose(2, 3, 0, 4, 1, 5).reshape(n, hp, wp, o)
  return y[:, :h, :wd]
rng = np.random.default_rng(0)
for (n, hw, ci, co, d) in [(4, 32, 128, 128, 4), (4, 32, 64, 64, 2), (4, 16, 128, 128, 2), (4, 16, 128, 128, 4), (4,16,64,64,8), (4,16,256,64,6), (1,32,128,128,4)]:
  x = jnp.asarray(rng.standard_normal((n, hw, hw, ci), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, ci, co), np.float32) * 0.05)
  g = jnp.asarray(rng.standard_normal((n, hw, hw, co), np.float32))
  out = []
  ref = conv(x, w, d); err = float(jnp.abs(conv_s2b(x, w, d) - ref).max())
  gr = jax.vjp(lambda x, w: conv(x, w, d), x, w)[1](g); gs = jax.vjp(lambda x, w: conv_s2b(x, w, d), x, w)[1](g)
  gerr = max(float(jnp.abs(a - b).max()) for a, b in zip(gr, gs))
  for name, cf in [("stock", conv), ("s2b", conv_s2b)]:
    f = jax.jit(lambda x, w, cf=cf: cf(x, w, d))
    b = jax.jit(lambda x, w, g, cf=cf: jax.vjp(lambda x, w: cf(x, w, d), x, w)[1](g))
    out.append(f"{name} fwd {tm(f, x, w):6.2f} vjp {tm(b, x, w, g):6.2f}")
  print((n, hw, ci, co, d), " | ".join(out), f"err {err:.1e} {gerr:.1e}", flush=True)
