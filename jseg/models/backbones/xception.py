"""Aligned Xception-65 with atrous depthwise-separable convolutions.

The DeepLab v3+ backbone (Chen et al., "Encoder-Decoder with Atrous Separable
Convolution for Semantic Image Segmentation", ECCV 2018, Sec. 3.3 and Fig. 4),
itself a deeper, "aligned" Xception (Chollet, CVPR 2017; Dai et al. 2017):

- entry flow: two 3x3 convs (32 stride 2, 64), then three Xception modules
  (128, 256, 728 channels) whose last separable conv has stride 2;
- middle flow: 16 identical residual modules at 728 channels;
- exit flow: a (728, 1024, 1024) module with stride 2, then a
  (1536, 1536, 2048) module without shortcut.

Every max-pool of the original Xception is a stride-2 depthwise-separable conv,
and each depthwise conv is followed by BatchNorm (and ReLU in the last module),
as in the paper and the reference TF implementation (tensorflow/models
``research/deeplab/core/xception.py``). Output stride 8 or 16 replaces the
remaining strides by atrous rates inside the separable convs.

Depthwise convs use ``jseg.models.layers.DepthwiseConv`` (oneDNN's grouped convolution
on CPU, else a sum of shifted products), never XLA's ``feature_group_count`` (slow on
XLA:CPU). The 16 middle-flow
modules are run with ``nn.scan`` (their parameters are stacked along a leading
axis of length ``middle_blocks``), which keeps compile time independent of depth.
``width`` scales every channel count (1.0 is the paper's) for tiny CPU variants.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jseg.models.conv import Conv, ConvKernel, as_function
from jseg.models.layers import DepthwiseConv, DepthwiseKernel
from jseg.models.norm import BatchNorm

Dtype = Any


def _bn(name: str, train: bool, dtype: Dtype, relu: bool = False) -> BatchNorm:
  return BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-3, dtype=dtype, relu=relu,
      name=name,
  )


class SeparableConv(nn.Module):
  """Depthwise kxk (strided, atrous) conv + BN [+ReLU], pointwise 1x1 + BN [+ReLU].

  ``relu_inside`` applies ReLU after both BNs (DeepLab's
  ``activation_fn_in_separable_conv``); otherwise the caller applies ReLU
  before the unit, as the original Xception module does. ``relu_after`` applies
  ReLU after the pointwise BN only: the next unit's leading ReLU, moved into this
  BatchNorm (one pass on CPU, and no pre-activation kept for the backward).

  The pointwise convolution runs inside the depthwise BatchNorm (``then``): in training on
  CPU that BatchNorm's output is recomputed in the backward instead of kept. A chain of
  units (``separable_chain``) hands each pointwise BatchNorm's output to the next unit's
  depthwise convolution the same way: ``depthwise_conv`` and ``after_depthwise`` are the
  unit's two halves, ``then_args`` the ``then`` that applies its depthwise convolution.
  """

  features: int
  stride: int = 1
  dilation: int = 1
  relu_inside: bool = False
  relu_after: bool = False
  dtype: Dtype = jnp.float32

  def setup(self) -> None:
    self.depthwise = DepthwiseKernel(3)
    self.pointwise = ConvKernel(self.features, (1, 1))
    bn = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-3, dtype=self.dtype)
    self.depthwise_bn = bn(relu=self.relu_inside)
    self.pointwise_bn = bn(relu=self.relu_inside or self.relu_after)

  def then_args(self, in_features: int) -> tuple[Callable[..., jax.Array], tuple[jax.Array]]:
    """``(fn, (kernel,))``: this unit's depthwise convolution as a function of its kernel."""
    conv = DepthwiseConv(3, self.stride, self.dilation, dtype=self.dtype, parent=None)
    return as_function(conv), (self.depthwise(in_features),)

  def depthwise_conv(self, x: jax.Array) -> jax.Array:
    fn, args = self.then_args(x.shape[-1])
    return fn(x, *args)

  def after_depthwise(self, z: jax.Array, train: bool, then: tuple | None = None) -> jax.Array:
    pointwise = Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, parent=None)
    pw = (as_function(pointwise), (self.pointwise(z.shape[-1]),))
    if train:
      y = self.depthwise_bn(z, use_running_average=False, then=pw)
      return self.pointwise_bn(y, use_running_average=False, then=then)
    # Evaluation: the pointwise BatchNorm folded into its convolution (norm.BatchNorm's
    # conv=; the depthwise one stays a pass of its own).
    y = self.depthwise_bn(z, use_running_average=True)
    return self.pointwise_bn(y, use_running_average=True, conv=pw, then=then)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.after_depthwise(self.depthwise_conv(x), train)


