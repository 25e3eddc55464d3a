"""DeepLab v1, v2, v3 and v3+ (Chen et al., 2015-2018).

- ``deeplabv1``: VGG-16 made atrous (pool4/pool5 stride 1, conv5 rate 2, output
  stride 8) with the LargeFOV head: fc6 as a 3x3 conv with rate 12 and 1024
  channels, fc7 1x1, fc8 classifier (ICLR 2015, Sec. 3.1 and Table 2).
- ``deeplabv2``: dilated ResNet-101 (output stride 8) and ASPP-L: four 3x3
  classifiers with rates 6, 12, 18, 24 whose outputs are summed (TPAMI 2017,
  Sec. 3.3 and Fig. 7).
- ``deeplabv3``: ResNet-101 with multi-grid (1, 2, 4) in the last stage and ASPP
  with BatchNorm: a 1x1 conv, three 3x3 atrous convs and image-level pooling,
  concatenated and projected by a 1x1 conv (arXiv 1706.05587, Sec. 3.3).
  ``output_stride`` (training) and ``eval_output_stride`` are separate, so the
  paper's "train at 16, evaluate at 8" is a config choice; ASPP rates are given
  at stride 16 and doubled at stride 8.
- ``deeplabv3plus``: the v3 encoder on aligned Xception-65 (or ResNet) plus a
  decoder that upsamples the ASPP output x4, concatenates 48-channel projected
  low-level features (stride 4) and refines with two 3x3 convs; ASPP and
  decoder convs are depthwise-separable (ECCV 2018, Sec. 3.1-3.2, Fig. 2).

Every network returns logits at the input resolution (bilinear upsampling,
as in all four papers) and an empty aux dict.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jseg.models.backbones.resnet import ResNet
from jseg.models.backbones.xception import SeparableConv, Xception65, separable_chain
from jseg.models.conv import Conv, conv_relu
from jseg.models.layers import (
    max_pool_same,
    ConvBNReLU,
    check_min_size,
    check_nhwc,
    max_pool_3x3_s2,
    pad_same,
    resize_bilinear,
    resize_logits,
)
from jseg.registry import MODELS

Dtype = Any

# (convs, dilation, pool) per VGG-16 stage in DeepLab v1: pools 1-3 are 3x3
# stride 2 (padding 1), pools 4-5 keep stride 1, conv5 uses rate 2.
_VGG_STAGES = ((2, 1, 2), (2, 1, 2), (3, 1, 2), (3, 1, 1), (3, 2, 1))
# He initialisation for the ReLU convs trained from scratch (as the shared VGG backbone).
_he = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _classifier(num_classes: int, name: str, dtype: Dtype, kernel: int = 1, dilation: int = 1):
  return Conv(
      num_classes, (kernel, kernel), padding=pad_same(kernel, dilation),
      kernel_dilation=dilation, kernel_init=nn.initializers.normal(0.01), dtype=dtype, name=name,
  )


class DeepLabVGG(nn.Module):
  """VGG-16 convolutions with DeepLab v1's atrous changes (output stride 8).

  Layer names follow Caffe's (``conv1_1`` ... ``conv5_3``, as the shared
  ``backbones/vgg.py``) so VGG-16 weights convert by name. That backbone has
  2x2 pools and no atrous option, hence this trunk. ``width`` is conv1's
  channel count (64 in VGG-16); later stages use 2x, 4x, 8x, 8x.
  """

  width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mult = (1, 2, 4, 8, 8)
    for s, ((convs, dil, pool), m) in enumerate(zip(_VGG_STAGES, mult)):
      for c in range(convs):
        x = conv_relu(Conv(
            self.width * m, (3, 3), padding=pad_same(3, dil), kernel_dilation=dil,
            kernel_init=_he, dtype=self.dtype, name=f"conv{s + 1}_{c + 1}", parent=None,
        ), x)
      x = max_pool_3x3_s2(x) if pool == 2 else max_pool_same(x, 3)
    return x


class DeepLabV1(nn.Module):
  """DeepLab-LargeFOV (DeepLab v1) without the CRF post-processing."""

  num_classes: int
  width: int = 64
  fc_features: int = 1024
  fc6_dilation: int = 12
  dropout: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, "deeplabv1")
    check_min_size(x, 8, "deeplabv1")
    size = x.shape[1:3]
    y = DeepLabVGG(self.width, self.dtype, name="vgg")(x.astype(self.dtype))
    y = conv_relu(Conv(self.fc_features, (3, 3), padding=pad_same(3, self.fc6_dilation),
                       kernel_dilation=self.fc6_dilation, kernel_init=_he, dtype=self.dtype,
                       name="fc6", parent=None), y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = conv_relu(Conv(self.fc_features, (1, 1), kernel_init=_he, dtype=self.dtype, name="fc7",
                       parent=None), y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = _classifier(self.num_classes, "fc8", self.dtype)(y)
    return resize_logits(y, size, train).astype(jnp.float32), {}


class ASPPSum(nn.Module):
  """DeepLab v2's ASPP-L: parallel 3x3 atrous classifiers, outputs summed."""

  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = None
    for i, r in enumerate(self.rates):
      y = _classifier(self.num_classes, f"branch{i}", self.dtype, kernel=3, dilation=r)(x)
      out = y if out is None else out + y
    return out


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling with BN and image pooling (DeepLab v3 Sec. 3.3).

  Branches: 1x1 conv; one 3x3 atrous conv per rate (depthwise-separable when
  ``separable``, as in v3+); global average pooling + 1x1 conv, upsampled.
  All have ``features`` channels with BN + ReLU; the concatenation is
  projected by a 1x1 conv + BN + ReLU and dropout.
  """

  features: int = 256
  rates: Sequence[int] = (6, 12, 18)
  image_pooling: bool = True
  separable: bool = False
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    f, dt = self.features, self.dtype
    outs = [ConvBNReLU(f, kernel=1, dtype=dt, name="conv1x1")(x, train)]
    for i, r in enumerate(self.rates):
      if self.separable:
        y = SeparableConv(f, dilation=r, relu_inside=True, dtype=dt, name=f"atrous{i}")(x, train)
      else:
        y = ConvBNReLU(f, kernel=3, dilation=r, dtype=dt, name=f"atrous{i}")(x, train)
      outs.append(y)
    if self.image_pooling:
      g = jnp.mean(x, axis=(1, 2), keepdims=True)
      g = ConvBNReLU(f, kernel=1, dtype=dt, name="image_pool")(g, train)
      outs.append(jnp.broadcast_to(g, x.shape[:3] + (f,)))
    y = ConvBNReLU(f, kernel=1, dtype=dt, name="project")(jnp.concatenate(outs, -1), train)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class Decoder(nn.Module):
  """DeepLab v3+ decoder (ECCV 2018 Sec. 3.1): fuse upsampled ASPP output with low-level features."""

  num_classes: int
  low_level_features: int = 48
  features: int = 256
  separable: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, low: jax.Array, train: bool) -> jax.Array:
    dt = self.dtype
    low = ConvBNReLU(self.low_level_features, kernel=1, dtype=dt, name="low_level")(low, train)
    y = jnp.concatenate([resize_bilinear(x, low.shape[1:3]), low], axis=-1)
    if self.separable:  # conv0's output goes to conv1's depthwise conv through ``then``
      y = separable_chain([SeparableConv(self.features, relu_inside=True, dtype=dt,
                                         name=f"conv{i}") for i in range(2)], y, train)
    else:
      for i in range(2):
        y = ConvBNReLU(self.features, kernel=3, dtype=dt, name=f"conv{i}")(y, train)
    return Conv(self.num_classes, (1, 1), dtype=dt, name="classifier")(y)


def _check_os(value: int, field: str, allowed: Sequence[int]) -> int:
  if value not in allowed:
    raise ValueError(f"{field} must be one of {tuple(allowed)}; got {value}.")
  return value


class DeepLabV2(nn.Module):
  """DeepLab v2: dilated ResNet + ASPP-L (summed atrous classifiers)."""

  num_classes: int
  depth: int = 101
  width: int = 64
  output_stride: int = 8
  rates: Sequence[int] = (6, 12, 18, 24)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, "deeplabv2")
    check_min_size(x, self.output_stride, "deeplabv2")
    size = x.shape[1:3]
    feats = ResNet(depth=self.depth, width=self.width, output_stride=self.output_stride,
                   dtype=self.dtype, name="backbone")(x.astype(self.dtype), train)
    y = ASPPSum(self.num_classes, tuple(self.rates), self.dtype, name="aspp")(feats["layer4"])
    return resize_logits(y, size, train).astype(jnp.float32), {}


class DeepLabV3(nn.Module):
  """DeepLab v3: ResNet with multi-grid + ASPP (BN, image pooling) + 1x1 classifier.

  ``output_stride`` is used when ``train`` is True and ``eval_output_stride``
  otherwise; both share one set of parameters (dilation changes no shapes).
  ``aspp_rates`` are the rates at output stride 16 and scale as 16/stride.
  """

  num_classes: int
  depth: int = 101
  width: int = 64
  output_stride: int = 16
  eval_output_stride: int = 16
  multi_grid: Sequence[int] = (1, 2, 4)
  aspp_features: int = 256
  aspp_rates: Sequence[int] = (6, 12, 18)
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, "deeplabv3")
    os_ = self.output_stride if train else self.eval_output_stride
    check_min_size(x, os_, "deeplabv3")
    size = x.shape[1:3]
    feats = ResNet(depth=self.depth, width=self.width, output_stride=os_,
                   multi_grid=tuple(self.multi_grid), dtype=self.dtype,
                   name="backbone")(x.astype(self.dtype), train)
    rates = tuple(r * 16 // os_ for r in self.aspp_rates)
    y = ASPP(self.aspp_features, rates, dropout=self.dropout, dtype=self.dtype, name="aspp")(
        feats["layer4"], train)
    y = Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(y)
    return resize_logits(y, size, train).astype(jnp.float32), {}


class DeepLabV3Plus(nn.Module):
  """DeepLab v3+: encoder (Xception-65 or ResNet) + ASPP + low-level decoder.

  Attributes:
    backbone: ``"xception65"`` (paper) or ``"resnet"``.
    depth: ResNet depth when ``backbone == "resnet"``.
    width: Xception channel multiplier (float, 1.0 = paper) or ResNet stem width.
    middle_blocks: Xception middle-flow modules (16 = Xception-65).
    scan_middle: run them with ``nn.scan`` (compile time independent of their number).
    separable: depthwise-separable 3x3 convs in ASPP and decoder.
  """

  num_classes: int
  backbone: str = "xception65"
  depth: int = 101
  width: float = 1.0
  middle_blocks: int = 16
  scan_middle: bool = True
  output_stride: int = 16
  eval_output_stride: int = 16
  multi_grid: Sequence[int] = (1, 1, 1)
  aspp_features: int = 256
  aspp_rates: Sequence[int] = (6, 12, 18)
  decoder_features: int = 256
  low_level_features: int = 48
  separable: bool = True
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, "deeplabv3plus")
    os_ = self.output_stride if train else self.eval_output_stride
    check_min_size(x, os_, "deeplabv3plus")
    size = x.shape[1:3]
    x = x.astype(self.dtype)
    if self.backbone == "xception65":
      feats = Xception65(output_stride=os_, width=self.width, middle_blocks=self.middle_blocks,
                         multi_grid=tuple(self.multi_grid), scan_middle=self.scan_middle,
                         dtype=self.dtype, name="backbone")(x, train)
      top, low = feats["out"], feats["low_level"]
    elif self.backbone == "resnet":
      feats = ResNet(depth=self.depth, width=int(self.width), output_stride=os_,
                     multi_grid=tuple(self.multi_grid), dtype=self.dtype,
                     name="backbone")(x, train)
      top, low = feats["layer4"], feats["layer1"]
    else:
      raise ValueError(
          f"deeplabv3plus backbone must be 'xception65' or 'resnet'; got {self.backbone!r}.")
    rates = tuple(r * 16 // os_ for r in self.aspp_rates)
    y = ASPP(self.aspp_features, rates, separable=self.separable, dropout=self.dropout,
             dtype=self.dtype, name="aspp")(top, train)
    y = Decoder(self.num_classes, self.low_level_features, self.decoder_features,
                self.separable, self.dtype, name="decoder")(y, low, train)
    return resize_logits(y, size, train).astype(jnp.float32), {}


def _dtype(cfg: ml_collections.ConfigDict):
  return jnp.dtype(cfg.get("dtype", "float32"))


@MODELS.register("deeplabv1")
def build_deeplabv1(cfg: ml_collections.ConfigDict) -> DeepLabV1:
  return DeepLabV1(
      num_classes=cfg.num_classes,
      width=cfg.get("width", 64),
      fc_features=cfg.get("fc_features", 1024),
      fc6_dilation=cfg.get("fc6_dilation", 12),
      dropout=cfg.get("dropout", 0.5),
      dtype=_dtype(cfg),
  )


@MODELS.register("deeplabv2")
def build_deeplabv2(cfg: ml_collections.ConfigDict) -> DeepLabV2:
  return DeepLabV2(
      num_classes=cfg.num_classes,
      depth=cfg.get("depth", 101),
      width=cfg.get("width", 64),
      output_stride=_check_os(cfg.get("output_stride", 8), "model.output_stride", (8, 16)),
      rates=tuple(cfg.get("aspp_rates", (6, 12, 18, 24))),
      dtype=_dtype(cfg),
  )


@MODELS.register("deeplabv3")
def build_deeplabv3(cfg: ml_collections.ConfigDict) -> DeepLabV3:
  os_ = _check_os(cfg.get("output_stride", 16), "model.output_stride", (8, 16))
  return DeepLabV3(
      num_classes=cfg.num_classes,
      depth=cfg.get("depth", 101),
      width=cfg.get("width", 64),
      output_stride=os_,
      eval_output_stride=_check_os(
          cfg.get("eval_output_stride", os_), "model.eval_output_stride", (8, 16)),
      multi_grid=tuple(cfg.get("multi_grid", (1, 2, 4))),
      aspp_features=cfg.get("aspp_features", 256),
      aspp_rates=tuple(cfg.get("aspp_rates", (6, 12, 18))),
      dropout=cfg.get("dropout", 0.1),
      dtype=_dtype(cfg),
  )


@MODELS.register("deeplabv3plus")
def build_deeplabv3plus(cfg: ml_collections.ConfigDict) -> DeepLabV3Plus:
  os_ = _check_os(cfg.get("output_stride", 16), "model.output_stride", (8, 16))
  backbone = cfg.get("backbone", "xception65")
  return DeepLabV3Plus(
      num_classes=cfg.num_classes,
      backbone=backbone,
      depth=cfg.get("depth", 101),
      width=cfg.get("width", 1.0 if backbone == "xception65" else 64),
      middle_blocks=cfg.get("middle_blocks", 16),
      scan_middle=cfg.get("scan_middle", True),
      output_stride=os_,
      eval_output_stride=_check_os(
          cfg.get("eval_output_stride", os_), "model.eval_output_stride", (8, 16)),
      multi_grid=tuple(cfg.get("multi_grid", (1, 1, 1))),
      aspp_features=cfg.get("aspp_features", 256),
      aspp_rates=tuple(cfg.get("aspp_rates", (6, 12, 18))),
      decoder_features=cfg.get("decoder_features", 256),
      low_level_features=cfg.get("low_level_features", 48),
      separable=cfg.get("separable", True),
      dropout=cfg.get("dropout", 0.1),
      dtype=_dtype(cfg),
  )
