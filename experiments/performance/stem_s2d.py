"""Not-kept lever: the ResNet stem (7x7/2 conv of a 3-channel image) by space-to-depth.

A 7x7 stride-2 convolution equals a 4x4 stride-1 VALID convolution over the 2x2
space-to-depth input (12 channels) with the kernel zero-padded to 8x8 and rearranged.
This script checks the two agree (values and kernel gradient) and times them alone:

  python experiments/performance/stem_s2d.py

Measured 2026-11-30 (2 threads, 4x256x256x3 -> 16): forward 6.9-8.6 vs 5.3-5.7 ms, kernel
gradient 19.6-21.2 vs 8.5-8.9 ms. In whole models (``levers.py --variants=base,default``,
``ab_stem_s2d.json``) the same change made every step slower (PSPNet 0.232 -> 0.284 s,
DeepLab v3 0.265 -> 0.292 s best of 2 rounds), so it was reverted.

``--onednn`` runs both forms through jseg's convolution (oneDNN; the twelfth pass): at
2x512x512x3 -> 32 forward 7.4 / 6.6 (direct) vs 9.4 / 10.1 ms (space-to-depth), kernel
gradient 11.2 / 7.4 vs 17.5 / 13.3 ms (2026-11-30, two alternations): not kept either.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jseg  # noqa: F401  (sets the XLA flags jseg runs with)
from timing import median_ms as tm

DN = ("NHWC", "HWIO", "NHWC")
if "--onednn" in sys.argv:
  from jseg.models.conv import conv_general_dilated as _conv
else:
  _conv = lax.conv_general_dilated


def stem(x, w):
  return _conv(x, w, (2, 2), ((3, 3), (3, 3)), dimension_numbers=DN)
def stem_s2d(x, w):
  """7x7 stride-2 pad-3 conv as a 4x4 stride-1 VALID conv over the 2x2 space-to-depth input."""
  n, h, wd, c = x.shape
  oh, ow = (h + 6 - 7) // 2 + 1, (wd + 6 - 7) // 2 + 1
  ph, pw = 2 * (oh + 3), 2 * (ow + 3)         # x' length needed: 2*(O+3)
  xp = jnp.pad(x, ((0, 0), (3, ph - h - 3), (3, pw - wd - 3), (0, 0)))
  X = xp.reshape(n, ph // 2, 2, pw // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, ph // 2, pw // 2, 4 * c)
  w8 = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))
  o = w.shape[-1]
  W = w8.reshape(4, 2, 4, 2, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * c, o)
  return _conv(X, W, (1, 1), "VALID", dimension_numbers=DN)
rng = np.random.default_rng(0)
for shp, o in [((4,256,256,3), 16), ((1,256,256,3), 16), ((4,255,253,3), 16), ((2,512,512,3), 32)]:
  x = jnp.asarray(rng.standard_normal(shp, np.float32)); w = jnp.asarray(rng.standard_normal((7,7,3,o), np.float32)*0.1)
  r = stem(x, w); s = stem_s2d(x, w)
  g = jnp.asarray(rng.standard_normal(r.shape, np.float32))
  gw_r = jax.vjp(lambda w: stem(x, w), w)[1](g)[0]; gw_s = jax.vjp(lambda w: stem_s2d(x, w), w)[1](g)[0]
  print(shp, r.shape, s.shape, float(jnp.abs(r-s).max()), float(jnp.abs(gw_r-gw_s).max()))
  for name, f in [("stock", stem), ("s2d", stem_s2d)]*2:
    fw = jax.jit(f); bw = jax.jit(lambda x, w, g, f=f: jax.vjp(lambda w: f(x, w), w)[1](g))
    print(" ", name, f"fwd {tm(fw, x, w):.2f} wgrad-vjp {tm(bw, x, w, g):.2f}")
