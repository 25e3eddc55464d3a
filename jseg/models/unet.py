"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015).

A contracting path of ``depth`` levels, each two 3x3 convolutions + ReLU and a
2x2 max pool (channels ``width * 2**level``), and an expansive path that
upsamples 2x, halves the channels, concatenates the encoder features of the
same level and applies two 3x3 convolutions; a 1x1 convolution scores the
classes (paper Fig. 1: depth 5, width 64, 2 classes, no padding).

Two variants:

- ``padding="valid"``, the paper's: unpadded convolutions, encoder features
  centre-cropped to the decoder's size before concatenation, and the
  overlap-tile strategy (Fig. 2): the input is mirror-padded so that the valid
  output covers it exactly, then cropped to the input size.
- ``padding="same"``: padded convolutions; when a pooled size was odd, the
  upsampled map is zero-padded on the bottom/right to its skip's size.

Upsampling is the paper's 2x2 "up-convolution" (``upsampling="transpose"``,
``PixelTransposeConv``) or bilinear resizing followed by a 1x1 convolution
(``"bilinear"``; the conv runs before the resize, which is the same linear
map since bilinear weights sum to one). ``batch_norm`` adds BatchNorm after
every convolution (not in the paper); ``dropout`` is applied at the end of the
contracting path as in the paper.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jseg.models.conv import Conv, conv_relu, then_conv, then_conv_of
from jseg.models.layers import (
    PixelTransposeConv,
    check_min_size,
    check_nhwc,
    max_pool_2x2,
    resize_bilinear,
)
from jseg.registry import MODELS
from jseg.models.norm import BatchNorm, conv_bn_chain

Dtype = Any

PADDINGS = ("same", "valid")
UPSAMPLINGS = ("transpose", "bilinear")


class DoubleConv(nn.Module):
  """Two 3x3 convolutions, each followed by (BatchNorm and) ReLU: a U-Net level."""

  features: int
  padding: str = "same"
  batch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array], train: bool) -> jax.Array:
    """``x``: the input, or a list of parts whose concatenation along channels is the
    input (read in place on oneDNN, ``conv.parts_function``)."""
    pad = ((1, 1), (1, 1)) if self.padding == "same" else "VALID"
    init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

    def conv(i: int, **kw: Any) -> Conv:
      return Conv(self.features, (3, 3), padding=pad, use_bias=not self.batch_norm,
                  dtype=self.dtype, kernel_init=init, name=f"conv{i}", **kw)

    def bn(i: int) -> BatchNorm:  # BatchNorm + ReLU (one pass on CPU)
      return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, relu=True, name=f"bn{i}")

    if not self.batch_norm:
      return conv_relu(conv(2, parent=None), conv_relu(conv(1, parent=None), x))
    # Training: bn1 feeds conv2 through ``then`` (on CPU its output is recomputed in the
    # backward instead of kept); evaluation: each BatchNorm folded into its convolution
    # (norm.conv_bn_chain). The kernels keep their paths, shapes and inits.
    convs = [then_conv_of(conv(1, parent=None), x),
             then_conv(conv(2, parent=None), self.features)]
    return conv_bn_chain(x, convs, [bn(1), bn(2)], train)


class Up(nn.Module):
  """2x upsampling to ``features`` channels: 2x2 up-convolution or bilinear + 1x1 conv."""

  features: int
  mode: str = "transpose"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Upsamples ``x`` 2x; ``size`` (>= 2x) is the target for the bilinear mode."""
    if self.mode == "transpose":
      return PixelTransposeConv(self.features, 2, dtype=self.dtype, name="up")(x)
    x = Conv(self.features, (1, 1), dtype=self.dtype, name="proj")(x)
    return resize_bilinear(x, size)


def match_size(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Zero-pads (bottom/right) or centre-crops ``x`` to spatial ``size``."""
  h, w = x.shape[1:3]
  th, tw = size
  if th >= h and tw >= w:
    if (th, tw) == (h, w):
      return x
    return jnp.pad(x, ((0, 0), (0, th - h), (0, tw - w), (0, 0)))
  if th <= h and tw <= w:
    top, left = (h - th) // 2, (w - tw) // 2
    return x[:, top : top + th, left : left + tw]
  raise ValueError(f"cannot match a {h}x{w} map to {th}x{tw}.")


