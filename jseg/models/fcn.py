"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer & Darrell, CVPR 2015).

VGG-16 with fc6/fc7 as convolutions scores 21 (``num_classes``) classes at
stride 32 (``score_fr``). FCN-32s upsamples that map 32x with one transposed
convolution. FCN-16s upsamples it 2x, adds a 1x1 score of pool4 and upsamples
the sum 16x; FCN-8s adds pool3's score as well and upsamples 8x (paper Sec. 4.2,
Fig. 3). Every upsampling is a transposed convolution with kernel ``2s`` and
stride ``s`` initialised to bilinear interpolation (Sec. 3.3), learnable.

As in the reference Caffe network, ``conv1_1`` pads by 100 pixels and pools
in ceil mode, so fc6's 7x7 window fits any input; the coarse maps are then
cropped back into register with the input. The crop offsets follow from the
geometry alone (not from the width): a map with stride ``S`` and offset ``o``
has its pixel ``i`` centred on input pixel ``S*i + o``; conv1_1 gives offset
-99, pool ``k`` adds ``2**(k-2)``, fc6 adds 3 strides, and a transposed conv
with kernel ``k`` and stride ``s`` maps ``(S, o)`` to ``(S/s, o - S(k-1)/(2s))``.
That gives pool4 crop 5, pool3 crop 9 and final crops 19/27/31 for 32s/16s/8s,
the values of the Caffe prototxts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from jseg.models.backbones.vgg import VGG
from jseg.models.conv import Conv
from jseg.models.layers import check_nhwc
from jseg.registry import MODELS

Dtype = Any

FIRST_PADDING = 100
# (crop of score_pool4, crop of score_pool3, final crop) per variant, derived above.
POOL4_CROP, POOL3_CROP = 5, 9
FINAL_CROP = {32: 19, 16: 27, 8: 31}


def bilinear_kernel(size: int, in_features: int, out_features: int) -> np.ndarray:
  """``(size, size, in, out)`` kernel doing bilinear upsampling channel by channel.

  The FCN reference ``upsample_filt``: ``(1 - |i - c|/f)(1 - |j - c|/f)`` with
  ``f = ceil(size/2)``, ``c = f - 1`` (odd size) or ``f - 0.5`` (even), placed on
  the diagonal ``in == out`` and zero elsewhere.
  """
  f = (size + 1) // 2
  c = f - 1 if size % 2 == 1 else f - 0.5
  og = np.arange(size, dtype=np.float64)
  filt1 = 1 - np.abs(og - c) / f
  filt = np.outer(filt1, filt1).astype(np.float32)
  k = np.zeros((size, size, in_features, out_features), np.float32)
  for i in range(min(in_features, out_features)):
    k[:, :, i, i] = filt
  return k


def phase_transpose_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Transposed conv with kernel ``2s`` and stride ``s`` (no padding), sub-pixel form.

  Same function as ``torch.nn.ConvTranspose2d(C, O, 2s, stride=s)`` with
  ``kernel[a, b, c, o] = weight[c, o, a, b]``: output ``(H+1)s x (W+1)s``. Each of
  the ``s*s`` output phases is a 2x2 convolution of the input padded by one,
  so the whole op is one ordinary conv to ``s*s*O`` channels followed by
  depth-to-space. Its kernel gradient is an ordinary convolution too, unlike
  the rhs-dilated one of ``nn.ConvTranspose`` that XLA:CPU runs slowly
  (PERF_NOTES). Derivation: ``y[s q + a] = x[q] W[a] + x[q-1] W[s + a]``.
  """
  s = stride
  n, h, w, c = x.shape
  if kernel.shape[:2] != (2 * s, 2 * s):
    raise ValueError(f"phase_transpose_conv needs a {2 * s}x{2 * s} kernel; got {kernel.shape}.")
  o = kernel.shape[-1]
  # kernel row 2s: (tap t', phase a) with row = s*t' + a; tap t on the padded input is 1 - t'.
  kp = kernel.reshape(2, s, 2, s, c, o)[::-1, :, ::-1]
  kp = kp.transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, c, s * s * o)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = jax.lax.conv_general_dilated(
      xp, kp, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  y = y.reshape(n, h + 1, w + 1, s, s, o).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(n, (h + 1) * s, (w + 1) * s, o)


class BilinearUpsample(nn.Module):
  """FCN's learnable ``2s x 2s`` stride-``s`` transposed conv, initialised bilinear."""

  features: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = 2 * self.stride
    c = x.shape[-1]
    kernel = self.param(
        "kernel",
        lambda _, shape: jnp.asarray(bilinear_kernel(k, c, self.features)),
        (k, k, c, self.features),
    )
    return phase_transpose_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)


