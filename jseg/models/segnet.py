"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017) and Bayesian SegNet
(Kendall, Badrinarayanan & Cipolla, BMVC 2017).

SegNet's encoder is VGG-16's 13 convolutions with BatchNorm; the decoder mirrors
it, and each decoder stage first upsamples with the *max-pooling indices* of
its encoder stage (paper Fig. 3): the pooled value goes back to the position
of its window's maximum, the other three positions are zero. A 3x3
convolution scores the classes (the softmax is in the loss). Layer widths
follow the reference Caffe model (``segnet_train.prototxt``).

Bayesian SegNet adds dropout (p=0.5) after the central encoder and decoder
units: after pool3, pool4, pool5 and after the last convolution of decoder
stages 5, 4 and 3 (the "central encoder-decoder" variant, as in
``bayesian_segnet_train.prototxt``). At test time dropout stays on and the
mean of N sampled softmax outputs is the prediction; their spread measures
model uncertainty (:func:`mc_predict`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jseg.models.backbones.vgg import VGG
from jseg.models.conv import Conv, ConvKernel, as_function, then_conv
from jseg.models.layers import check_min_size, check_nhwc, pool_2x2_positions
from jseg.registry import MODELS
from jseg.models.norm import BatchNorm

Dtype = Any

# Decoder stages 5..1: (Caffe name, output channels as a multiple of width) per
# 3x3 ConvBNReLU; stage 1 ends with the classifier ``conv1_1_D``.
DECODER = {
    5: (("conv5_3_D", 8), ("conv5_2_D", 8), ("conv5_1_D", 8)),
    4: (("conv4_3_D", 8), ("conv4_2_D", 8), ("conv4_1_D", 4)),
    3: (("conv3_3_D", 4), ("conv3_2_D", 4), ("conv3_1_D", 2)),
    2: (("conv2_2_D", 2), ("conv2_1_D", 1)),
    1: (("conv1_2_D", 1),),
}


def max_unpool_2x2(y: jax.Array, ref: jax.Array) -> jax.Array:
  """Index unpooling: puts ``y`` back where ``ref``'s 2x2 windows had their maximum.

  ``y`` is ``(N, h, w, C)``, the (processed) result of a 2x2 floor-mode max pool
  of ``ref`` ``(N, H, W, C)`` with ``h = H // 2``, ``w = W // 2``. The output has
  ``ref``'s shape; ``out[2i+a, 2j+b] = y[i, j]`` where ``(a, b)`` is the first
  maximum of window ``(i, j)`` in row-major order (as PyTorch's ``MaxPool2d``
  indices), zero elsewhere, including a trailing odd row/column that the pool
  dropped. The positions are recomputed from ``ref`` instead of stored, by the
  pool's own reduction (``layers.pool_2x2_positions``: in training XLA computes
  it once for the encoder's pool backward and this), and ``y`` is placed by a
  select per window position: elementwise and reshape ops only, so it is
  differentiable in ``y``, jittable and shards along the batch.
  """
  n, hh, ww, c = ref.shape
  h, w = hh // 2, ww // 2
  if y.shape != (n, h, w, c):
    raise ValueError(
        f"max_unpool_2x2: y has shape {tuple(y.shape)} but pooling {tuple(ref.shape)} "
        f"gives {(n, h, w, c)}."
    )
  at = pool_2x2_positions(jax.lax.stop_gradient(ref))  # no gradient through positions
  zero = jnp.zeros((), y.dtype)
  parts = jnp.stack([jnp.where(at == i, y, zero) for i in range(4)], axis=3)  # (n, h, w, 4, c)
  out = parts.reshape(n, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c)
  if (2 * h, 2 * w) != (hh, ww):
    out = jnp.pad(out, ((0, 0), (0, hh - 2 * h), (0, ww - 2 * w), (0, 0)))
  return out


_HE = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class ConvBNReLUBias(nn.Module):
  """3x3 conv (with bias, as in the Caffe model) + BatchNorm + ReLU.

  ``convolve`` and ``normalise`` are its two halves, so a BatchNorm can feed the next
  unit's convolution through ``then`` (``norm.BatchNorm``: on CPU its output is then
  recomputed in the backward instead of kept); ``params(in_features)`` gives this unit's
  ``(kernel, bias)`` for that and ``conv_fn`` the function to apply them with.
  """

  features: int
  dtype: Dtype = jnp.float32

  def setup(self) -> None:
    self.conv = ConvKernel(self.features, (3, 3), _HE, use_bias=True)
    self.bn = BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype, relu=True)

  @property
  def conv_fn(self) -> Callable[..., jax.Array]:
    return as_function(Conv(self.features, (3, 3), padding=((1, 1), (1, 1)),
                            dtype=self.dtype, parent=None))

  def params(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    return self.conv(in_features)

  def convolve(self, x: jax.Array) -> jax.Array:
    return self.conv_fn(x, *self.conv(x.shape[-1]))

  def normalise(self, z: jax.Array, train: bool, then: tuple | None = None,
                conv: tuple | None = None) -> jax.Array:
    """BatchNorm + ReLU of ``z``; with ``conv`` (``(conv_fn, params)``), of that conv's
    output for the input ``z`` (``norm.BatchNorm``: folded into the conv at evaluation)."""
    return self.bn(z, use_running_average=not train, then=then, conv=conv)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.normalise(self.convolve(x), train)


class SegNet(nn.Module):
  """SegNet / Bayesian SegNet; returns ``(logits, {})``.

  Attributes:
    num_classes: classes scored (11 for CamVid in the paper).
    width: base width of the VGG-16 encoder (64 in the paper).
    dropout: rate after the central units (0 = SegNet, 0.5 = Bayesian SegNet).

  ``__call__(x, train, mc_dropout=False)``: ``mc_dropout=True`` samples
  dropout while BatchNorm uses its running statistics (Bayesian SegNet's
  test-time sampling); it needs a ``"dropout"`` RNG.
  """

  num_classes: int
  width: int = 64
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x: jax.Array, train: bool = False, mc_dropout: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    name = "bayesian_segnet" if self.dropout > 0 else "segnet"
    check_nhwc(x, name)
    check_min_size(x, 32, name)
    stochastic = train or mc_dropout
    central = (0.0, 0.0, self.dropout, self.dropout, self.dropout)
    feats = VGG(
        depth=16,
        width=self.width,
        batch_norm=True,
        pool_dropout=central,
        dtype=self.dtype,
        name="backbone",
    )(x.astype(self.dtype), train, sample_dropout=stochastic)
    y = feats["pool5"]
    classifier = Conv(self.num_classes, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                      parent=None)
    for stage in (5, 4, 3, 2, 1):
      y = max_unpool_2x2(y, feats[f"conv{stage}"])
      units = [ConvBNReLUBias(self.width * mult, self.dtype, name=conv_name)
               for conv_name, mult in DECODER[stage]]
      # Training: each BatchNorm feeds the next convolution through ``then`` (its output
      # is not kept for the backward on CPU); evaluation: each folded into its own
      # convolution. Stage 1's last one feeds the classifier.
      z = units[0].convolve(y) if train else y
      for j, unit in enumerate(units):
        conv = None if train else (unit.conv_fn, unit.params(z.shape[-1]))
        if j + 1 < len(units):
          then = (units[j + 1].conv_fn, units[j + 1].params(unit.features)) if train else None
        elif stage == 1:
          then = then_conv(classifier, unit.features, name="conv1_1_D")
        else:
          then = None
        z = unit.normalise(z, train, then=then, conv=conv)
      y = z  # the stage's output (stage 1: the logits)
      if stage in (5, 4, 3) and self.dropout > 0:
        y = nn.Dropout(self.dropout, deterministic=not stochastic, name=f"dec{stage}_drop")(y)
    return y, {}


def mc_predict(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    rng: jax.Array,
    num_samples: int = 50,
    chunk_size: int | None = None,
) -> dict[str, jax.Array]:
  """Monte-Carlo dropout prediction (Bayesian SegNet Sec. 3.2; Gal & Ghahramani 2016).

  Runs ``num_samples`` stochastic forward passes, vectorised over dropout RNG
  keys with ``vmap`` (``chunk_size`` bounds how many run at once; the passes
  are then mapped in chunks with ``jax.lax.map``), and returns float32 arrays:

  - ``mean``: mean softmax probability ``(N, H, W, K)`` (the prediction),
  - ``entropy``: predictive entropy ``-sum_k p_k log p_k`` of ``mean`` ``(N, H, W)``,
  - ``variance``: per-class variance of the sampled probabilities ``(N, H, W, K)``.

  ``model`` must accept ``mc_dropout=True`` (SegNet does). Jit the call with
  ``model`` and the sizes static, e.g. ``jax.jit(mc_predict, static_argnums=(0, 4, 5))``.
  """
  if num_samples < 1:
    raise ValueError(f"mc_predict needs num_samples >= 1; got {num_samples}.")

  def one(key: jax.Array) -> jax.Array:
    logits, _ = model.apply(
        variables, images, train=False, mc_dropout=True, rngs={"dropout": key}
    )
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  keys = jax.random.split(rng, num_samples)
  if chunk_size is None or chunk_size >= num_samples:
    probs = jax.vmap(one)(keys)
  else:
    probs = jax.lax.map(one, keys, batch_size=chunk_size)
  mean = probs.mean(axis=0)
  variance = probs.var(axis=0)
  entropy = -jnp.sum(mean * jnp.log(jnp.clip(mean, 1e-12)), axis=-1)
  return {"mean": mean, "entropy": entropy, "variance": variance}


@MODELS.register("segnet")
def build_segnet(cfg: ml_collections.ConfigDict) -> SegNet:
  return SegNet(
      num_classes=cfg.num_classes,
      width=cfg.get("width", 64),
      dropout=cfg.get("dropout", 0.0),
      dtype=jnp.dtype(cfg.get("dtype", "float32")),
  )


@MODELS.register("bayesian_segnet")
def build_bayesian_segnet(cfg: ml_collections.ConfigDict) -> SegNet:
  return SegNet(
      num_classes=cfg.num_classes,
      width=cfg.get("width", 64),
      dropout=cfg.get("dropout", 0.5),
      dtype=jnp.dtype(cfg.get("dtype", "float32")),
  )
