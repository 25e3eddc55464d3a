"""UNet++ (Zhou, Rahman Siddiquee, Tajbakhsh & Liang, DLMIA 2018).

Nodes ``X[i][j]`` (level ``i``, column ``j``) replace U-Net's plain skips by
nested dense pathways (paper Eq. 1)::

    X[i][0] = H(pool(X[i-1][0]))
    X[i][j] = H(concat(X[i][0], ..., X[i][j-1], up(X[i+1][j-1])))   for j > 0

where ``H`` is two 3x3 conv(+BN)+ReLU units with ``width * 2**i`` channels and
``up`` a 2x2 up-convolution. With ``deep_supervision`` a 1x1 head scores each
of ``X[0][1..L]``. During training the final head is the logits and the
others are returned in ``aux`` (``head1`` .. ``head{L-1}``), so the loss
(with ``loss.aux_weight = 1``) is the sum of the heads' losses, as in the
reference Keras model. At evaluation the heads are combined by averaging
their softmax probabilities ("accurate mode", Sec. 2.2; the logits returned
are the log of that average), or, with ``prune_level = l < L``, only the
sub-network ``X[i][j], i + j <= l`` runs and head ``l`` is the output
("pruned mode", Fig. 1c). Odd sizes: the upsampled map is zero-padded
bottom/right to its level's size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jseg.models.conv import Conv
from jseg.models.layers import PixelTransposeConv, check_min_size, check_nhwc, max_pool_2x2
from jseg.models.unet import DoubleConv, match_size
from jseg.registry import MODELS

Dtype = Any


class UNetPlusPlus(nn.Module):
  """UNet++ L``depth``; returns ``(logits, aux)``.

  Attributes:
    num_classes: classes scored.
    depth: number of downsamplings ``L`` (4 in the paper).
    width: channels of level 0 (32 in the paper: 32, 64, 128, 256, 512).
    batch_norm: BatchNorm after every conv.
    deep_supervision: heads on every ``X[0][j]``.
    prune_level: evaluation depth ``1..L`` (0 or ``L``: the full network);
      needs ``deep_supervision``. The parameters do not depend on it, so one
      trained model can be evaluated at every level by rebuilding it.
  """

  num_classes: int
  depth: int = 4
  width: int = 32
  batch_norm: bool = True
  deep_supervision: bool = False
  prune_level: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    check_nhwc(x, "unetpp")
    L = self.depth
    if L < 1:
      raise ValueError(f"unetpp depth must be >= 1; got {L}.")
    if not 0 <= self.prune_level <= L:
      raise ValueError(
          f"unetpp prune_level must be in 0..{L} (0 = no pruning); got {self.prune_level}.")
    if self.prune_level not in (0, L) and not self.deep_supervision:
      raise ValueError(
          f"unetpp prune_level={self.prune_level} needs deep_supervision=True: only then "
          "are the intermediate heads trained."
      )
    check_min_size(x, 2**L, "unetpp")
    # Initialisation builds every node; training always runs the full network.
    full = train or self.is_initializing()
    levels = L if full or self.prune_level == 0 else self.prune_level
    x = x.astype(self.dtype)
    nodes: dict[tuple[int, int], jax.Array] = {}

    def block(i: int, j: int, inp: jax.Array | list[jax.Array]) -> jax.Array:
      return DoubleConv(
          self.width * 2**i, "same", self.batch_norm, self.dtype, name=f"X{i}_{j}"
      )(inp, train)

    for i in range(levels + 1):
      nodes[i, 0] = block(i, 0, x if i == 0 else max_pool_2x2(nodes[i - 1, 0]))
    for j in range(1, levels + 1):
      for i in range(levels + 1 - j):
        up = PixelTransposeConv(self.width * 2**i, 2, dtype=self.dtype, name=f"up{i + 1}_{j - 1}")(
            nodes[i + 1, j - 1]
        )
        up = match_size(up, nodes[i, 0].shape[1:3])
        # The concatenation's parts (read in place on oneDNN: conv.parts_function).
        nodes[i, j] = block(i, j, [nodes[i, k] for k in range(j)] + [up])

    def head(j: int) -> jax.Array:
      return Conv(self.num_classes, (1, 1), dtype=self.dtype, name=f"head{j}")(nodes[0, j])

    if not self.deep_supervision:
      return head(L), {}
    heads = [head(j) for j in range(1, levels + 1)]
    if train:
      return heads[-1], {f"head{j}": heads[j - 1] for j in range(1, L)}
    if levels < L or self.is_initializing():
      return heads[-1], {}
    # Accurate mode: average the heads' probabilities; return their log.
    logp = jnp.stack([jax.nn.log_softmax(h.astype(jnp.float32), -1) for h in heads])
    return jax.nn.logsumexp(logp, axis=0) - jnp.log(float(len(heads))), {}


@MODELS.register("unetpp")
def build_unetpp(cfg: ml_collections.ConfigDict) -> UNetPlusPlus:
  return UNetPlusPlus(
      num_classes=cfg.num_classes,
      depth=cfg.get("depth", 4),
      width=cfg.get("width", 32),
      batch_norm=cfg.get("batch_norm", True),
      deep_supervision=cfg.get("deep_supervision", False),
      prune_level=cfg.get("prune_level", 0),
      dtype=jnp.dtype(cfg.get("dtype", "float32")),
  )