def _crop(x: jax.Array, offset: int, size: tuple[int, int], what: str) -> jax.Array:
  h, w = size
  if x.shape[1] < offset + h or x.shape[2] < offset + w:
    raise ValueError(
        f"FCN crop of {what}: map {x.shape[1]}x{x.shape[2]} is too small for offset "
        f"{offset} and size {h}x{w}."
    )
  return x[:, offset : offset + h, offset : offset + w]


class FCN(nn.Module):
  """FCN-{32,16,8}s on VGG-16; returns ``(logits, {})``.

  Attributes:
    num_classes: classes scored (21 for PASCAL VOC in the paper).
    variant: 32, 16 or 8 (the output stride of the coarsest skip used).
    width: VGG base width (64 in the paper).
    fc_features: channels of fc6/fc7 (4096).
    dropout: dropout after fc6 and fc7 (0.5).
    batch_norm: use a VGG-16-BN backbone (not in the paper).
  """

  num_classes: int
  variant: int = 8
  width: int = 64
  fc_features: int = 4096
  dropout: float = 0.5
  batch_norm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, f"fcn{self.variant}s")
    if self.variant not in FINAL_CROP:
      raise ValueError(f"FCN variant must be one of {sorted(FINAL_CROP)}; got {self.variant}.")
    size = x.shape[1:3]
    feats = VGG(
        depth=16,
        width=self.width,
        batch_norm=self.batch_norm,
        ceil_mode=True,
        first_padding=FIRST_PADDING,
        fc=True,
        fc_features=self.fc_features,
        fc_dropout=self.dropout,
        dtype=self.dtype,
        name="backbone",
    )(x.astype(self.dtype), train)
    k = self.num_classes
    score = _score(k, "score_fr", self.dtype)(feats["fc7"])
    if self.variant == 32:
      y = BilinearUpsample(k, 32, self.dtype, name="upscore")(score)
      return _crop(y, FINAL_CROP[32], size, "upscore"), {}
    y = BilinearUpsample(k, 2, self.dtype, name="upscore2")(score)
    p4 = _score(k, "score_pool4", self.dtype)(feats["pool4"])
    y = y + _crop(p4, POOL4_CROP, y.shape[1:3], "score_pool4")
    if self.variant == 16:
      y = BilinearUpsample(k, 16, self.dtype, name="upscore16")(y)
      return _crop(y, FINAL_CROP[16], size, "upscore16"), {}
    y = BilinearUpsample(k, 2, self.dtype, name="upscore_pool4")(y)
    p3 = _score(k, "score_pool3", self.dtype)(feats["pool3"])
    y = y + _crop(p3, POOL3_CROP, y.shape[1:3], "score_pool3")
    y = BilinearUpsample(k, 8, self.dtype, name="upscore8")(y)
    return _crop(y, FINAL_CROP[8], size, "upscore8"), {}


def _score(k: int, name: str, dtype: Dtype) -> nn.Conv:
  # Score layers start at zero, as in the reference net surgery.
  return Conv(k, (1, 1), dtype=dtype, kernel_init=nn.initializers.zeros, name=name)


def _build(cfg: ml_collections.ConfigDict, variant: int) -> FCN:
  return FCN(
      num_classes=cfg.num_classes,
      variant=variant,
      width=cfg.get("width", 64),
      fc_features=cfg.get("fc_features", 4096),
      dropout=cfg.get("dropout", 0.5),
      batch_norm=cfg.get("batch_norm", False),
      dtype=jnp.dtype(cfg.get("dtype", "float32")),
  )


@MODELS.register("fcn32s")
def build_fcn32s(cfg: ml_collections.ConfigDict) -> FCN:
  return _build(cfg, 32)


@MODELS.register("fcn16s")
def build_fcn16s(cfg: ml_collections.ConfigDict) -> FCN:
  return _build(cfg, 16)


@MODELS.register("fcn8s")
def build_fcn8s(cfg: ml_collections.ConfigDict) -> FCN:
  return _build(cfg, 8)
