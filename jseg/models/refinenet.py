"""RefineNet: multi-path refinement networks (Lin et al., CVPR 2017).

A 4-cascaded RefineNet on a ResNet (output stride 32, no dilation): the four
ResNet stages (strides 4, 8, 16, 32) are reduced by a 3x3 conv, and one
RefineNet block per stage refines them from coarse to fine (paper Fig. 2(c)
and Fig. 3). Each block has

- residual conv units (RCU, paper Fig. 3(b)): ReLU, 3x3 conv, ReLU, 3x3 conv,
  plus the input; no BatchNorm;
- multi-resolution fusion (MRF, Fig. 3(c)): a 3x3 conv on each input path,
  upsampling of the coarser path to the finer one and a sum;
- chained residual pooling (CRP, Fig. 3(d)): ReLU, then a chain of
  (5x5 stride-1 max-pool, 3x3 conv) stages whose outputs are all added
  to the input;
- output RCUs.

The decoder's convolutions start from PyTorch's default initialisation, as in the
reference code (``_DECODER_INIT``).

Layer sizes follow the authors' released RefineNet-101 (DrSleep/refinenet-pytorch
``models/resnet.py``, converted from the official MatConvNet models): 512
channels on the stride-32 path and 256 elsewhere, 2 RCUs per adaptive path,
4 CRP stages, 3 output RCUs, dropout 0.5 on the two coarsest ResNet features
and before the 3x3 classifier. ``features`` scales the widths for CPU tests.

The 5x5 stride-1 max-pool is computed separably (rows then columns) from
shifted slices, so its gradient is a select instead of XLA:CPU's slow
select-and-scatter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jseg.models.backbones.resnet import ResNet
from jseg.models.conv import Conv, conv_relu
from jseg.models.layers import (
    check_min_size,
    check_nhwc,
    max_pool_same,
    pad_same,
    relu_kept,
    resize_bilinear,
    resize_logits,
)
from jseg.registry import MODELS

Dtype = Any


# PyTorch's default for nn.Conv2d (kaiming_uniform, a=sqrt(5): variance 1 / (3 fan_in)),
# which the reference code leaves on every decoder convolution. The decoder has no
# BatchNorm, and its 5x5 max pools raise the mean that each pool-conv stage and each
# residual sum carry on: with flax's default (variance 1 / fan_in) the training-mode
# logits at initialisation had a standard deviation of ~46 on a tiny configuration and
# the paper configuration's first loss was 154 (11 classes), diverging to NaN by its
# third SGD step at its own learning rate (5e-4); with this one: 0.6 and 2.52, stable.
_DECODER_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _conv3(features: int, name: str, dtype: Dtype, bias: bool = False, **kw) -> nn.Conv:
  return Conv(features, (3, 3), padding=pad_same(3), use_bias=bias, dtype=dtype, name=name,
              kernel_init=_DECODER_INIT, **kw)


class RCU(nn.Module):
  """Chain of residual conv units (RefineNet Fig. 3(b)): x + conv(relu(conv(relu(x))))."""

  features: int
  blocks: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.blocks):
      y = conv_relu(_conv3(self.features, f"rcu{i + 1}_conv1", self.dtype, bias=True,
                           parent=None), relu_kept(x))
      y = _conv3(self.features, f"rcu{i + 1}_conv2", self.dtype)(y)
      x = x + y
    return x


class CRP(nn.Module):
  """Chained residual pooling (RefineNet Fig. 3(d)): x + sum of chained pool-conv stages."""

  features: int
  stages: int = 4
  pool: int = 5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    top = x
    for i in range(self.stages):
      top = _conv3(self.features, f"stage{i + 1}", self.dtype)(max_pool_same(top, self.pool))
      x = x + top
    return x


class RefineNetBlock(nn.Module):
  """One RefineNet block: adaptive RCUs, MRF with the coarser path, CRP, output RCUs.

  ``coarser`` is the previous block's output (already reduced to this block's
  width by its own MRF conv) or None for the top block; returns this block's
  output and, when ``out_features`` is set, its MRF-projected version for the
  next (finer) block.
  """

  features: int
  out_features: int | None = None
  rcu_blocks: int = 2
  crp_stages: int = 4
  out_rcu_blocks: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, coarser: jax.Array | None) -> jax.Array:
    f = self.features
    x = RCU(f, self.rcu_blocks, self.dtype, name="adapt")(x)
    if coarser is not None:
      x = _conv3(f, "mrf_conv", self.dtype)(x)
      x = x + resize_bilinear(coarser, x.shape[1:3])
    x = CRP(f, self.crp_stages, dtype=self.dtype, name="crp")(relu_kept(x))
    x = RCU(f, self.out_rcu_blocks, self.dtype, name="out")(x)
    if self.out_features is not None:
      x = _conv3(self.out_features, "mrf_out_conv", self.dtype)(x)
    return x


class RefineNet(nn.Module):
  """4-cascaded RefineNet on a ResNet; returns ``(logits, {})``.

  Attributes:
    depth, width: ResNet depth and stem width (101 and 64 in the paper).
    features: width of the three finer paths; the stride-32 path uses twice this.
    rcu_blocks, crp_stages, out_rcu_blocks: block sizes (2, 4, 3 in the release).
    dropout: rate on layer3/layer4 features and before the classifier.
  """

  num_classes: int
  depth: int = 101
  width: int = 64
  features: int = 256
  rcu_blocks: int = 2
  crp_stages: int = 4
  out_rcu_blocks: int = 3
  dropout: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, "refinenet")
    check_min_size(x, 32, "refinenet")
    size = x.shape[1:3]
    feats = ResNet(depth=self.depth, width=self.width, output_stride=32, dtype=self.dtype,
                   name="backbone")(x.astype(self.dtype), train)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    f, dt = self.features, self.dtype
    blk = dict(rcu_blocks=self.rcu_blocks, crp_stages=self.crp_stages,
               out_rcu_blocks=self.out_rcu_blocks, dtype=dt)
    # Path widths (coarse to fine) and the width each block hands to the next.
    widths = (2 * f, f, f, f)
    levels = ("layer4", "layer3", "layer2", "layer1")
    y = None
    for i, (level, w) in enumerate(zip(levels, widths)):
      h = feats[level]
      if level in ("layer4", "layer3"):
        h = drop(h)
      h = _conv3(w, f"{level}_reduce", dt)(h)
      y = RefineNetBlock(w, out_features=f if i < 3 else None, name=f"refine{4 - i}", **blk)(h, y)
    y = drop(y)
    y = Conv(self.num_classes, (3, 3), padding=pad_same(3), dtype=dt, name="classifier")(y)
    return resize_logits(y, size, train).astype(jnp.float32), {}


@MODELS.register("refinenet")
def build_refinenet(cfg: ml_collections.ConfigDict) -> RefineNet:
  return RefineNet(
      num_classes=cfg.num_classes,
      depth=cfg.get("depth", 101),
      width=cfg.get("width", 64),
      features=cfg.get("features", 256),
      rcu_blocks=cfg.get("rcu_blocks", 2),
      crp_stages=cfg.get("crp_stages", 4),
      out_rcu_blocks=cfg.get("out_rcu_blocks", 3),
      dropout=cfg.get("dropout", 0.5),
      dtype=jnp.dtype(cfg.get("dtype", "float32")),
  )
