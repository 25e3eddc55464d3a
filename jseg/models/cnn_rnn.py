"""CNN + RNN segmentation in the style of ReSeg (Visin et al., CVPRW 2016).

A convolutional encoder (VGG-16's first three blocks by default, output
stride 8, as ReSeg stacks its recurrent layers on VGG-16 features) is followed
by ReNet layers (Visin et al., "ReNet", arXiv 1505.00393): each splits the map
into non-overlapping p x p patches (space-to-depth), sweeps every column with a
bidirectional GRU (top-down and bottom-up), then sweeps every row of the result
with another bidirectional GRU (left-right and right-left). Every output
position therefore sees the whole image. Stride-2 transposed convolutions
(the per-pixel ``PixelTransposeConv`` form) upsample back, a final bilinear
resize reaches the exact input size, and a 1x1 conv classifies.

The recurrences are Flax ``nn.GRUCell``s scanned by ``nn.RNN`` (a lifted
``nn.scan``), so compile time does not grow with the image size. Defaults
follow ReSeg's public CamVid settings (fvisin/reseg ``evaluate_camvid.py``):
two ReNet layers of 100 GRU units with patch sizes 2 and 1.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jseg.models.conv import Conv, conv_relu
from jseg.models.layers import (
    PixelTransposeConv, check_min_size, check_nhwc, max_pool_2x2, pad_same, resize_bilinear,
    unblock_pixels)
from jseg.registry import MODELS

Dtype = Any

_he = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """Non-overlapping p x p patches flattened into channels; pads H, W up to multiples of p."""
  if p == 1:
    return x
  n, h, w, c = x.shape
  ph, pw = -h % p, -w % p
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  h, w = h + ph, w + pw
  x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // p, w // p, p * p * c)


class BiGRUSweep(nn.Module):
  """Bidirectional GRU along one spatial axis of an NHWC map (ReNet's sweep).

  ``axis=1`` runs along H (one sequence per column, the vertical sweep);
  ``axis=2`` along W (one sequence per row). Output: forward and backward
  hidden states concatenated, ``2 * hidden`` channels.
  """

  hidden: int
  axis: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.axis not in (1, 2):
      raise ValueError(f"BiGRUSweep axis must be 1 (vertical) or 2 (horizontal); got {self.axis}.")
    if self.axis == 1:
      x = x.transpose(0, 2, 1, 3)
    n, a, t, c = x.shape
    seqs = x.reshape(n * a, t, c)
    cell = lambda name: nn.GRUCell(self.hidden, dtype=self.dtype, name=name)  # noqa: E731
    bi = nn.Bidirectional(nn.RNN(cell("fwd_cell"), name="fwd"), nn.RNN(cell("bwd_cell"), name="bwd"))
    y = bi(seqs).reshape(n, a, t, 2 * self.hidden)
    return y.transpose(0, 2, 1, 3) if self.axis == 1 else y


class ReNetLayer(nn.Module):
  """ReNet layer: patchify, vertical bidirectional sweep, horizontal bidirectional sweep."""

  hidden: int
  patch: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = space_to_depth(x, self.patch)
    x = BiGRUSweep(self.hidden, axis=1, dtype=self.dtype, name="vertical")(x)
    return BiGRUSweep(self.hidden, axis=2, dtype=self.dtype, name="horizontal")(x)


class CNNRNN(nn.Module):
  """ReSeg-style network: conv encoder, ReNet layers, transposed-conv upsampling.

  Attributes:
    encoder_features, encoder_convs: channels and 3x3 convs per encoder block,
      each block followed by a 2x2 max-pool (VGG-16 conv1-conv3: (64, 128, 256), (2, 2, 3)).
    hidden: GRU units per direction of each ReNet layer.
    patches: patch size of each ReNet layer.
    up_features: channels of the stride-2 transposed convs.
    blocked_upsampling: where the input size is a multiple of the network's stride (the
      final resize is then the identity), run the transposed convs and the 1x1 classifier
      on pixel blocks and interleave once, on the classifier's output
      (``layers.unblock_pixels``): the same function without a depth-to-space copy of
      ``up_features`` channels per layer, and the ReLUs run in the convolutions' calls.
  """

  num_classes: int
  encoder_features: Sequence[int] = (64, 128, 256)
  encoder_convs: Sequence[int] = (2, 2, 3)
  hidden: Sequence[int] = (100, 100)
  patches: Sequence[int] = (2, 1)
  up_features: int = 100
  blocked_upsampling: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, "cnn_rnn")
    if len(self.encoder_features) != len(self.encoder_convs):
      raise ValueError(
          f"cnn_rnn encoder_features {tuple(self.encoder_features)} and encoder_convs "
          f"{tuple(self.encoder_convs)} must have the same length.")
    if len(self.hidden) != len(self.patches):
      raise ValueError(
          f"cnn_rnn hidden {tuple(self.hidden)} and patches {tuple(self.patches)} "
          "must have the same length.")
    stride = 2 ** len(self.encoder_features) * math.prod(self.patches)
    check_min_size(x, 2 ** len(self.encoder_features), "cnn_rnn")
    size = x.shape[1:3]
    y = x.astype(self.dtype)
    for s, (f, n) in enumerate(zip(self.encoder_features, self.encoder_convs)):
      for c in range(n):
        y = conv_relu(Conv(f, (3, 3), padding=pad_same(3), kernel_init=_he, dtype=self.dtype,
                           name=f"conv{s + 1}_{c + 1}", parent=None), y)
      y = max_pool_2x2(y)
    for i, (h, p) in enumerate(zip(self.hidden, self.patches)):
      y = ReNetLayer(h, p, self.dtype, name=f"renet{i + 1}")(y)
    ups = int(math.log2(stride))
    blocked = self.blocked_upsampling and size[0] % stride == 0 and size[1] % stride == 0
    width = y.shape[2]
    for i in range(ups):
      y = PixelTransposeConv(self.up_features, 2, dtype=self.dtype, relu=True,
                             depth_to_space=not blocked, name=f"up{i + 1}")(y)
    if not blocked:
      y = resize_bilinear(y, size)
    y = Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(y)
    if blocked:
      y = unblock_pixels(y, width, (2,) * ups)
    return y.astype(jnp.float32), {}


@MODELS.register("cnn_rnn")
def build_cnn_rnn(cfg: ml_collections.ConfigDict) -> CNNRNN:
  patches = tuple(cfg.get("patches", (2, 1)))
  if any(p < 1 or p & (p - 1) for p in patches):
    raise ValueError(f"model.patches must be powers of two (1, 2, 4, ...); got {patches}.")
  return CNNRNN(
      num_classes=cfg.num_classes,
      encoder_features=tuple(cfg.get("encoder_features", (64, 128, 256))),
      encoder_convs=tuple(cfg.get("encoder_convs", (2, 2, 3))),
      hidden=tuple(cfg.get("hidden", (100, 100))),
      patches=patches,
      up_features=cfg.get("up_features", 100),
      blocked_upsampling=cfg.get("blocked_upsampling", True),
      dtype=jnp.dtype(cfg.get("dtype", "float32")),
  )
