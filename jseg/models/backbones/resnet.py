"""ResNet-18/34/50/101/152 with per-stage dilation (He et al., CVPR 2016).

Output stride 32 is the classification network; 16 and 8 replace the strides
of the last one or two stages by dilation (Chen et al., DeepLab; Zhao et al.,
PSPNet). Every block of a dilated stage uses the stage's rate (times the
multi-grid factor in layer4), as PSPNet and DeepLab v3 do; torchvision keeps
the previous rate in a stage's first block, which changes no weight shapes. Submodule
names mirror torchvision (``layer3_1/conv2`` is ``layer3.1.conv2``) so
ImageNet weights convert by name. ``width`` scales every stage (64 is the
paper's), which makes tiny CPU variants a config choice.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jseg.models.conv import Conv, then_conv
from jseg.models.layers import max_pool_3x3_s2, pad_same
from jseg.models.norm import BatchNorm, conv_bn_chain

Dtype = Any

STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _bn(name: str, train: bool, dtype: Dtype, zero_init: bool = False,
        relu: bool = False) -> BatchNorm:
  """BatchNorm (then ReLU when ``relu``: fused into one pass on CPU, ``norm.BatchNorm``)."""
  return BatchNorm(
      relu=relu,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
      name=name,
  )


_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, dilation: int, name: str | None, dtype: Dtype,
          **kw):
  return Conv(
      features,
      (kernel, kernel),
      strides=stride,
      padding=pad_same(kernel, dilation),
      kernel_dilation=dilation,
      use_bias=False,
      dtype=dtype,
      kernel_init=_KERNEL_INIT,
      name=name,
      **kw,
  )


def _conv_fn(in_features: int, features: int, kernel: int, stride: int, dilation: int,
             name: str, dtype: Dtype) -> tuple:
  """``_conv(...)`` as a ``conv.then_conv`` pair, its kernel param created under ``name``
  (same path, shape and init as the module's), for ``norm.conv_bn_chain``."""
  return then_conv(_conv(features, kernel, stride, dilation, name, dtype, parent=None),
                   in_features)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    shortcut = functools.partial(_shortcut, self, x, self.planes, train)
    convs = [_conv_fn(x.shape[-1], self.planes, 3, self.stride, self.dilation, "conv1", self.dtype),
             _conv_fn(self.planes, self.planes, 3, 1, self.dilation, "conv2", self.dtype)]
    bns = [_bn("bn1", train, self.dtype, relu=True),
           _bn("bn2", train, self.dtype, zero_init=True, relu=True)]
    # relu(bn2(conv2(.)) + shortcut): one pass on CPU (norm.BatchNorm's residual).
    return conv_bn_chain(x, convs, bns, train, residual=shortcut)


def _shortcut(block: nn.Module, x: jax.Array, features: int, train: bool) -> jax.Array:
  """``x``, or its 1x1 (strided) projection + BatchNorm when the block downsamples."""
  if not block.downsample:
    return x
  conv = _conv_fn(x.shape[-1], features, 1, block.stride, 1, "downsample_conv", block.dtype)
  return conv_bn_chain(x, [conv], [_bn("downsample_bn", train, block.dtype)], train)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided, dilated), 1x1 expand x4; torchvision v1.5 layout."""

  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    shortcut = functools.partial(_shortcut, self, x, self.planes * 4, train)
    p = self.planes
    convs = [_conv_fn(x.shape[-1], p, 1, 1, 1, "conv1", self.dtype),
             _conv_fn(p, p, 3, self.stride, self.dilation, "conv2", self.dtype),
             _conv_fn(p, p * 4, 1, 1, 1, "conv3", self.dtype)]
    bns = [_bn("bn1", train, self.dtype, relu=True), _bn("bn2", train, self.dtype, relu=True),
           _bn("bn3", train, self.dtype, zero_init=True, relu=True)]
    return conv_bn_chain(x, convs, bns, train, residual=shortcut)


def stage_plan(output_stride: int) -> tuple[tuple[int, int], ...]:
  """(stride, dilation) for layer1..layer4 at the given output stride."""
  if output_stride == 32:
    return ((1, 1), (2, 1), (2, 1), (2, 1))
  if output_stride == 16:
    return ((1, 1), (2, 1), (2, 1), (1, 2))
  if output_stride == 8:
    return ((1, 1), (2, 1), (1, 2), (1, 4))
  raise ValueError(f"ResNet output_stride must be 8, 16 or 32; got {output_stride}.")


class ResNet(nn.Module):
  """ResNet feature extractor returning ``stem, layer1..layer4`` by name.

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    width: channels of the stem and of layer1's 3x3 convs (64 in the paper).
    output_stride: 8, 16 or 32; strides beyond it become dilation.
    multi_grid: per-block dilation multipliers of layer4 (DeepLab v3), e.g. (1, 2, 4).
    deep_stem: three 3x3 convs instead of the 7x7 stem (PSPNet's ResNet-D stem).
  """

  depth: int = 50
  width: int = 64
  output_stride: int = 32
  multi_grid: Sequence[int] = (1, 1, 1)
  deep_stem: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    if self.depth not in STAGES:
      raise ValueError(f"ResNet depth must be one of {sorted(STAGES)}; got {self.depth}.")
    kind, counts = STAGES[self.depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    feats = {}
    if self.deep_stem:
      half = self.width // 2
      convs = [_conv_fn(x.shape[-1], half, 3, 2, 1, "stem_conv1", self.dtype),
               _conv_fn(half, half, 3, 1, 1, "stem_conv2", self.dtype),
               _conv_fn(half, self.width, 3, 1, 1, "stem_conv3", self.dtype)]
      bns = [_bn(f"stem_bn{i}", train, self.dtype, relu=True) for i in (1, 2, 3)]
    else:
      convs = [_conv_fn(x.shape[-1], self.width, 7, 2, 1, "conv1", self.dtype)]
      bns = [_bn("bn1", train, self.dtype, relu=True)]
    x = conv_bn_chain(x, convs, bns, train)
    feats["stem"] = x
    x = max_pool_3x3_s2(x)
    in_ch = self.width
    for li, ((stride, dil), count) in enumerate(zip(stage_plan(self.output_stride), counts)):
      planes = self.width * 2**li
      grid = self.multi_grid if li == 3 else (1,) * count
      for bi in range(count):
        mult = grid[bi % len(grid)]
        block = block_cls(
            planes=planes,
            stride=stride if bi == 0 else 1,
            dilation=dil * mult,
            downsample=bi == 0 and (stride != 1 or in_ch != planes * block_cls.expansion),
            dtype=self.dtype,
            name=f"layer{li + 1}_{bi}",
        )
        x = block(x, train)
        in_ch = planes * block_cls.expansion
      feats[f"layer{li + 1}"] = x
    return feats


def channels(depth: int, width: int = 64) -> dict[str, int]:
  """Channel count of each named feature for a given depth and width."""
  kind, _ = STAGES[depth]
  exp = 1 if kind == "basic" else 4
  out = {"stem": width}
  out.update({f"layer{i + 1}": width * 2**i * exp for i in range(4)})
  return out
