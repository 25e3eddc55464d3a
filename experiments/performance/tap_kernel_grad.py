"""Dilated kernel gradient as one product per live tap vs oneDNN's (GEMM) kernel vs XLA's
convolution (2 threads, medians of 9, ms). Tried in the eighteenth pass, not kept in
``jseg.models.conv`` (whole steps within noise; see the performance README).

  python experiments/performance/tap_kernel_grad.py "4,32,256,11,18;4,32,256,11,24"

Each case is ``n,h,cin,cout,dilation`` (3x3, stride 1, 'same' padding).
"""
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

from jseg.models import conv as jconv


def _tap_spans(size: int, out: int, k: int, dilation: int, pad_lo: int):
  """Per tap along one axis: (first output, last output + 1, input offset) of the outputs
  whose input for that tap lies inside the map (stride 1)."""
  spans = []
  for t in range(k):
    off = t * dilation - pad_lo
    lo, hi = max(0, -off), min(out, size - off)
    spans.append((lo, max(lo, hi), off))
  return spans


def live_tap_fraction(hw: tuple[int, int], k: int, dilation: tuple[int, int],
                      padding: tuple[tuple[int, int], tuple[int, int]]) -> float:
  """Share of a stride-1 k x k convolution's tap reads that land inside the map."""
  frac = 1.0
  for a in range(2):
    out = hw[a] + sum(padding[a]) - dilation[a] * (k - 1)
    spans = _tap_spans(hw[a], out, k, dilation[a], padding[a][0])
    frac *= sum(hi - lo for lo, hi, _ in spans) / (k * out)
  return frac


def tap_kernel_grad(x: jax.Array, dy: jax.Array, k: int, dilation: tuple[int, int],
                    padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """The kernel gradient of a stride-1, ungrouped k x k convolution as one product per tap
  over only the positions where that tap reads the map (no padding is materialised): where
  most reads of a dilated kernel fall in the padding, this does a fraction of the GEMM
  fallback's work."""
  sy = _tap_spans(x.shape[1], dy.shape[1], k, dilation[0], padding[0][0])
  sx = _tap_spans(x.shape[2], dy.shape[2], k, dilation[1], padding[1][0])
  zero = jnp.zeros((x.shape[3], dy.shape[3]), jnp.float32)
  rows = []
  for y0, y1, oy in sy:
    row = []
    for x0, x1, ox in sx:
      if y1 <= y0 or x1 <= x0:
        row.append(zero)
        continue
      xs = x[:, y0 + oy:y1 + oy, x0 + ox:x1 + ox, :]
      row.append(jnp.einsum("nhwc,nhwo->co", xs, dy[:, y0:y1, x0:x1, :],
                            precision=lax.Precision.HIGHEST))
    rows.append(jnp.stack(row))
  return jnp.stack(rows)


def med(fn, r=9):
  for _ in range(3):
    jax.block_until_ready(fn())
  ts = []
  for _ in range(r):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return round(1e3 * statistics.median(ts), 2)


def main():
  cases = [tuple(int(v) for v in c.split(",")) for c in sys.argv[1].split(";")]
  for n, h, ci, co, d in cases:
    x = jax.random.normal(jax.random.key(0), (n, h, h, ci))
    dy = jax.random.normal(jax.random.key(1), (n, h, h, co))
    pad = ((d, d), (d, d))
    geom = (x.shape, (3, 3, ci, co), dy.shape, (1, 1), (d, d), pad, 1)
    onednn = jax.jit(lambda x, dy: jconv._call("JsegConvBwdWeights", "w", (3, 3, ci, co), *geom, x, dy))
    xla = jax.jit(lambda x, dy: jconv._xla_kernel_grad(x, dy, (3, 3, ci, co), (1, 1), (d, d), pad, 1))
    taps = jax.jit(lambda x, dy: tap_kernel_grad(x, dy, 3, (d, d), pad))
    a, b, c = onednn(x, dy), xla(x, dy), taps(x, dy)
    err = float(jnp.max(jnp.abs(c - b)) / jnp.max(jnp.abs(b)))
    live = live_tap_fraction((h, h), 3, (d, d), pad)
    print((n, h, ci, co, d), "onednn", med(lambda: onednn(x, dy)), "xla", med(lambda: xla(x, dy)),
          "taps", med(lambda: taps(x, dy)), f"live {live:.2f} relerr {err:.1e}",
          "impl", jconv._impl_name("w", *geom[:6], 1, *jconv.conv_split("w", x.shape, dy.shape, (3, 3, ci, co))))


if __name__ == "__main__":
  main()