def separable_chain(units: Sequence[SeparableConv], x: jax.Array, train: bool) -> jax.Array:
  """``units`` applied in order, each one's output handed to the next one's depthwise
  convolution through ``then`` (not kept for the backward on CPU); same values as calling
  them one after the other."""
  z = units[0].depthwise_conv(x)
  for i, unit in enumerate(units):
    then = units[i + 1].then_args(unit.features) if i + 1 < len(units) else None
    z = unit.after_depthwise(z, train, then)
  return z


class XceptionModule(nn.Module):
  """Three separable convs (the last strided) plus a shortcut.

  ``skip`` is ``"conv"`` (1x1 strided projection + BN), ``"sum"`` (identity) or
  ``"none"``. Returns ``(output, features after the second separable conv)``;
  the latter is DeepLab v3+'s low-level feature when taken from entry block 2 (with
  ``keep_second=False`` it is ``None``, and the ReLU before the third separable conv is
  fused into the second's BatchNorm as the one before the second is into the first's).
  """

  features: Sequence[int]
  stride: int = 1
  dilation: int = 1
  skip: str = "conv"
  relu_inside: bool = False
  keep_second: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
    units = []
    for i, f in enumerate(self.features):
      last = i == len(self.features) - 1
      # Whether this unit applies the next one's leading ReLU.
      fused = not self.relu_inside and not last and not (i == 1 and self.keep_second)
      units.append(SeparableConv(f, stride=self.stride if i == 2 else 1,
                                 dilation=self.dilation, relu_inside=self.relu_inside,
                                 relu_after=fused, dtype=self.dtype, name=f"sepconv{i + 1}"))
    # The second unit's output is a feature of its own when kept: the chain breaks there.
    segments = [units[:2], units[2:]] if self.keep_second else [units]
    y, second = x, None
    for j, segment in enumerate(segments):
      y = y if self.relu_inside else nn.relu(y)  # the segment's leading ReLU
      y = separable_chain(segment, y, train)
      if j == 0 and self.keep_second:
        second = y
    if self.skip == "conv":
      s = Conv(
          self.features[-1], (1, 1), strides=self.stride, use_bias=False, dtype=self.dtype,
          name="shortcut",
      )(x)
      y = y + _bn("shortcut_bn", train, self.dtype)(s)
    elif self.skip == "sum":
      y = y + x
    elif self.skip != "none":
      raise ValueError(f"Xception skip must be 'conv', 'sum' or 'none'; got {self.skip!r}.")
    return y, second


class _MiddleBlock(nn.Module):
  """One middle-flow module in the (carry, out) form ``nn.scan`` expects."""

  features: int
  dilation: int
  train: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
    y, _ = XceptionModule(
        (self.features,) * 3, 1, self.dilation, "sum", keep_second=False, dtype=self.dtype,
        name="module"
    )(x, self.train)
    return y, None


def _plan(output_stride: int) -> tuple[tuple[int, int], ...]:
  """(stride, dilation) of entry block 3, middle flow, exit block 1 and exit block 2.

  The stem (stride 2) and entry blocks 1-2 (stride 2 each) always reach
  stride 8; later strides become atrous rates, following DeepLab's rule that
  a unit keeps the current rate and multiplies it by its stride afterwards.
  """
  if output_stride == 32:
    return ((2, 1), (1, 1), (2, 1), (1, 1))
  if output_stride == 16:
    return ((2, 1), (1, 1), (1, 1), (1, 2))
  if output_stride == 8:
    return ((1, 1), (1, 2), (1, 2), (1, 4))
  raise ValueError(f"Xception output_stride must be 8, 16 or 32; got {output_stride}.")


