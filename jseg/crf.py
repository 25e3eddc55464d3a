"""Fully connected CRF post-processing (Krähenbühl & Koltun, NeurIPS 2011).

The CRF of DeepLab v1/v2 (Chen et al., ICLR 2015 / TPAMI 2018): unary
``psi_u(x_i) = -log P(x_i)`` from the network, Potts pairwise
``psi_p(x_i, x_j) = [x_i != x_j] * k(f_i, f_j)`` with two Gaussian kernels

    k = w_bi  * exp(-|p_i - p_j|^2 / 2 bi_xy_std^2 - |I_i - I_j|^2 / 2 bi_rgb_std^2)   (appearance)
      + w_pos * exp(-|p_i - p_j|^2 / 2 pos_xy_std^2)                                    (smoothness)

(p: pixel position, I: colour in 0..255), minimised by mean-field iterations
(paper Alg. 1): ``Q <- softmax(log P + sum_m w_m * filter_m(Q))``; with the
Potts model the message ``sum_{l'} mu(l, l') Q~_l'`` equals ``-Q~_l`` up to a
per-pixel constant that the softmax removes.

Filtering follows the reference implementation (densecrf 2.x, used by DeepLab
and pydensecrf): the kernel sum includes ``j = i`` and every kernel is
normalised symmetrically, ``D^-1/2 K D^-1/2`` with ``D = K 1`` (``'symmetric'``;
``'after'`` is densecrf 1.x's ``D^-1 K``; ``'none'`` is the paper's raw sum).

Fast filtering:
- appearance kernel (5-D features): the permutohedral lattice of Adams, Baek &
  Davis (Eurographics 2010), as in densecrf: each pixel is splatted onto the
  ``d+1`` vertices of its enclosing simplex, blurred with the ``[1/2, 1, 1/2]``
  kernel along each of the ``d+1`` lattice directions, and sliced back. The lattice
  (vertices, barycentric weights, neighbours) is built once per image on the
  host with NumPy; splat/blur/slice run jitted in JAX as scatter-add / gathers.
- smoothness kernel (2-D): an exact separable Gaussian on the pixel grid
  (truncated at 4 std), or the lattice when the std exceeds ``8`` pixels.
``naive_*`` functions compute the same with dense ``O(N^2)`` kernels, for tests.

DeepLab's parameters (all with 10 mean-field iterations):

| release | bi_w | bi_xy_std | bi_rgb_std | pos_w | pos_xy_std |
|---|---|---|---|---|---|
| DeepLab v2 ResNet-101 (VOC; the defaults here) | 4 | 67 | 3 | 3 | 1 |
| DeepLab v2 VGG-16 (VOC) | 4 | 65 | 3 | 2 | 2 |
| DeepLab v1 LargeFOV (paper: w2=3, sigma_gamma=3 fixed; w1 in [3, 6], sigma_alpha in [30, 100], sigma_beta in [3, 6] by cross-validation) | 4 | 121 | 5 | 3 | 3 |
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

NORMALIZATIONS = ("symmetric", "after", "none")
_LATTICE_SPATIAL_ABOVE = 8.0  # pos_xy_std above which the smoothness kernel uses the lattice


def default_config() -> ml_collections.ConfigDict:
  """``config.inference.crf``: DeepLab v2 (ResNet-101) parameters, off by default."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.iterations = 10
  c.bi_w = 4.0
  c.bi_xy_std = 67.0
  c.bi_rgb_std = 3.0
  c.pos_w = 3.0
  c.pos_xy_std = 1.0
  c.normalization = "symmetric"
  return c


@dataclasses.dataclass(frozen=True)
class CRFParams:
  iterations: int
  bi_w: float
  bi_xy_std: float
  bi_rgb_std: float
  pos_w: float
  pos_xy_std: float
  normalization: str