def valid_geometry(size: int, levels: int) -> tuple[int, int]:
  """(output size, padded input size) of the valid U-Net covering ``size`` pixels.

  With ``P = levels - 1`` pools and two unpadded 3x3 convs per level, an
  output of ``2**P * b - 4 (2**P - 1)`` pixels (``b`` = bottleneck size) needs an
  input ``12 * 2**P - 8`` larger (184 for the paper's depth 5: 572 -> 388).
  """
  p = 2 ** (levels - 1)
  b = max(1, -(-(size + 4 * (p - 1)) // p))
  out = p * b - 4 * (p - 1)
  return out, out + 12 * p - 8


class UNet(nn.Module):
  """U-Net returning ``(logits, {})``.

  Attributes:
    num_classes: classes scored (2 for ISBI 2012 in the paper).
    depth: number of resolution levels (5 in the paper: 4 poolings).
    width: channels of the first level (64), doubled at every level.
    padding: ``"valid"`` (paper) or ``"same"``.
    upsampling: ``"transpose"`` (paper) or ``"bilinear"``.
    batch_norm: BatchNorm after every conv (not in the paper).
    dropout: dropout rate at the end of the contracting path (paper: yes, rate not given).
  """

  num_classes: int
  depth: int = 5
  width: int = 64
  padding: str = "same"
  upsampling: str = "transpose"
  batch_norm: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, "unet")
    if self.padding not in PADDINGS:
      raise ValueError(f"unet padding must be one of {PADDINGS}; got '{self.padding}'.")
    if self.upsampling not in UPSAMPLINGS:
      raise ValueError(f"unet upsampling must be one of {UPSAMPLINGS}; got '{self.upsampling}'.")
    if self.depth < 2:
      raise ValueError(f"unet depth must be >= 2; got {self.depth}.")
    h, w = x.shape[1:3]
    x = x.astype(self.dtype)
    if self.padding == "valid":
      (oh, ih), (ow, iw) = valid_geometry(h, self.depth), valid_geometry(w, self.depth)
      top = (ih - oh) // 2
      # Overlap-tile: mirror the image into the margin the valid convolutions eat.
      x = jnp.pad(x, ((0, 0), (top, ih - h - top), (top, iw - w - top), (0, 0)), mode="reflect")
    else:
      check_min_size(x, 2 ** (self.depth - 1), "unet")
    skips = []
    for level in range(self.depth):
      if level > 0:
        skips.append(x)
        x = max_pool_2x2(x)
      x = DoubleConv(
          self.width * 2**level, self.padding, self.batch_norm, self.dtype, name=f"enc{level}"
      )(x, train)
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(self.depth - 1)):
      skip = skips[level]
      up_size = tuple(2 * s for s in x.shape[1:3]) if self.padding == "valid" else skip.shape[1:3]
      x = Up(self.width * 2**level, self.upsampling, self.dtype, name=f"up{level}")(x, up_size)
      x = match_size(x, up_size)
      x = [match_size(skip, x.shape[1:3]), x]  # concatenated (in place on oneDNN)
      x = DoubleConv(
          self.width * 2**level, self.padding, self.batch_norm, self.dtype, name=f"dec{level}"
      )(x, train)
    x = Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)
    return x[:, :h, :w], {}


@MODELS.register("unet")
def build_unet(cfg: ml_collections.ConfigDict) -> UNet:
  return UNet(
      num_classes=cfg.num_classes,
      depth=cfg.get("depth", 5),
      width=cfg.get("width", 64),
      padding=cfg.get("padding", "same"),
      upsampling=cfg.get("upsampling", "transpose"),
      batch_norm=cfg.get("batch_norm", True),
      dropout=cfg.get("dropout", 0.0),
      dtype=jnp.dtype(cfg.get("dtype", "float32")),
  )
