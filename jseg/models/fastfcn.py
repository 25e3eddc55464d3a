"""FastFCN: Joint Pyramid Upsampling (Wu et al., arXiv 1903.11816, 2019).

Instead of dilating the last two ResNet stages (output stride 8, expensive),
FastFCN keeps the classification ResNet (output stride 32) and recovers a
stride-8 feature map with the Joint Pyramid Upsampling module (paper Sec. 3.3,
Fig. 4): each of layer2, layer3, layer4 is reduced by a 3x3 conv + BN + ReLU,
upsampled to layer2's size and concatenated; four depthwise-separable 3x3
convs with dilation 1, 2, 4, 8 (each: depthwise, BN, pointwise, BN, ReLU, as in
the reference ``encoding/nn/customize.py``) read the concatenation and their
outputs are concatenated again (4 x 512 = 2048 channels at full width).

A segmentation head follows: ``fcn`` (3x3 conv, dropout, 1x1; the paper's
FCN-JPU), ``psp`` (pyramid pooling, PSPNet) or ``aspp`` (DeepLab v3 ASPP).
``jpu=False`` gives the dilated-ResNet baseline with the same head, for the
paper's JPU-vs-dilated comparison. An auxiliary FCN head on layer3 adds deep
supervision during training, as in the reference training scripts (``--aux``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jseg.models.backbones.resnet import ResNet
from jseg.models.conv import Conv
from jseg.models.deeplab import ASPP
from jseg.models.layers import (
    ConvBNReLU,
    DepthwiseConv,
    check_min_size,
    check_nhwc,
    resize_bilinear,
    resize_logits,
)
from jseg.models.pspnet import FCNHead, PyramidHead, PyramidPooling
from jseg.registry import MODELS
from jseg.models.norm import BatchNorm

Dtype = Any

HEADS = ("fcn", "psp", "aspp")


def _bn(name: str, train: bool, dtype: Dtype, relu: bool = False) -> BatchNorm:
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                   relu=relu, name=name)


class JPUBranch(nn.Module):
  """Dilated depthwise-separable conv of the JPU: depthwise, BN, pointwise, BN, ReLU."""

  features: int
  dilation: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = DepthwiseConv(3, dilation=self.dilation, dtype=self.dtype, name="depthwise")(x)
    x = _bn("depthwise_bn", train, self.dtype)(x)
    x = Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="pointwise")(x)
    return _bn("bn", train, self.dtype, relu=True)(x)


class JPU(nn.Module):
  """Joint Pyramid Upsampling (FastFCN Sec. 3.3): stride-8 features from strides 8/16/32."""

  features: int = 512
  dilations: Sequence[int] = (1, 2, 4, 8)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c3: jax.Array, c4: jax.Array, c5: jax.Array, train: bool) -> jax.Array:
    f, dt = self.features, self.dtype
    size = c3.shape[1:3]
    maps = [
        resize_bilinear(ConvBNReLU(f, dtype=dt, name="conv5")(c5, train), size),
        resize_bilinear(ConvBNReLU(f, dtype=dt, name="conv4")(c4, train), size),
        ConvBNReLU(f, dtype=dt, name="conv3")(c3, train),
    ]
    y = jnp.concatenate(maps, axis=-1)
    outs = [JPUBranch(f, d, dt, name=f"dilation{d}")(y, train) for d in self.dilations]
    return jnp.concatenate(outs, axis=-1)


class FastFCN(nn.Module):
  """ResNet + JPU (or a dilated ResNet) + FCN/PSP/ASPP head; returns ``(logits, aux)``.

  Attributes:
    depth, width: ResNet depth and stem width.
    jpu: use the JPU on a stride-32 ResNet; False dilates the ResNet instead.
    output_stride: stride of the dilated baseline (8 or 16); the JPU gives 8.
    jpu_features: channels of each JPU branch (512; the head sees 4x this).
    head: ``"fcn"``, ``"psp"`` or ``"aspp"``.
    head_features: channels of the head's 3x3 conv (input/4 in the reference).
  """

  num_classes: int
  depth: int = 101
  width: int = 64
  jpu: bool = True
  output_stride: int = 8
  jpu_features: int = 512
  head: str = "fcn"
  head_features: int = 512
  aux_head: bool = True
  aux_features: int = 256
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, "fastfcn")
    if self.head not in HEADS:
      raise ValueError(f"fastfcn head must be one of {HEADS}; got {self.head!r}.")
    check_min_size(x, 32 if self.jpu else self.output_stride, "fastfcn")
    size = x.shape[1:3]
    dt = self.dtype
    feats = ResNet(depth=self.depth, width=self.width,
                   output_stride=32 if self.jpu else self.output_stride, dtype=dt,
                   name="backbone")(x.astype(dt), train)
    if self.jpu:
      top = JPU(self.jpu_features, dtype=dt, name="jpu")(
          feats["layer2"], feats["layer3"], feats["layer4"], train)
    else:
      top = feats["layer4"]
    if self.head == "fcn":
      y = FCNHead(self.num_classes, self.head_features, self.dropout, dt, name="head")(top, train)
    elif self.head == "psp":
      # PSPNet's head in parts (pspnet.PyramidHead): same parameters as FCNHead on the
      # upsampled concatenation, without it.
      bins = PyramidPooling((1, 2, 3, 6), top.shape[-1] // 4, dtype=dt, concat=False,
                            name="ppm")(top, train)
      y = PyramidHead(self.num_classes, self.head_features, self.dropout, dt,
                      name="head")(top, bins, train)
    else:
      stride = 8 if self.jpu else self.output_stride
      rates = tuple(r * 16 // stride for r in (6, 12, 18))
      y = ASPP(256, rates, dropout=self.dropout, dtype=dt, name="aspp")(top, train)
      y = Conv(self.num_classes, (1, 1), dtype=dt, name="classifier")(y)
    aux = {}
    if self.aux_head and (train or self.is_initializing()):
      # Created at initialisation even in eval mode so train-time variables exist.
      a = FCNHead(self.num_classes, self.aux_features, self.dropout, dt, name="aux_head")(
          feats["layer3"], train)
      if train:
        aux["aux"] = resize_logits(a, size, train).astype(jnp.float32)
    return resize_logits(y, size, train).astype(jnp.float32), aux


@MODELS.register("fastfcn")
def build_fastfcn(cfg: ml_collections.ConfigDict) -> FastFCN:
  jpu = cfg.get("jpu", True)
  os_ = cfg.get("output_stride", 8)
  if os_ not in ((8,) if jpu else (8, 16)):
    raise ValueError(
        f"model.output_stride must be 8 with the JPU (8 or 16 without); got {os_}.")
  if cfg.get("head", "fcn") not in HEADS:
    raise ValueError(f"model.head must be one of {HEADS}; got {cfg.get('head')!r}.")
  return FastFCN(
      num_classes=cfg.num_classes,
      depth=cfg.get("depth", 101),
      width=cfg.get("width", 64),
      jpu=jpu,
      output_stride=os_,
      jpu_features=cfg.get("jpu_features", 512),
      head=cfg.get("head", "fcn"),
      head_features=cfg.get("head_features", 512),
      aux_head=cfg.get("aux_head", True),
      aux_features=cfg.get("aux_features", 256),
      dropout=cfg.get("dropout", 0.1),
      dtype=jnp.dtype(cfg.get("dtype", "float32")),
  )
