"""PSPNet: Pyramid Scene Parsing Network (Zhao et al., CVPR 2017).

A dilated ResNet (output stride 8 or 16) feeds the pyramid pooling module:
the feature map is average-pooled to 1x1, 2x2, 3x3 and 6x6 bins, each bin
map is reduced to ``C/len(bins)`` channels by a 1x1 conv, upsampled back and
concatenated with the features (paper Fig. 3). A 3x3 conv and a 1x1
classifier follow. During training an auxiliary FCN head on ``layer3``
adds deep supervision (paper Sec. 3.3, loss weight 0.4 in the config).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jseg.models.backbones.resnet import ResNet
from jseg.models.conv import Conv
from jseg.models.layers import (
    ConvBNReLU,
    adaptive_avg_pools,
    check_min_size,
    check_nhwc,
    resize_bilinear,
    resize_logits,
)
from jseg.registry import MODELS

Dtype = Any


class PyramidPooling(nn.Module):
  """Pyramid pooling module (PSPNet Sec. 3.2): pool, reduce, upsample, concat."""

  bins: Sequence[int] = (1, 2, 3, 6)
  reduction_features: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    size = x.shape[1:3]
    outs = [x]
    for b, y in zip(self.bins, adaptive_avg_pools(x, self.bins)):
      y = ConvBNReLU(self.reduction_features, kernel=1, dtype=self.dtype, name=f"bin{b}")(y, train)
      outs.append(resize_bilinear(y, size))
    return jnp.concatenate(outs, axis=-1)


class FCNHead(nn.Module):
  """3x3 ConvBNReLU, dropout, 1x1 classifier: PSPNet's auxiliary head."""

  num_classes: int
  features: int = 256
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = ConvBNReLU(self.features, dtype=self.dtype, name="conv")(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)


class PSPNet(nn.Module):
  """PSPNet on a dilated ResNet; returns ``(logits, {"aux": aux_logits})``."""

  num_classes: int
  depth: int = 50
  width: int = 64
  output_stride: int = 8
  bins: Sequence[int] = (1, 2, 3, 6)
  head_features: int = 512
  aux_head: bool = True
  aux_features: int = 256
  dropout: float = 0.1
  deep_stem: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, "pspnet")
    check_min_size(x, self.output_stride, "pspnet")
    size = x.shape[1:3]
    feats = ResNet(
        depth=self.depth,
        width=self.width,
        output_stride=self.output_stride,
        deep_stem=self.deep_stem,
        dtype=self.dtype,
        name="backbone",
    )(x.astype(self.dtype), train)
    top = feats["layer4"]
    y = PyramidPooling(
        self.bins, top.shape[-1] // len(self.bins), dtype=self.dtype, name="ppm"
    )(top, train)
    y = FCNHead(self.num_classes, self.head_features, self.dropout, self.dtype, name="head")(y, train)
    aux = {}
    if train and self.aux_head:
      a = FCNHead(
          self.num_classes, self.aux_features, self.dropout, self.dtype, name="aux_head"
      )(feats["layer3"], train)
      aux["aux"] = resize_logits(a, size, train)
    elif self.aux_head and self.is_initializing():
      # Create the auxiliary head's parameters even when initialised in eval mode.
      FCNHead(self.num_classes, self.aux_features, self.dropout, self.dtype, name="aux_head")(
          feats["layer3"], False
      )
    return resize_logits(y, size, train), aux


@MODELS.register("pspnet")
def build_pspnet(cfg: ml_collections.ConfigDict) -> PSPNet:
  return PSPNet(
      num_classes=cfg.num_classes,
      depth=cfg.get("depth", 50),
      width=cfg.get("width", 64),
      output_stride=cfg.get("output_stride", 8),
      bins=tuple(cfg.get("bins", (1, 2, 3, 6))),
      head_features=cfg.get("head_features", 512),
      aux_head=cfg.get("aux_head", True),
      aux_features=cfg.get("aux_features", 256),
      dropout=cfg.get("dropout", 0.1),
      deep_stem=cfg.get("deep_stem", False),
      dtype=jnp.dtype(cfg.get("dtype", "float32")),
  )