def params(crf_cfg: Any = None) -> CRFParams:
  """Validated parameters from a ConfigDict / dict / None (defaults filled in)."""
  d = default_config().to_dict()
  if crf_cfg is not None:
    given = crf_cfg.to_dict() if hasattr(crf_cfg, "to_dict") else dict(crf_cfg)
    unknown = set(given) - set(d)
    if unknown:
      raise ValueError(f"Unknown CRF config field(s) {sorted(unknown)}; accepted: {sorted(d)}.")
    d.update(given)
  if d["normalization"] not in NORMALIZATIONS:
    raise ValueError(
        f"crf.normalization='{d['normalization']}' is not one of {', '.join(NORMALIZATIONS)}."
    )
  for k in ("bi_xy_std", "bi_rgb_std", "pos_xy_std"):
    if not d[k] > 0:
      raise ValueError(f"crf.{k}={d[k]} must be > 0.")
  if int(d["iterations"]) < 0:
    raise ValueError(f"crf.iterations={d['iterations']} must be >= 0.")
  return CRFParams(
      int(d["iterations"]), float(d["bi_w"]), float(d["bi_xy_std"]), float(d["bi_rgb_std"]),
      float(d["pos_w"]), float(d["pos_xy_std"]), d["normalization"],
  )


# ----------------------------------------------------------------------------
# Permutohedral lattice (Adams et al. 2010; layout as in Krähenbühl's densecrf).


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Lattice:
  """A built lattice: for each of the ``d+1`` simplex vertices of every point,
  its lattice index and barycentric weight, and per blur direction the two
  neighbours of every lattice point. Index ``num_rows - 1`` is an always-zero
  dummy row (missing neighbours, padding)."""

  offsets: jax.Array  # (d+1, N) int32
  weights: jax.Array  # (d+1, N) float32
  neighbors: jax.Array  # (d+1, 2, R) int32, R = padded lattice size + 1
  num_points: int = dataclasses.field(metadata=dict(static=True))  # lattice points (unpadded)


def _canonical(d: int) -> np.ndarray:
  d1 = d + 1
  c = np.zeros((d1, d1), np.int64)
  for i in range(d1):
    c[i, : d1 - i] = i
    c[i, d1 - i :] = i - d1
  return c