class Xception65(nn.Module):
  """Aligned Xception-65 feature extractor.

  Returns ``{"stem", "low_level", "entry", "middle", "out"}``: the stem output
  (stride 2), the low-level feature of DeepLab v3+ (entry block 2's second
  separable conv, stride 4, 256 channels at width 1), the entry-flow output
  (728 ch), the middle-flow output and the final 2048-channel map.

  Attributes:
    output_stride: 8, 16 or 32.
    width: multiplier on every channel count (1.0 = paper).
    middle_blocks: number of middle-flow modules (16 in Xception-65).
    multi_grid: per-unit rate multipliers of the last exit-flow module
      (DeepLab's ``unit_rate_list``), e.g. (1, 2, 4).
    scan_middle: run the middle flow with ``nn.scan`` (stacked parameters);
      False unrolls it (parameters named ``middle_0`` ... ``middle_15``).
  """

  output_stride: int = 16
  width: float = 1.0
  middle_blocks: int = 16
  multi_grid: Sequence[int] = (1, 1, 1)
  scan_middle: bool = True
  dtype: Dtype = jnp.float32

  def ch(self, c: int) -> int:
    return max(1, int(round(c * self.width)))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    (s3, d3), (_, dm), (s4, d4), (_, d5) = _plan(self.output_stride)
    ch, dt = self.ch, self.dtype
    feats = {}
    x = Conv(ch(32), (3, 3), 2, padding=((1, 1), (1, 1)), use_bias=False, dtype=dt,
             name="stem_conv1")(x)
    x = _bn("stem_bn1", train, dt, relu=True)(x)
    x = Conv(ch(64), (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dt,
             name="stem_conv2")(x)
    x = _bn("stem_bn2", train, dt, relu=True)(x)
    feats["stem"] = x
    x, _ = XceptionModule((ch(128),) * 3, 2, keep_second=False, dtype=dt, name="entry_block1")(
        x, train)
    x, feats["low_level"] = XceptionModule((ch(256),) * 3, 2, dtype=dt, name="entry_block2")(
        x, train)
    x, _ = XceptionModule((ch(728),) * 3, s3, d3, keep_second=False, dtype=dt,
                          name="entry_block3")(x, train)
    feats["entry"] = x
    if self.scan_middle and self.middle_blocks > 0:
      stack = nn.scan(
          _MiddleBlock,
          variable_axes={"params": 0, "batch_stats": 0},
          split_rngs={"params": True},
          length=self.middle_blocks,
      )
      x, _ = stack(ch(728), dm, train, dt, name="middle")(x, None)
    else:
      for i in range(self.middle_blocks):
        x, _ = _MiddleBlock(ch(728), dm, train, dt, name=f"middle_{i}")(x, None)
    feats["middle"] = x
    x, _ = XceptionModule((ch(728), ch(1024), ch(1024)), s4, d4, keep_second=False, dtype=dt,
                          name="exit_block1")(x, train)
    # The last module applies per-unit multi-grid rates; it has no shortcut.
    grid = tuple(self.multi_grid)
    if len(grid) != 3:
      raise ValueError(f"Xception multi_grid needs 3 rates; got {grid}.")
    x = separable_chain(
        [SeparableConv(f, 1, d5 * g, relu_inside=True, dtype=dt, name=f"exit_block2_sepconv{i + 1}")
         for i, (f, g) in enumerate(zip((ch(1536), ch(1536), ch(2048)), grid))], x, train)
    feats["out"] = x
    return feats


def channels(width: float = 1.0) -> dict[str, int]:
  """Channel count of each named feature at a given width."""
  r = lambda c: max(1, int(round(c * width)))  # noqa: E731
  return {"stem": r(64), "low_level": r(256), "entry": r(728), "middle": r(728), "out": r(2048)}
