"""Building blocks shared by the networks, written in XLA-friendly forms.

Several stock ops have slow gradients on XLA:CPU (see ``PERF_NOTES.md`` in the
project's shared notes): ``nn.max_pool`` (reduce-window + select-and-scatter),
``nn.ConvTranspose`` (an rhs-dilated convolution for the kernel gradient) and
grouped convolutions for depthwise kernels. The functions here compute the
same functions with reshapes, strided slices and einsums, whose gradients are
elementwise or plain matmuls. Tests check each against the stock op.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from flax import linen as nn

from jseg import native
from jseg.inference import interp_matrix
from jseg.models.conv import (Conv, Epilogue, conv_general_dilated, onednn_active,
                              onednn_depthwise_forward_kernel, onednn_depthwise_kernels,
                              onednn_depthwise_without_gemm, then_conv)
from jseg.models.norm import BatchNorm, conv_bn_chain

Dtype = Any


@jax.custom_vjp
def relu_kept(x: jax.Array) -> jax.Array:
  """``nn.relu(x)`` whose backward reads only its output.

  For a ReLU whose input is not otherwise needed in the backward (a residual stream that
  feeds a convolution through a ReLU: RefineNet's units). ``nn.relu``'s derivative reads
  its input, and so does a custom VJP on the output once XLA's simplifier rewrites
  ``max(x, 0) > 0`` as ``x > 0``, so both kept ``x`` alive beside the ReLU's output. Here
  the output is a reduction (a maximum over ``x`` and 0 stacked), which XLA neither sees
  through nor fuses into the backward. Gradient 0 at 0, as ``nn.relu``'s. Only the
  differentiated form (the custom VJP's forward) is the reduction: it costs a pass XLA
  could otherwise fuse away (RefineNet's step +4%, its temporaries -31 MB), which a forward
  without gradient (evaluation) does not pay.
  """
  return jnp.maximum(x, 0)


def _relu_reduce(x: jax.Array) -> jax.Array:
  # The pair stacked next to the channels (the reduction reads adjacent rows): stacked
  # along a new first axis it ran 3-9x slower (4x64x64x64: 3.5-3.8 vs 0.4-0.6 ms).
  if x.ndim == 0:
    return jnp.maximum(x, 0)
  return lax.reduce(jnp.stack([x, jnp.zeros_like(x)], -2), jnp.array(-jnp.inf, x.dtype),
                    lax.max, (x.ndim - 1,))


def _relu_kept_fwd(x):
  y = _relu_reduce(x)
  return y, y


def _relu_kept_bwd(y, g):
  return (jnp.where(y > 0, g, jnp.zeros((), g.dtype)),)


relu_kept.defvjp(_relu_kept_fwd, _relu_kept_bwd)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of NHWC ``x`` to ``size`` (half-pixel centres, no antialias).

  Matches ``torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)``. For features inside a network; upsample the output logits
  with ``resize_logits``.
  """
  n, _, _, c = x.shape
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (n, size[0], size[1], c), "bilinear", antialias=False)


def resize_logits(x: jax.Array, size: tuple[int, int], train: bool = True) -> jax.Array:
  """``resize_bilinear`` for a network's output logits (same values).

  ``train=True``: two matmuls with fixed interpolation matrices that leave the result
  class-major (``N, K, H, W``) under its NHWC view. The losses reduce over classes in
  that layout (``losses._true_class_log_prob``), so the full-size logits and their
  gradient are never transposed; both gradients are matmuls (where the loss end runs
  natively, ``losses.loss_native_active``, the width step is a oneDNN 1x1 convolution
  instead, so that the loss can write its gradient over this output). Measured on XLA:CPU
  (``experiments/performance/loss_tail.py``, 2 threads): upsampling 4x32x32x11 to 256^2
  plus cross-entropy, forward and backward, 38 ms with ``jax.image.resize`` and
  ``log_softmax``/``take_along_axis``, 25 ms this way.

  ``train=False`` (no gradient wanted), when the height grows by an integer factor:
  the width by a matmul in NHWC and the height by ``upsample_rows`` (two taps per row,
  no dense matrix, no transposes). The dense matrices cost ``in_size`` multiply-adds per
  output pixel: at 1024^2 from 256^2, 48 ms of DeepLab v3+'s 161 ms inference went to one
  of them (``experiments/performance/README.md``, "Sixth pass").
  """
  n, h, w, c = x.shape
  oh, ow = int(size[0]), int(size[1])
  if (h, w) == (oh, ow):
    return x
  if h == 1 and w == 1:
    return jnp.broadcast_to(x, (n, oh, ow, c))
  hi = jax.lax.Precision.HIGHEST
  if not train and oh % h == 0 and oh >= h:
    if ow != w:
      aw = jnp.asarray(interp_matrix(w, ow).T, x.dtype)
      x = jnp.einsum("nhwc,wW->nhWc", x, aw, precision=hi)
    return upsample_rows(x, oh // h)
  ah = jnp.asarray(interp_matrix(h, oh).T, x.dtype)  # (h, oh): jax.image.resize's weights
  aw = jnp.asarray(interp_matrix(w, ow).T, x.dtype)
  t = jnp.einsum("nhwc,hH->ncHw", x, ah, precision=hi)
  if t.dtype == jnp.float32 and _loss_native_active():
    # The width by oneDNN (a 1x1 convolution over the w input columns as channels): the
    # full-size result is then a custom call's output, which the loss's native kernels
    # (losses.loss_native_active) pass through and overwrite with the gradient in place;
    # XLA copies a fusion's output before an in-place custom call.
    t = conv_general_dilated(t.reshape(n * c, oh, 1, w), aw.reshape(1, 1, w, ow), (1, 1),
                             "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    t = t.reshape(n, c, oh, ow)
  else:
    t = jnp.einsum("ncHw,wW->ncHW", t, aw, precision=hi)
  return jnp.transpose(t, (0, 2, 3, 1))


def conv_of_resized(xs: Sequence[jax.Array], kernels: Sequence[jax.Array] | jax.Array,
                    size: tuple[int, int], offset: int | None = None) -> jax.Array:
  """``sum_i conv(resize_bilinear(xs[i], size), kernels[i])`` without the resized maps.

  Each convolution: stride 1, odd square kernel (HWIO), zero padding ``(k - 1) // 2``
  (``pad_same``): the part of a decoder's convolution that reads upsampled channels out of a
  concatenation (PSPNet's pyramid). Resizing is linear and acts on each channel alike, so it
  commutes with a tap's channel mixing: every tap's product ``x @ k[dy, dx]`` runs at the
  small size, and the resize with the tap's shift is one fixed matrix per axis
  (``interp_matrix``'s rows moved by the tap, zero past the edge). The same function up to
  float32 rounding; PSPNet's 4 bins at a 64x64 map cost ~0.2 GFLOP here against 39 GFLOP
  as half of the head's 3x3 convolution.

  ``offset``: ``kernels`` is one kernel whose input channels ``[offset, offset + sum of the
  inputs' channels)`` are the inputs' in order; the taps' products then run as one dot
  over all its input channels (the others against zeros) instead of reading slices of it,
  which XLA copies (PSPNet's 3x3x4096x512 head kernel: 7.5 ms this way, 14.5 ms with the
  slices, ``experiments/performance/bin_taps.py``). For evaluation: its gradient would be
  kernel-sized.
  """
  if offset is None and len(xs) != len(kernels) or not xs:
    raise ValueError(f"conv_of_resized: {len(xs)} inputs for {len(kernels)} kernels.")
  n, (oh, ow) = xs[0].shape[0], (int(size[0]), int(size[1]))
  ks = [kernels] * len(xs) if offset is not None else list(kernels)
  cin = list(np.cumsum([offset or 0] + [x.shape[-1] for x in xs]))
  for i, (x, k) in enumerate(zip(xs, ks)):
    kh, kw, c, _ = k.shape
    c_ok = (cin[i + 1] <= c) if offset is not None else (x.shape[-1] == c)
    if x.ndim != 4 or x.shape[0] != n or not c_ok or kh % 2 == 0 or kw % 2 == 0:
      raise ValueError(f"conv_of_resized: input {x.shape} and kernel {k.shape} do not match "
                       "(NHWC input, odd HWIO kernel over its channels, one batch size).")
  kh, kw, _, f = ks[0].shape
  taps = kh * kw
  # Every tap's product at the small size, the taps as the dot's batch dimension (the
  # kernel's own layout: an einsum over ``yxcf`` transposed each kernel first).
  if offset is not None:
    if any(k.shape[:2] != (kh, kw) for k in ks):
      raise ValueError("conv_of_resized: one kernel size with `offset`.")
    lhs = jnp.concatenate([
        jnp.pad(x.reshape(-1, x.shape[-1]), ((0, 0), (cin[i], ks[0].shape[2] - cin[i + 1])))
        for i, x in enumerate(xs)])
    z_all = jnp.einsum("tmc,tcf->tmf", jnp.broadcast_to(lhs, (taps,) + lhs.shape),
                       ks[0].astype(lhs.dtype).reshape(taps, -1, f))
    rows_at = np.cumsum([0] + [x.size // x.shape[-1] for x in xs])
    zs = [z_all[:, a:b] for a, b in zip(rows_at[:-1], rows_at[1:])]
  else:
    zs = []
    for x, k in zip(xs, ks):
      lhs, t_k = x.reshape(-1, x.shape[-1]), k.shape[0] * k.shape[1]
      zs.append(jnp.einsum("tmc,tcf->tmf", jnp.broadcast_to(lhs, (t_k,) + lhs.shape),
                           k.astype(x.dtype).reshape(t_k, -1, k.shape[-1])))
  hi = jax.lax.Precision.HIGHEST
  rows, parts = [], []
  for x, k, z in zip(xs, ks, zs):
    kh, kw, _, f = k.shape
    h, w = x.shape[1:3]
    z = z.reshape(kh, kw, n, h, w, f)
    cols = jnp.asarray(_shifted_interp(w, ow, kw), x.dtype)  # (kw, ow, w)
    t = jnp.einsum("xWw,yxnhwf->nyhWf", cols, z, precision=hi)
    parts.append(t.reshape(n, kh * h, ow, f))
    rows.append(_shifted_interp(h, oh, kh).transpose(1, 0, 2).reshape(oh, kh * h))
  t = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
  r = jnp.asarray(np.concatenate(rows, axis=1), t.dtype)
  # Batched over n (r broadcast) so that the product comes out NHWC without a transpose.
  return jnp.einsum("nHk,nkWf->nHWf", jnp.broadcast_to(r, (n,) + r.shape), t, precision=hi)


def _shifted_interp(n_in: int, n_out: int, taps: int) -> np.ndarray:
  """``(taps, n_out, n_in)``: tap ``j`` of a 'same' convolution reads resized sample
  ``o + j - taps // 2`` at output ``o`` (zero outside ``[0, n_out)``)."""
  m = interp_matrix(n_in, n_out)
  out = np.zeros((taps, n_out, n_in), np.float32)
  for j in range(taps):
    d = j - taps // 2
    lo, hi = max(0, -d), min(n_out, n_out - d)
    out[j, lo:hi] = m[lo + d:hi + d]
  return out


def _loss_native_active() -> bool:
  from jseg import losses  # noqa: PLC0415 - losses imports the models package
  return losses.loss_native_active()


def upsample_rows(x: jax.Array, s: int) -> jax.Array:
  """Bilinear upsampling of NHWC ``x`` along the height by the integer factor ``s``
  (half-pixel centres: ``jax.image.resize``'s and torch's ``align_corners=False`` values).

  Output row ``i * s + p`` mixes input rows ``i - 1, i, i + 1`` with weights that depend
  on the phase ``p`` only; the rows outside the image get weight 0 and the edge rows are
  renormalised, as ``jax.image.resize`` does. One elementwise pass over the output, for
  inference (its gradient would be a reduction over the phases: use the matmul form).
  """
  if s == 1:
    return x
  n, h = x.shape[0], x.shape[1]
  coef = np.zeros((3, s), np.float32)  # tap k reads input row i + k - 1
  for p in range(s):
    src = (p + 0.5) / s - 0.5
    i0 = int(np.floor(src))
    coef[1 + i0, p] += 1.0 - (src - i0)
    coef[2 + i0, p] += src - i0
  norm = np.ones((h * s,), np.float32)  # 1 / (weight on rows inside the image)
  for o in [*range(min(s, h * s)), *range(max(0, h * s - s), h * s)]:
    i, p = divmod(o, s)
    norm[o] = 1.0 / sum(coef[k, p] for k in range(3) if 0 <= i + k - 1 < h)
  xp = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (1, 1, 0), (0, 0, 0), (0, 0, 0)])
  y = sum(xp[:, k:k + h, None] * jnp.asarray(coef[k].reshape(1, 1, s, 1, 1), x.dtype)
          for k in range(3) if coef[k].any())
  y = y.reshape((n, h * s) + x.shape[2:])
  return y * jnp.asarray(norm.reshape(1, h * s, 1, 1), x.dtype)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max pool (floor mode).

  Same values as ``nn.max_pool(x, (2, 2), (2, 2))``. The backward keeps the int8 position
  (0-3, row-major) of each window's first maximum and routes the gradient there, as
  ``torch.nn.MaxPool2d`` does; autodiff of a reshape + max kept a float32 indicator of
  the input's size (U-Net's first level: 32 MB at 4x256x256x32) and split ties (every
  all-zero window after a ReLU) among them.
  """
  n, h, w, c = x.shape
  return _max_pool_2x2(x[:, : h - h % 2, : w - w % 2])


def pool_2x2_positions(x: jax.Array) -> jax.Array:
  """int8 position (0-3, row-major) of each 2x2 window's first maximum, floor mode: the
  positions ``max_pool_2x2``'s backward routes to (the same reduction, so XLA computes it
  once where both appear), e.g. for SegNet's unpooling."""
  n, h, w, c = x.shape
  return _first_max(_pool_2x2_taps(x[:, : h - h % 2, : w - w % 2]))[1]


def _pool_2x2_taps(x: jax.Array) -> list[jax.Array]:
  return [x[:, a::2, b::2] for a in (0, 1) for b in (0, 1)]


@jax.custom_vjp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
  return _first_max(_pool_2x2_taps(x))[0]


def _max_pool_2x2_fwd(x):
  out, at = _first_max(_pool_2x2_taps(x))
  return out, at


def _max_pool_2x2_bwd(at, g):
  n, h2, w2, c = g.shape
  zero = jnp.zeros((), g.dtype)
  parts = jnp.stack([jnp.where(at == i, g, zero) for i in range(4)], axis=3)  # (n, h2, w2, 4, c)
  dx = parts.reshape(n, h2, w2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return (dx.reshape(n, 2 * h2, 2 * w2, c),)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 stride-2 max pool with padding 1 (the ResNet stem's pool).

  Output size is ``ceil(H/2) x ceil(W/2)`` as in ``torch.nn.MaxPool2d(3, 2, 1)``.
  Written separably, a maximum of three strided row slices and then of three strided
  column slices. The backward keeps only which row and which column held each maximum
  (int8) and routes the gradient there, undoing the column maximum and then the row
  maximum (two three-way selects), all of it to one position per window as PyTorch does
  (the first maximum among the columns, then among that column's rows); autodiff of the
  maxima kept the padded input and the row maxima (1.5x the input) and split ties.
  """
  return _max_pool_3x3_s2(x.shape[1], x.shape[2], x)


def _first_max(taps: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The elementwise maximum of ``taps`` and the index (int8) of the first tap attaining
  it, as one variadic reduction over the stacked taps (NaN propagates).

  A reduction, so XLA writes both results where it runs: written as ``maximum`` and
  ``where(tap == max)`` chains, XLA:CPU fused the positions into the backward's consumers
  and kept every f32 tap alive until then (RefineNet's step: 384 -> 226 MB of
  temporaries; ``experiments/performance/README.md``, thirteenth pass).
  """
  stacked = jnp.stack(taps)
  at = lax.broadcasted_iota(jnp.int8, stacked.shape, 0)

  def pick(a, b):
    (va, ia), (vb, ib) = a, b
    take_a = (va > vb) | ((va == vb) & (ia < ib)) | (va != va)
    return jnp.where(take_a, va, vb), jnp.where(take_a, ia, ib)

  init = (jnp.array(-jnp.inf, stacked.dtype), jnp.int8(len(taps)))
  return lax.reduce((stacked, at), init, pick, (0,))


def _max3(a: jax.Array, b: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The maximum of three arrays and which one (0, 1, 2: the first) attains it, as int8."""
  return _first_max([a, b, c])


def _window3(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Along ``axis``, the samples ``2i - 1``, ``2i``, ``2i + 1`` of each stride-2 window of
  three with padding 1 (-inf where that falls outside ``x``), as strided slices with a
  -inf row joined on where needed: no padded copy of ``x`` is written (XLA:CPU ran the
  padded copy as its own kernel, 5 ms at 2x256x256x32)."""
  size = x.shape[axis]
  n = (size + 1) // 2
  even = lax.slice_in_dim(x, 0, 2 * n - 1, 2, axis)  # 2i
  odd = lax.slice_in_dim(x, 1, size, 2, axis)  # 2i + 1 where inside: n or n - 1 of them
  edge = jnp.full_like(lax.slice_in_dim(x, 0, 1, 1, axis), -jnp.inf)
  before = jnp.concatenate([edge, lax.slice_in_dim(odd, 0, n - 1, 1, axis)], axis)
  after = odd if odd.shape[axis] == n else jnp.concatenate([odd, edge], axis)
  return before, even, after


def _pool_3x3_s2_with_positions(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pooled ``x``, the row (0-2) of each row-maximum and the column (0-2) of each maximum."""
  rows, row_at = _max3(*_window3(x, 1))
  out, col_at = _max3(*_window3(rows, 2))
  return out, row_at, col_at


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _max_pool_3x3_s2(h: int, w: int, x: jax.Array) -> jax.Array:
  return _pool_3x3_s2_with_positions(x)[0]


def _max_pool_3x3_s2_fwd(h, w, x):
  out, row_at, col_at = _pool_3x3_s2_with_positions(x)
  return out, (row_at, col_at)


def _unpool_axis(g: jax.Array, at: jax.Array, axis: int, size: int) -> jax.Array:
  """Inverse of one strided three-way maximum along ``axis``: ``g[i]`` goes to padded
  position ``2 i + at[i]`` (size ``size``), as three interior-padded selects summed."""
  zero = jnp.zeros((), g.dtype)
  n = g.shape[axis]
  out = None
  for k in range(3):
    cfg = [(0, 0, 0)] * g.ndim
    cfg[axis] = (k, size - k - (2 * n - 1), 1)
    t = jax.lax.pad(jnp.where(at == k, g, zero), zero, cfg)
    out = t if out is None else out + t
  return out


def _max_pool_3x3_s2_bwd(h, w, res, g):
  row_at, col_at = res
  g_rows = _unpool_axis(g, col_at, 2, w + 2)[:, :, 1 : w + 1]  # (N, oh, w, C)
  g_xp = _unpool_axis(g_rows, row_at, 1, h + 2)  # (N, h + 2, w, C)
  return (g_xp[:, 1 : h + 1],)


_max_pool_3x3_s2.defvjp(_max_pool_3x3_s2_fwd, _max_pool_3x3_s2_bwd)


def max_pool_same(x: jax.Array, k: int) -> jax.Array:
  """k x k max-pool, stride 1, padding (k-1)//2 with -inf (odd k): same size output.

  Equal to ``nn.max_pool(x, (k, k), padding=((p, p), (p, p)))``, written separably: a
  maximum over k column shifts, then over k row shifts (shifted slices with -inf edges,
  no padded copy). The backward keeps only which column and which row held each maximum
  (int8) and routes each output's gradient to that one input, the first maximum of its
  window in row-major order as ``torch.nn.MaxPool2d`` does. Autodiff of the shifted
  maxima kept 2(k-1) full-size intermediates per pool and split ties among them
  (RefineNet's chained residual pooling, 5x5 on ReLU outputs: most of its temporaries
  and a quarter of its step, ``experiments/performance/README.md``, thirteenth pass).
  """
  if k % 2 != 1:
    raise ValueError(f"max_pool_same needs an odd window; got {k}.")
  return _max_pool_same(k, x)


def _shift(x: jax.Array, d: int, axis: int, fill: float) -> jax.Array:
  """``x`` moved by ``d`` along ``axis`` (``out[i] = x[i - d]``), ``fill`` where that falls
  outside ``x``; same shape."""
  size = x.shape[axis]
  if d == 0:
    return x
  if abs(d) >= size:
    return jnp.full_like(x, fill)
  edge_shape = list(x.shape)
  edge_shape[axis] = abs(d)
  edge = jnp.full(edge_shape, fill, x.dtype)
  if d > 0:
    return jnp.concatenate([edge, lax.slice_in_dim(x, 0, size - d, 1, axis)], axis)
  return jnp.concatenate([lax.slice_in_dim(x, -d, size, 1, axis), edge], axis)


def _window_max(x: jax.Array, k: int, axis: int) -> tuple[jax.Array, jax.Array]:
  """The maximum over offsets ``-p..p`` along ``axis`` (-inf outside) and the first offset
  index (0..k-1, int8) that attains it."""
  p = (k - 1) // 2
  return _first_max([_shift(x, p - i, axis, -jnp.inf) for i in range(k)])  # tap i: x[j + i - p]


def _unwindow(g: jax.Array, at: jax.Array, k: int, axis: int) -> jax.Array:
  """Inverse of ``_window_max``: ``g[j]`` goes to ``j + at[j] - p`` along ``axis``."""
  p = (k - 1) // 2
  zero = jnp.zeros((), g.dtype)
  out = None
  for i in range(k):
    t = _shift(jnp.where(at == i, g, zero), i - p, axis, 0.0)
    out = t if out is None else out + t
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _max_pool_same(k: int, x: jax.Array) -> jax.Array:
  return _window_max(_window_max(x, k, 2)[0], k, 1)[0]


def _max_pool_same_fwd(k, x):
  cols, col_at = _window_max(x, k, 2)
  out, row_at = _window_max(cols, k, 1)
  return out, (row_at, col_at)


def _max_pool_same_bwd(k, res, g):
  row_at, col_at = res
  if g.dtype == jnp.float32 and pool_native_active():
    return (pool_same_bwd_native(g, row_at, col_at, k),)
  return (_unwindow(_unwindow(g, row_at, k, 1), col_at, k, 2),)


def pool_native_active() -> bool:
  """Whether ``max_pool_same``'s backward, traced now, is ``jseg.native``'s kernel
  (``JSEG_POOL`` = ``auto`` | ``native`` | ``xla``; ``auto``: where the oneDNN convolutions
  run, as ``JSEG_BN``)."""
  return native.kernels_active("JSEG_POOL", onednn_active)


def pool_same_bwd_native(g: jax.Array, row_at: jax.Array, col_at: jax.Array,
                         k: int) -> jax.Array:
  """``max_pool_same``'s input gradient from the output gradient ``g`` (float32 NHWC) and
  the forward's int8 positions, as one ``jseg.native`` call (``JsegPoolSameBwd``).

  The same sums in the same order as the XLA form (``_unwindow`` over rows, then columns:
  the same bits), in one pass that writes only the result: XLA:CPU ran each of the 2k
  shifts as its own kernel with a full-size copy (RefineNet's 5x5 pools, 4.5x their input
  in temporaries; ``experiments/performance/README.md``, twenty-fifth pass).
  """
  if g.ndim != 4 or row_at.shape != g.shape or col_at.shape != g.shape:
    raise ValueError(f"pool_same_bwd_native needs NHWC g and positions of its shape; got "
                     f"{g.shape}, {row_at.shape} and {col_at.shape}.")
  if native.onednn() is None:  # builds and registers the kernels once per process
    raise RuntimeError(f"The jseg.native extension is unavailable: {native.onednn_error()}")
  return jax.ffi.ffi_call("JsegPoolSameBwd", jax.ShapeDtypeStruct(g.shape, jnp.float32))(
      g, row_at.astype(jnp.int8), col_at.astype(jnp.int8), k=np.int64(k))


_max_pool_same.defvjp(_max_pool_same_fwd, _max_pool_same_bwd)


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
  """``torch.nn.AdaptiveAvgPool2d(bins)`` for NHWC ``x`` of any size.

  Bin ``i`` covers rows ``[floor(i*H/b), ceil((i+1)*H/b))``; the pooling is two
  small averaging matrices applied with einsum.
  """
  _, h, w, _ = x.shape
  ph = jnp.asarray(_pool_matrix(h, bins), x.dtype)
  pw = jnp.asarray(_pool_matrix(w, bins), x.dtype)
  return jnp.einsum("ih,nhwc,jw->nijc", ph, x, pw)


def adaptive_avg_pools(x: jax.Array, bins: Sequence[int]) -> list[jax.Array]:
  """``[adaptive_avg_pool(x, b) for b in bins]`` as one pooling of ``x``.

  The bins' averaging matrices are stacked ([sum(bins), H] and [sum(bins), W]) and applied
  in one einsum, whose diagonal blocks are the pools: the map is read once, and in the
  backward the bins' gradients reach ``x`` as one full-size array instead of one per bin
  summed afterwards (PSPNet's pyramid pooling at 512² batch 2: that sum was a 9.6 ms
  fusion of a ~290 ms step). Same values up to float32 rounding.
  """
  _, h, w, _ = x.shape
  ph = jnp.asarray(np.concatenate([_pool_matrix(h, b) for b in bins]), x.dtype)
  pw = jnp.asarray(np.concatenate([_pool_matrix(w, b) for b in bins]), x.dtype)
  pooled = jnp.einsum("ih,nhwc,jw->nijc", ph, x, pw)
  starts = np.cumsum([0, *bins])
  return [pooled[:, a : a + b, a : a + b] for a, b in zip(starts, bins)]


def _pool_matrix(size: int, bins: int) -> np.ndarray:
  m = np.zeros((bins, size), np.float32)
  for i in range(bins):
    lo = (i * size) // bins
    hi = -((-(i + 1) * size) // bins)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def pad_same(kernel: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding ``dilation*(kernel-1)//2`` as PyTorch uses it."""
  p = dilation * (kernel - 1) // 2
  return ((p, p), (p, p))


class ConvBNReLU(nn.Module):
  """Convolution, BatchNorm and ReLU: the unit most decoders are built from."""

  features: int
  kernel: int = 3
  stride: int = 1
  dilation: int = 1
  relu: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = Conv(
        self.features,
        (self.kernel, self.kernel),
        strides=self.stride,
        padding=pad_same(self.kernel, self.dilation),
        kernel_dilation=self.dilation,
        use_bias=False,
        dtype=self.dtype,
        name="conv",
        parent=None,
    )
    bn = BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
        relu=self.relu, name="bn",
    )
    # At evaluation the BatchNorm (and ReLU) run in the convolution's call (conv_bn_chain).
    return conv_bn_chain(x, [then_conv(conv, x.shape[-1])], [bn], train)


class PixelTransposeConv(nn.Module):
  """Transposed convolution with kernel size == stride, as a per-pixel einsum.

  ``y[s*i+a, s*j+b, o] = sum_c x[i, j, c] * kernel[a, b, c, o] + bias[o]``: the
  same function as ``torch.nn.ConvTranspose2d(C, O, s, stride=s)`` with
  ``kernel[a, b, c, o] = weight[c, o, a, b]``, written as a matmul followed by
  depth-to-space. On XLA:CPU this avoids the slow rhs-dilated convolution of
  ``nn.ConvTranspose``'s kernel gradient.

  ``relu=True`` applies a ReLU, with the bias, in the convolution's own call on oneDNN
  (``conv.Epilogue``). ``depth_to_space=False`` leaves each input pixel's ``s x s``
  outputs side by side along W: the output is ``(N, H, W*s*s, O)`` in the order
  ``(j, a, b)``. Layers that act pixel by pixel (1x1 convolutions, ReLU) can then follow
  without the interleaving copy, and one ``unblock_pixels`` at the end restores the map
  (``cnn_rnn``'s upsampling chain).
  """

  features: int
  stride: int = 2
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  relu: bool = False
  depth_to_space: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.stride
    n, h, w, c = x.shape
    kernel = self.param(
        "kernel", nn.initializers.lecun_normal(), (s, s, c, self.features), jnp.float32
    )
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            if self.use_bias else None)
    # A 1x1 convolution to s*s*features channels (NHWC in and out: oneDNN's when it is
    # active), then depth-to-space. As an einsum, XLA:CPU transposed the input to
    # channel-major and the product back (U-Net 512^2 inference: 31 ms of a 544 ms
    # forward in one such copy).
    k = jnp.transpose(kernel.astype(self.dtype), (2, 0, 1, 3)).reshape(1, 1, c, s * s * self.features)
    dn = ("NHWC", "HWIO", "NHWC")
    if self.relu or not self.depth_to_space:
      # Bias (and ReLU) on the s*s*features channels, in the convolution's call on oneDNN.
      shift = (jnp.zeros((s * s * self.features,), jnp.float32) if bias is None
               else jnp.tile(bias, s * s))
      y = conv_general_dilated(x, k, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dn,
                               epilogue=Epilogue(None, shift, relu=self.relu))
      if not self.depth_to_space:
        return y.reshape(n, h, w * s * s, self.features)
      y = y.reshape(n, h, w, s, s, self.features).transpose(0, 1, 3, 2, 4, 5)
      return y.reshape(n, h * s, w * s, self.features)
    y = conv_general_dilated(x, k, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dn)
    y = y.reshape(n, h, w, s, s, self.features).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(n, h * s, w * s, self.features)
    if bias is not None:
      y = y + bias.astype(self.dtype)
    return y


def unblock_pixels(y: jax.Array, width: int, strides: Sequence[int]) -> jax.Array:
  """The map of a chain of ``PixelTransposeConv(depth_to_space=False)`` layers.

  ``y``: ``(N, H, W * prod(s*s), C)`` after layers of ``strides`` (first layer first)
  applied to an ``(N, H, W, .)`` map (pixel-wise layers between them allowed). Returns
  ``(N, H * prod(s), W * prod(s), C)``: the output of the same layers with their
  depth-to-space, by one transpose of the last (smallest) tensor.
  """
  n, h, wb, c = y.shape
  blocks = int(np.prod([s * s for s in strides]))
  if wb != width * blocks:
    raise ValueError(f"unblock_pixels: width {wb} is not {width} x {blocks} (strides {tuple(strides)}).")
  dims = [n, h, width]
  for s in strides:
    dims += [s, s]
  y = y.reshape(*dims, c)
  levels = len(strides)
  rows = [3 + 2 * i for i in range(levels)]
  cols = [4 + 2 * i for i in range(levels)]
  y = y.transpose(0, 1, *rows, 2, *cols, 3 + 2 * levels)
  f = int(np.prod(strides))
  return y.reshape(n, h * f, width * f, c)


def _shifted_products(xp: jax.Array, kernel: jax.Array, k: int, d: int, oh: int,
                      ow: int) -> jax.Array:
  """Stride-1 depthwise correlation of padded ``xp`` with a ``(k, k, 1, C)`` kernel."""
  out = None
  for i in range(k):
    for j in range(k):
      term = xp[:, i * d:i * d + oh, j * d:j * d + ow] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _same_pad(x: jax.Array, p: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_shifted(x: jax.Array, kernel: jax.Array, k: int, d: int) -> jax.Array:
  """Stride-1 depthwise k x k convolution at dilation ``d``, same padding, as k*k shifted
  products, whose backward keeps only ``x`` and the kernel.

  Autodiff's backward of the shifted products materialised the k*k padded products of
  the input gradient at once and kept shifted slices for the kernel gradient (FastFCN's
  JPU on an AVX2 machine, where its dilated depthwise convolutions take this path: training
  temporaries 217 MB, 97 with every one on oneDNN). Here the input gradient is the same
  shifted products over the padded output gradient with the kernel flipped, and the kernel
  gradient k*k sums over the padded input's slices times the output gradient: 217 -> 170
  MB, step time unchanged (``inproc_ab.py --change=dw_vjp``; 113 MB since those sums run one
  tap at a time, ``_shifted_kernel_grad``). Sums in the arrays' dtype, as autodiff's.
  """
  return _depthwise_forward(x, kernel, k, d)


def _depthwise_forward(x: jax.Array, kernel: jax.Array, k: int, d: int) -> jax.Array:
  """``depthwise_shifted``'s value: oneDNN's depthwise kernel (``jit_dw``) where the oneDNN
  convolutions run and it has one for this forward (2-3x faster than the shifted products:
  1x32x32x256 rate 2 0.079 vs 0.252 ms, ``experiments/performance/dw_native_grad.py``),
  else the shifted products. Only the
  value: the backward is ``depthwise_shifted``'s either way."""
  p = d * (k - 1) // 2
  if (x.dtype == kernel.dtype == jnp.float32 and onednn_active()
      and onednn_depthwise_forward_kernel(tuple(x.shape), k, 1, d, p)):
    return conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)), rhs_dilation=(d, d),
                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                feature_group_count=x.shape[-1])
  return _shifted_products(_same_pad(x, p), kernel, k, d, x.shape[1], x.shape[2])


def _depthwise_shifted_fwd(x, kernel, k, d):
  return depthwise_shifted(x, kernel, k, d), (x, kernel)


def _depthwise_shifted_bwd(k, d, res, g):
  x, kernel = res
  p, h, w = d * (k - 1) // 2, x.shape[1], x.shape[2]
  dx = _shifted_products(_same_pad(g, p), kernel[::-1, ::-1], k, d, h, w)
  if x.dtype == g.dtype == jnp.float32 and dw_grad_native_active():
    dk = depthwise_kernel_grad_native(x, g, k, d)
  else:
    dk = _shifted_kernel_grad(_same_pad(x, p), g, k, d)
  return dx.astype(x.dtype), dk[:, :, None, :].astype(kernel.dtype)


def dw_grad_native_active() -> bool:
  """Whether ``depthwise_shifted``'s kernel gradient, traced now, is ``jseg.native``'s
  kernel (``JSEG_DW_GRAD`` = ``auto`` | ``native`` | ``xla``; ``auto``: where the oneDNN
  convolutions run, as ``JSEG_BN``)."""
  return native.kernels_active("JSEG_DW_GRAD", onednn_active)


def depthwise_kernel_grad_native(x: jax.Array, g: jax.Array, k: int, d: int) -> jax.Array:
  """``(k, k, C)`` kernel gradient of the stride-1 depthwise k x k convolution at dilation
  ``d`` with same padding, for float32 NHWC input ``x`` and output gradient ``g``: one
  ``jseg.native`` call (``JsegDwKernelGrad``).

  The same sums as ``_shifted_kernel_grad`` (rows summed in float32, then in double; equal
  to it within float32 rounding), as one kernel where XLA compiles 16-19 per layer (a
  slice and a reduction per tap): DeepLab v3+'s six dilated depthwise layers on an AVX2
  machine added 95 kernels to its gradient program and 34-46 MB to its compile peak
  (``experiments/performance/README.md``, nineteenth pass).
  """
  if x.shape != g.shape or x.ndim != 4:
    raise ValueError(f"depthwise_kernel_grad_native needs NHWC x and g of one shape; got "
                     f"{x.shape} and {g.shape}.")
  if native.onednn() is None:  # builds and registers the kernels once per process
    raise RuntimeError(f"The jseg.native extension is unavailable: {native.onednn_error()}")
  c = x.shape[-1]
  dk = jax.ffi.ffi_call("JsegDwKernelGrad", jax.ShapeDtypeStruct((k * k, c), jnp.float32))(
      x, g, k=np.int64(k), d=np.int64(d))
  return dk.reshape(k, k, c)


def _shifted_kernel_grad(xp: jax.Array, g: jax.Array, k: int, d: int) -> jax.Array:
  """``(k, k, C)`` sums over images and pixels of the padded input's tap slices times the
  output gradient; one tap per loop iteration where a slice is >= 2 MiB.

  Written out as k*k slice-times-``g`` sums, XLA:CPU materialises every tap's slice at once
  (its YNNPACK reduction takes no slice of a pad as an operand): 24 MB of temporaries at
  FastFCN's 4x32x32x192 JPU maps, at any rate. In a loop one slice exists at a time: 6.4-9.8
  MB, same bits, per layer as fast or faster (rates 2-8); FastFCN's training temporaries 170
  -> 113 MB (``inproc_ab.py --change=dk_loop``). Smaller slices keep the written-out sums,
  which XLA runs side by side: DeepLab v3+'s (<= 1 MiB each) took 3-8% longer in the loop.
  """
  n, h, w, c = g.shape
  if g.size * g.dtype.itemsize < 2**21:
    return jnp.stack([
        jnp.stack([jnp.sum(xp[:, i * d:i * d + h, j * d:j * d + w] * g, axis=(0, 1, 2))
                   for j in range(k)]) for i in range(k)])

  def tap(t, acc):
    s = jax.lax.dynamic_slice(xp, (0, (t // k) * d, (t % k) * d, 0), (n, h, w, c))
    return acc.at[t].set(jnp.sum(s * g, axis=(0, 1, 2)))

  return jax.lax.fori_loop(0, k * k, tap, jnp.zeros((k * k, c), g.dtype)).reshape(k, k, c)


depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def depthwise_on_onednn(x_shape: tuple[int, ...], k: int, s: int, d: int, p: int) -> bool:
  """Whether a float32 ``DepthwiseConv`` runs as oneDNN's grouped convolution (where the
  oneDNN convolutions run): where oneDNN has no GEMM fallback for it or its gradients and,
  for the stride-1 odd kernels ``depthwise_shifted`` covers while its kernel gradient is
  ``jseg.native``'s, only where oneDNN has its depthwise kernels in every direction
  (dilation 1). Dilated ones, whose gradients are oneDNN's generic direct kernels, took
  3-4.5x as long as the shifted products on AVX-512 (forward and both gradients, 4x32x32x256
  rate 2: 10.18 vs 2.67 ms; 4x16x16x256 rate 6: 2.15 vs 0.48;
  ``experiments/performance/dw_native_grad.py``); their forward stays oneDNN's where it has a
  depthwise kernel for it (``_depthwise_forward``)."""
  if not onednn_depthwise_without_gemm(x_shape, k, s, d, p):
    return False
  if s == 1 and k % 2 == 1 and dw_grad_native_active():
    return onednn_depthwise_kernels(x_shape, k, s, d, p)
  return True


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution as a sum of k*k shifted elementwise products.

  Same function (and the same ``(k, k, 1, C)`` kernel layout) as
  ``nn.Conv(C, (k, k), feature_group_count=C)`` with symmetric padding
  ``dilation*(k-1)//2``; 4-8x faster than the grouped convolution on XLA:CPU. When
  convolutions go to oneDNN (``jseg.models.conv``) it is that grouped convolution, which
  oneDNN runs another 30-100x faster, where oneDNN has its depthwise kernels for the
  geometry and both gradients (``depthwise_on_onednn``; dilated ones are
  ``depthwise_shifted``, with oneDNN's forward where it has a depthwise kernel for it and
  ``jseg.native``'s kernel gradient). Stride-1 shifted products have their own backward
  (``depthwise_shifted``); strided ones autodiff's.
  """

  kernel: int = 3
  stride: int = 1
  dilation: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, d, s = self.kernel, self.dilation, self.stride
    n, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
    kernel = kernel.astype(self.dtype)
    p = d * (k - 1) // 2
    if (x.dtype == kernel.dtype == jnp.float32 and onednn_active()
        and depthwise_on_onednn(tuple(x.shape), k, s, d, p)):
      out = conv_general_dilated(
          x, kernel, (s, s), ((p, p), (p, p)), rhs_dilation=(d, d),
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    elif s == 1 and k % 2 == 1:
      out = depthwise_shifted(x, kernel, k, d)
    else:
      xp = _same_pad(x, p)
      oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
      ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
      out = None
      for i in range(k):
        for j in range(k):
          sl = xp[:, i * d : i * d + s * (oh - 1) + 1 : s, j * d : j * d + s * (ow - 1) + 1 : s]
          term = sl * kernel[i, j, 0]
          out = term if out is None else out + term
    if self.use_bias:
      out = out + self.param("bias", nn.initializers.zeros, (c,), jnp.float32).astype(self.dtype)
    return out


class DepthwiseKernel(nn.Module):
  """The ``kernel`` parameter ``DepthwiseConv(kernel)`` creates under the same name (same
  path, ``(k, k, 1, channels)`` shape, initialiser and key), for a depthwise convolution
  applied as a function of its kernel (``conv.as_function``, ``norm.BatchNorm``'s ``then``)."""

  kernel: int = 3

  @nn.compact
  def __call__(self, channels: int) -> jax.Array:
    return self.param("kernel", nn.initializers.lecun_normal(),
                      (self.kernel, self.kernel, 1, channels), jnp.float32)


def check_min_size(x: jax.Array, min_size: int, model: str) -> None:
  """Raises a clear error when the spatial size is below a network's minimum."""
  h, w = x.shape[1:3]
  if h < min_size or w < min_size:
    raise ValueError(
        f"{model} needs inputs of at least {min_size}x{min_size} pixels; got {h}x{w}."
    )


def check_nhwc(x: jax.Array, model: str) -> None:
  """Raises when the input is not a 4-D NHWC batch."""
  if x.ndim != 4:
    raise ValueError(f"{model} expects NHWC images (4-D); got shape {tuple(x.shape)}.")