def _pad_size(m: int) -> int:
  """Rounds ``m`` up to 1/8 of a power of two (<= 12.5% waste) so images with
  similar lattice sizes share compiled programs."""
  if m <= 1024:
    return 1024
  step = 2 ** (int(math.log2(m)) - 3)
  return -(-m // step) * step


def build_lattice(features: np.ndarray) -> Lattice:
  """Builds the permutohedral lattice of ``features`` ``(N, d)`` (already
  divided by the kernel's standard deviations), on the host with NumPy."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2:
    raise ValueError(f"features must be (N, d); got shape {f.shape}.")
  n, d = f.shape
  d1 = d + 1
  # Elevate onto the hyperplane sum(x) = 0 of R^{d+1}, scaled so the blur
  # below has unit standard deviation in feature space.
  scale = d1 * np.sqrt(2.0 / 3.0) / np.sqrt(np.arange(1, d + 1) * np.arange(2, d + 2))
  cf = f * scale
  suffix = np.concatenate([np.cumsum(cf[:, ::-1], axis=1)[:, ::-1], np.zeros((n, 1))], axis=1)
  el = np.empty((n, d1))
  el[:, 0] = suffix[:, 0]
  el[:, 1:] = suffix[:, 1:] - np.arange(1, d1) * cf
  # Closest remainder-0 lattice point and the rank of each coordinate's residual.
  v = el / d1
  up, down = np.ceil(v) * d1, np.floor(v) * d1
  rem0 = np.where(up - el < el - down, up, down)
  total = np.rint(rem0.sum(1) / d1).astype(np.int64)
  # rank[i] = #{j: d_j > d_i} + #{j < i: d_j == d_i}: the position of i in a
  # stable sort by decreasing residual (densecrf's pairwise loop).
  order = np.argsort(rem0 - el, axis=1, kind="stable")
  rank = np.empty((n, d1), np.int64)
  np.put_along_axis(rank, order, np.arange(d1)[None, :], axis=1)
  pos = total[:, None] > 0
  neg = total[:, None] < 0
  hi = rank >= d1 - total[:, None]
  lo = rank < -total[:, None]
  shift = np.where(pos & hi, -d1, 0) + np.where(neg & lo, d1, 0)
  rem0 = rem0 + shift
  rank = rank + total[:, None] + shift
  # Barycentric coordinates of the point in its simplex.
  bary = np.zeros((n, d + 2))
  rows = np.arange(n)
  for i in range(d1):
    val = (el[:, i] - rem0[:, i]) / d1
    bary[rows, d - rank[:, i]] += val
    bary[rows, d - rank[:, i] + 1] -= val
  bary[:, 0] += 1.0 + bary[:, d + 1]
  # Vertex r of the simplex has key rem0 + canonical[r, rank] (first d
  # coordinates; the last is implied by sum = 0). Every coordinate of a
  # remainder-r key is congruent to r mod d+1 and equals (d+1) * q + r with
  # q = rem0 / (d+1) - [rank >= d+1-r], so (r, q) packs into one int64 code
  # r + (d+1) * sum_i (q_i - qmin_i) * mult_i (mixed radix, 2 spare per side).
  q0 = np.rint(rem0[:, :d] / d1).astype(np.int64)
  qmin = q0.min(0) - 2
  radix = q0.max(0) - qmin + 3
  if float(np.prod(radix.astype(np.float64))) * d1 >= 2.0**62:
    raise ValueError(
        f"Lattice key range {radix.tolist()} is too large to hash; the CRF features "
        "span too many standard deviations (increase bi_xy_std / bi_rgb_std)."
    )
  mult = np.concatenate([[1], np.cumprod(radix[:-1])]).astype(np.int64)
  base = (q0 - qmin) @ mult
  codes = np.empty((d1, n), np.int64)
  for r in range(d1):
    codes[r] = r + d1 * (base - (rank[:, :d] >= d1 - r).astype(np.int64) @ mult)
  uniq, inv = np.unique(codes.reshape(-1), return_inverse=True)
  m = len(uniq)
  # Neighbours along direction j: key - 1 with coordinate j + d (n1) and
  # key + 1 with coordinate j - d (n2), written on the codes: a remainder
  # wraps from 0 to d (n1) or d to 0 (n2) with q moving by one.
  rem, qc = uniq % d1, uniq // d1
  total_mult = int(mult.sum())
  r_pad = _pad_size(m) + 1
  dummy = r_pad - 1
  neighbors = np.full((d1, 2, r_pad), dummy, np.int32)
  for j in range(d1):
    mj = int(mult[j]) if j < d else 0
    n1 = np.where(rem >= 1, (rem - 1) + d1 * (qc + mj), d + d1 * (qc - (total_mult - mj)))
    n2 = np.where(rem < d, (rem + 1) + d1 * (qc - mj), d1 * (qc + (total_mult - mj)))
    for s, nc in enumerate((n1, n2)):
      at = np.minimum(np.searchsorted(uniq, nc), m - 1)
      neighbors[j, s, :m] = np.where(uniq[at] == nc, at, dummy)
  return Lattice(
      offsets=jnp.asarray(inv.reshape(d1, n).astype(np.int32)),
      weights=jnp.asarray(bary[:, :d1].T.astype(np.float32)),
      neighbors=jnp.asarray(neighbors),
      num_points=m,
  )


def lattice_filter(lat: Lattice, values: jax.Array) -> jax.Array:
  """Approximate Gaussian filter ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` of
  ``values`` ``(N, K)`` (splat, blur along every lattice direction, slice)."""
  # fori_loops, not unrolled Python loops: XLA:CPU fuses an unrolled chain of
  # scatters/gathers badly (measured 3-10x slower at 360x480).
  d1 = lat.offsets.shape[0]
  rows = lat.neighbors.shape[-1]
  values = values.astype(jnp.float32)

  def splat(r, grid):
    return grid.at[lat.offsets[r]].add(values * lat.weights[r][:, None], mode="promise_in_bounds")

  def blur(j, grid):
    n1 = grid.at[lat.neighbors[j, 0]].get(mode="promise_in_bounds")
    n2 = grid.at[lat.neighbors[j, 1]].get(mode="promise_in_bounds")
    return grid + 0.5 * (n1 + n2)

  def slice_(r, out):
    return out + grid.at[lat.offsets[r]].get(mode="promise_in_bounds") * lat.weights[r][:, None]

  grid = jax.lax.fori_loop(0, d1, splat, jnp.zeros((rows, values.shape[1]), jnp.float32))
  grid = jax.lax.fori_loop(0, d1, blur, grid)
  out = jax.lax.fori_loop(0, d1, slice_, jnp.zeros_like(values))
  return out / (1.0 + 2.0 ** (-(d1 - 1)))


# ----------------------------------------------------------------------------
# Spatial Gaussian on the pixel grid.


def _gauss_taps(std: float) -> np.ndarray:
  r = max(1, int(math.ceil(4.0 * std)))
  x = np.arange(-r, r + 1)
  return np.exp(-0.5 * (x / std) ** 2).astype(np.float32)


def grid_gaussian(x: jax.Array, std: float) -> jax.Array:
  """Exact ``sum_j exp(-|p_i - p_j|^2 / 2 std^2) x_j`` over the pixel grid of
  ``x`` ``(H, W, K)`` (separable, truncated at 4 std, zeros outside)."""
  taps = _gauss_taps(std)
  r = len(taps) // 2
  h, w = x.shape[:2]
  xp = jnp.pad(x, ((r, r), (0, 0), (0, 0)))
  y = sum(float(t) * xp[i : i + h] for i, t in enumerate(taps))
  yp = jnp.pad(y, ((0, 0), (r, r), (0, 0)))
  return sum(float(t) * yp[:, i : i + w] for i, t in enumerate(taps))


# ----------------------------------------------------------------------------
# Mean field.


def kernel_features(image: np.ndarray, xy_std: float, rgb_std: float | None) -> np.ndarray:
  """``(H*W, d)`` kernel features: (x, y) / xy_std and, unless None, colour / rgb_std."""
  h, w = image.shape[:2]
  yy, xx = np.mgrid[0:h, 0:w]
  feats = [xx.reshape(-1, 1) / xy_std, yy.reshape(-1, 1) / xy_std]
  if rgb_std is not None:
    feats.append(image.reshape(h * w, -1).astype(np.float64) / rgb_std)
  return np.concatenate(feats, axis=1)


def _check(log_probs: Any, image: Any) -> tuple[np.ndarray, np.ndarray]:
  lp = np.asarray(log_probs, np.float32)
  im = np.asarray(image)
  if im.ndim == 2:
    im = im[..., None]
  if lp.ndim != 3 or im.ndim != 3 or lp.shape[:2] != im.shape[:2]:
    raise ValueError(
        f"dense_crf needs log_probs (H, W, K) and image (H, W, C) of the same H, W; "
        f"got {lp.shape} and {np.shape(image)}."
    )
  return lp, im


def dense_crf(log_probs: Any, image: Any, crf_cfg: Any = None) -> np.ndarray:
  """Mean-field inference of the dense CRF for one image.

  Args:
    log_probs: ``(H, W, K)`` log-probabilities (e.g. ``jseg.inference.predict_logits``);
      logits work too (only differences within a pixel matter).
    image: ``(H, W, C)`` colour image in 0..255 (uint8 or float), C = 3 or 1.
    crf_cfg: ``config.inference.crf`` (see ``default_config``) or None.

  Returns:
    ``(H, W, K)`` float32 log of the CRF marginals Q.
  """
  p = params(crf_cfg)
  lp, im = _check(log_probs, image)
  h, w, k = lp.shape
  bi = build_lattice(kernel_features(im, p.bi_xy_std, p.bi_rgb_std)) if p.bi_w != 0 else None
  pos = None
  if p.pos_w != 0 and p.pos_xy_std > _LATTICE_SPATIAL_ABOVE:
    pos = build_lattice(kernel_features(im, p.pos_xy_std, None))
  out = _mean_field(
      jnp.asarray(lp), bi, pos, p.bi_w, p.pos_w, p.pos_xy_std, p.iterations, p.normalization,
      p.pos_w != 0,
  )
  return np.asarray(out)


@partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _mean_field(lp, bi, pos_lat, bi_w, pos_w, pos_std, iterations, normalization, use_pos):
  h, w, k = lp.shape
  n = h * w
  unary = lp.reshape(n, k)  # -psi_u

  def spatial(v):
    if pos_lat is not None:
      return lattice_filter(pos_lat, v)
    return grid_gaussian(v.reshape(h, w, -1), pos_std).reshape(n, -1)

  filters = []
  if bi is not None:
    filters.append((bi_w, partial(lattice_filter, bi)))
  if use_pos:
    filters.append((pos_w, spatial))
  kernels = [(wt, f, _norm(f, n, normalization)) for wt, f in filters]

  def step(_, logits):
    q = jax.nn.softmax(logits, axis=-1)
    msg = unary
    for wt, f, (pre, post) in kernels:
      msg = msg + wt * post * f(q * pre)
    return msg

  logits = jax.lax.fori_loop(0, iterations, step, unary)
  return jax.nn.log_softmax(logits, axis=-1).reshape(h, w, k)


def _norm(f, n: int, normalization: str):
  """Per-pixel scales applied before and after filtering (densecrf's kernel normalisation)."""
  ones = jnp.ones((n, 1), jnp.float32)
  if normalization == "none":
    return 1.0, 1.0
  s = f(ones)
  if normalization == "symmetric":
    r = jax.lax.rsqrt(s + 1e-20)
    return r, r
  return 1.0, 1.0 / (s + 1e-20)


def dense_crf_batch(log_probs: Any, images: Any, crf_cfg: Any = None) -> np.ndarray:
  """``dense_crf`` over a batch ``(B, H, W, K)`` with images ``(B, H, W, C)``."""
  return np.stack([dense_crf(lp, im, crf_cfg) for lp, im in zip(log_probs, images)])


# ----------------------------------------------------------------------------
# Dense O(N^2) reference (tests only).


def naive_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
  """``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` with the dense kernel matrix."""
  f = np.asarray(features, np.float64)
  sq = ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)
  return np.exp(-0.5 * sq) @ np.asarray(values, np.float64)


def naive_dense_crf(log_probs: Any, image: Any, crf_cfg: Any = None) -> np.ndarray:
  """``dense_crf`` with exact dense kernels in float64 (for small images)."""
  p = params(crf_cfg)
  lp, im = _check(log_probs, image)
  h, w, k = lp.shape
  n = h * w
  unary = lp.reshape(n, k).astype(np.float64)
  kernels = []
  for wt, feats in (
      (p.bi_w, kernel_features(im, p.bi_xy_std, p.bi_rgb_std)),
      (p.pos_w, kernel_features(im, p.pos_xy_std, None)),
  ):
    if wt == 0:
      continue
    sq = ((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1)
    km = np.exp(-0.5 * sq)
    s = km.sum(1, keepdims=True)
    pre, post = {
        "symmetric": (s**-0.5, s**-0.5), "after": (1.0, 1.0 / s), "none": (1.0, 1.0)
    }[p.normalization]
    kernels.append((wt, km, pre, post))
  logits = unary
  for _ in range(p.iterations):
    q = np.exp(logits - logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    logits = unary + sum(wt * post * (km @ (q * pre)) for wt, km, pre, post in kernels)
  logits = logits - logits.max(1, keepdims=True)
  return (logits - np.log(np.exp(logits).sum(1, keepdims=True))).reshape(h, w, k).astype(np.float32)
