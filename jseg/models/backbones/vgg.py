"""VGG-11/13/16/19, with or without BatchNorm (Simonyan & Zisserman, ICLR 2015).

The feature extractor of FCN (Long et al., CVPR 2015) and SegNet (Badrinarayanan
et al., TPAMI 2017). It returns every stage's last activation before pooling
(``conv1``..``conv5``, which SegNet needs for its pooling indices) and after
pooling (``pool1``..``pool5``); with ``fc=True`` the classifier's fc6/fc7 run as
a 7x7 valid and a 1x1 convolution (FCN Sec. 3.1, "convolutionalization") and
``fc7`` is returned too.

Parameter names are ``conv{stage}_{i}``, ``bn{stage}_{i}``, ``fc6``, ``fc7``
(the Caffe names); ``jseg.models.pretrained`` maps torchvision's
``features.{k}`` / ``classifier.{k}`` onto them. ``width`` scales every stage
(64 in the paper) so tiny CPU variants are a config choice. FCN's Caffe
network pads the first convolution by 100 pixels and pools in ceil mode;
``first_padding`` and ``ceil_mode`` reproduce that.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jseg.models.conv import Conv, conv_relu, then_conv
from jseg.models.layers import check_min_size, max_pool_2x2
from jseg.models.norm import BatchNorm, conv_bn_chain

Dtype = Any

# Convolutions per stage; stage s has width * (1, 2, 4, 8, 8)[s] channels.
STAGE_CONVS = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
STAGE_MULT = (1, 2, 4, 8, 8)
_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _conv(ch: int, s: int, pads: Sequence[int], dtype: Dtype, i: int, **kw: Any) -> nn.Module:
  """Stage ``s``'s ``i``-th 3x3 convolution (``conv{s+1}_{i+1}``, with bias)."""
  p = pads[i]
  return Conv(ch, (3, 3), padding=((p, p), (p, p)), dtype=dtype, kernel_init=_INIT,
              name=f"conv{s + 1}_{i + 1}", **kw)


def max_pool_2x2_ceil(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max pool in ceil mode (Caffe's default, as FCN uses it).

  An odd row/column is padded with ``-inf`` so it forms its own window; the
  output is ``ceil(H/2) x ceil(W/2)``. Same values as
  ``torch.nn.MaxPool2d(2, 2, ceil_mode=True)``.
  """
  h, w = x.shape[1:3]
  if h % 2 or w % 2:
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
  return max_pool_2x2(x)


def stage_channels(width: int = 64) -> tuple[int, ...]:
  """Output channels of the five stages for a given base width."""
  return tuple(width * m for m in STAGE_MULT)


class VGG(nn.Module):
  """VGG feature extractor returning ``conv1..conv5``, ``pool1..pool5`` (and ``fc7``).

  Attributes:
    depth: 11, 13, 16 or 19 weight layers.
    width: channels of the first stage (64 in the paper).
    batch_norm: BatchNorm after every convolution (torchvision's ``vgg16_bn``).
    ceil_mode: ceil-mode pooling (Caffe); floor mode otherwise (torchvision).
    first_padding: padding of ``conv1_1`` (1; FCN uses 100).
    fc: also run fc6 (7x7 valid conv) and fc7 (1x1 conv) with ReLU and dropout.
    fc_features: channels of fc6/fc7 (4096 in the paper).
    fc_dropout: dropout rate after fc6 and fc7 (0.5 in the paper).
    pool_dropout: per-stage dropout rates applied after pool1..pool5
      (Bayesian SegNet drops out after pool3..pool5).
  """

  depth: int = 16
  width: int = 64
  batch_norm: bool = False
  ceil_mode: bool = False
  first_padding: int = 1
  fc: bool = False
  fc_features: int = 4096
  fc_dropout: float = 0.5
  pool_dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0, 0.0)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, train: bool, sample_dropout: bool | None = None
  ) -> dict[str, jax.Array]:
    """``sample_dropout`` (default: ``train``) turns dropout on independently of
    BatchNorm's mode, for Monte-Carlo dropout at test time."""
    if self.depth not in STAGE_CONVS:
      raise ValueError(f"VGG depth must be one of {sorted(STAGE_CONVS)}; got {self.depth}.")
    min_size = min_input_size(self.fc, self.ceil_mode, self.first_padding)
    check_min_size(x, min_size, f"VGG-{self.depth}" + (" with fc6/fc7" if self.fc else ""))
    stochastic = train if sample_dropout is None else sample_dropout
    pool = max_pool_2x2_ceil if self.ceil_mode else max_pool_2x2
    feats = {}
    for s, (n_convs, ch) in enumerate(zip(STAGE_CONVS[self.depth], stage_channels(self.width))):
      pads = [self.first_padding if (s, i) == (0, 0) else 1 for i in range(n_convs)]
      conv = functools.partial(_conv, ch, s, pads, self.dtype)
      if self.batch_norm:
        # Training: each BatchNorm feeds the stage's next conv through ``then`` (on CPU its
        # output is recomputed in the backward); evaluation: each folded into its conv.
        convs = [then_conv(conv(i, parent=None), x.shape[-1] if i == 0 else ch)
                 for i in range(n_convs)]
        bns = [BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, relu=True, name=f"bn{s + 1}_{i + 1}")
               for i in range(n_convs)]
        x = conv_bn_chain(x, convs, bns, train)
      else:
        for i in range(n_convs):
          x = conv_relu(conv(i, parent=None), x)
      feats[f"conv{s + 1}"] = x
      x = pool(x)
      rate = self.pool_dropout[s]
      if rate > 0:
        x = nn.Dropout(rate, deterministic=not stochastic, name=f"pool{s + 1}_drop")(x)
      feats[f"pool{s + 1}"] = x
    if self.fc:
      for name, k in (("fc6", 7), ("fc7", 1)):
        x = conv_relu(Conv(self.fc_features, (k, k), padding="VALID", dtype=self.dtype,
                           kernel_init=_INIT, name=name, parent=None), x)
        if self.fc_dropout > 0:
          x = nn.Dropout(self.fc_dropout, deterministic=not stochastic)(x)
      feats["fc7"] = x
    return feats


def min_input_size(fc: bool = False, ceil_mode: bool = False, first_padding: int = 1) -> int:
  """Smallest input side for which pool5 (and fc6's 7x7 window) is non-empty."""
  need = 7 if fc else 1
  size = 1
  while True:
    s = size + 2 * first_padding - 2
    for _ in range(5):
      s = -(-s // 2) if ceil_mode else s // 2
    if s >= need:
      return size
    size += 1
