"""MobileNetV2 (Sandler et al., CVPR 2018): the light backbone for fast CPU runs.

A 3x3 stride-2 stem and 17 inverted residual blocks (paper Table 2): each
expands with a 1x1 conv (factor ``t``), filters with a 3x3 depthwise conv and
projects back with a linear 1x1 conv, with a residual connection when the
shape is kept. ``width_mult`` scales every layer (channels rounded to a
multiple of 8, as in the paper's code). Like DeepLab v3's MobileNetV2,
``output_stride`` 8 or 16 turns the last strides into dilation.

Returns ``stem`` (stride 2), ``layer1`` (4, 24 ch), ``layer2`` (8, 32 ch),
``layer3`` (16, 96 ch), ``layer4`` (32, 320 ch) and, with ``last_features``,
``last`` (the 1x1 conv to 1280 channels of the classifier network). Depthwise
convolutions use ``DepthwiseConv`` (oneDNN's grouped convolution on CPU, else shifted
products; XLA's grouped convs are slow on XLA:CPU, see PERF_NOTES).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from jseg.models.conv import Conv, as_function, then_conv
from jseg.models.layers import DepthwiseConv, DepthwiseKernel
from jseg.models.norm import BatchNorm

Dtype = Any

# (expansion t, channels c, repeats n, stride s) per group (paper Table 2), and the
# feature name given to the output of the group that ends each stride.
SETTINGS = (
    (1, 16, 1, 1, None),
    (6, 24, 2, 2, "layer1"),
    (6, 32, 3, 2, "layer2"),
    (6, 64, 4, 2, None),
    (6, 96, 3, 1, "layer3"),
    (6, 160, 3, 2, None),
    (6, 320, 1, 1, "layer4"),
)


def make_divisible(v: float, divisor: int = 8) -> int:
  """Rounds ``v`` to the nearest multiple of ``divisor`` without losing more than 10%."""
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new < 0.9 * v:
    new += divisor
  return new


def _bn(train: bool, dtype: Dtype, name: str) -> BatchNorm:
  return BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
  )


_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv1x1(features: int, dtype: Dtype, name: str | None, **kw: Any) -> nn.Conv:
  return Conv(features, (1, 1), use_bias=False, dtype=dtype, kernel_init=_FAN_OUT, name=name,
              **kw)


class InvertedResidual(nn.Module):
  """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), residual when shapes match."""

  features: int
  stride: int = 1
  expansion: int = 6
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_ch = x.shape[-1]
    hidden = in_ch * self.expansion
    depthwise = DepthwiseConv(3, self.stride, self.dilation, dtype=self.dtype, parent=None)
    # Each BatchNorm feeds the next convolution (after its ReLU6) through ``then``: on CPU
    # its output is recomputed in the backward instead of kept (norm.BatchNorm). The
    # kernels keep their paths, shapes and initialisers.
    if self.expansion != 1:
      y = _conv1x1(hidden, self.dtype, "expand_conv")(x)
      dw_k = DepthwiseKernel(3, name="dw_conv")(hidden)
      y = _bn(train, self.dtype, "expand_bn")(
          y, then=(functools.partial(_after_relu6, as_function(depthwise)), (dw_k,)))
    else:
      y = DepthwiseConv(3, self.stride, self.dilation, dtype=self.dtype, name="dw_conv")(x)
    project, k = then_conv(_conv1x1(self.features, self.dtype, "project_conv", parent=None),
                           hidden)
    y = _bn(train, self.dtype, "dw_bn")(
        y, then=(functools.partial(_after_relu6, project), k))
    y = _bn(train, self.dtype, "project_bn")(y)
    if self.stride == 1 and in_ch == self.features:
      y = x + y
    return y


def _after_relu6(fn: Callable[..., jax.Array], y: jax.Array, *args: jax.Array) -> jax.Array:
  return fn(nn.relu6(y), *args)


class MobileNetV2(nn.Module):
  """MobileNetV2 feature extractor returning ``stem, layer1..layer4`` (and ``last``).

  Attributes:
    width_mult: channel multiplier (1.0 in the paper).
    output_stride: 8, 16 or 32.
    last_features: channels of the final 1x1 conv (1280 in the paper; 0 = omit).
  """

  width_mult: float = 1.0
  output_stride: int = 32
  last_features: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"MobileNetV2 output_stride must be 8, 16 or 32; got {self.output_stride}.")
    feats = {}
    x = Conv(
        make_divisible(32 * self.width_mult),
        (3, 3),
        strides=2,
        padding=((1, 1), (1, 1)),
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_FAN_OUT,
        name="stem_conv",
    )(x.astype(self.dtype))
    x = nn.relu6(_bn(train, self.dtype, "stem_bn")(x))
    feats["stem"] = x
    current_stride, dilation, index = 2, 1, 0
    for t, c, n, s, feat_name in SETTINGS:
      features = make_divisible(c * self.width_mult)
      for i in range(n):
        stride = s if i == 0 else 1
        block_dilation = dilation
        if stride > 1 and current_stride >= self.output_stride:
          # Keep the resolution: this stride becomes dilation for the blocks after it.
          dilation *= stride
          stride = 1
        elif stride > 1:
          current_stride *= stride
        x = InvertedResidual(
            features, stride, t, block_dilation if i == 0 else dilation, self.dtype,
            name=f"block{index}",
        )(x, train)
        index += 1
      if feat_name:
        feats[feat_name] = x
    if self.last_features:
      x = _conv1x1(self.last_features, self.dtype, "last_conv")(x)
      feats["last"] = nn.relu6(_bn(train, self.dtype, "last_bn")(x))
    return feats


def channels(width_mult: float = 1.0) -> dict[str, int]:
  """Channel count of each named feature for a given width multiplier."""
  out = {"stem": make_divisible(32 * width_mult)}
  for _, c, _, _, name in SETTINGS:
    if name:
      out[name] = make_divisible(c * width_mult)
  return out
