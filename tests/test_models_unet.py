"""U-Net: both paddings and upsamplings at odd sizes, the paper's tile geometry, the
overlap-tile property, parameter count, errors, training on the CamVid sample."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jseg.config import load_config
from jseg.models.unet import UNet, valid_geometry
from tiny import assert_same_variables_and_training_bits, host_init

REPO = Path(__file__).resolve().parent.parent


def test_valid_geometry_is_the_papers():
  # Fig. 1: a 572x572 input tile gives a 388x388 output map.
  assert valid_geometry(388, 5) == (388, 572)
  assert valid_geometry(389, 5) == (404, 588)  # next size the pooling grid allows
  assert valid_geometry(1, 5) == (4, 188)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_output_at_input_resolution(padding, upsampling):
  model = UNet(2, depth=5, width=2, padding=padding, upsampling=upsampling)
  x = jnp.zeros((2, 97, 131, 1))

  def run():
    v = model.init(jax.random.PRNGKey(0), x)
    train = model.apply(v, x, train=True, mutable=["batch_stats"])[0]
    return model.apply(v, x), train

  (logits, aux), (train_logits, train_aux) = jax.eval_shape(run)
  assert logits.shape == train_logits.shape == (2, 97, 131, 2)
  assert aux == train_aux == {}


def test_overlap_tile_agrees_with_the_whole_image():
  """Valid U-Net: a tile's output equals the whole image's output wherever the tile holds
  the full receptive field (20 px for depth 3) and the pooling grids align (offset % 4)."""
  model = UNet(3, depth=3, width=4, padding="valid", upsampling="transpose", batch_norm=True)
  image = np.random.default_rng(0).normal(size=(1, 61, 67, 1)).astype(np.float32)
  v = host_init(model, jnp.asarray(image))
  apply = jax.jit(lambda v, x: model.apply(v, x)[0])
  whole = np.asarray(apply(v, image))
  tile = np.asarray(apply(v, image[:, 8:61, 12:67]))
  assert whole.shape == (1, 61, 67, 3) and tile.shape == (1, 53, 55, 3)
  np.testing.assert_allclose(tile[:, 20:-20, 20:-20], whole[:, 28:-20, 32:-20],
                             rtol=1e-4, atol=1e-4)
  # ...and the mirrored margin does change the border.
  assert np.abs(tile[:, :4] - whole[:, 8:12, 12:]).max() > 1e-3


def test_same_padding_gradients_finite_at_odd_size():
  model = UNet(2, depth=3, width=4, padding="same", upsampling="transpose")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 37, 45, 1))
  v = host_init(model, x)

  def loss(params):
    (logits, _), _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                 train=True, mutable=["batch_stats"])
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = jax.jit(jax.grad(loss))(v["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["enc0"]["conv1"]["kernel"]).max()) > 0


@pytest.mark.parametrize("batch_norm", [True, False])
def test_double_conv_equals_the_plain_conv_bn_stack(batch_norm):
  """DoubleConv's ``then`` form (bn1 feeding conv2 as a function of its kernel) has the
  plain stack's parameter tree, values, outputs, statistics and gradients, bit for bit."""
  from flax import linen as nn

  from jseg.models.conv import Conv
  from jseg.models.norm import BatchNorm
  from jseg.models.unet import DoubleConv

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
      for i in (1, 2):
        x = Conv(6, (3, 3), padding=((1, 1), (1, 1)), use_bias=not batch_norm,
                 kernel_init=init, name=f"conv{i}")(x)
        x = (BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, relu=True,
                       name=f"bn{i}")(x) if batch_norm else nn.relu(x))
      return x

  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 10, 3)), jnp.float32)
  assert_same_variables_and_training_bits(DoubleConv(6, batch_norm=batch_norm), Plain(), x)


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_decoder_convolutions_over_parts_equal_the_concatenation(batch_norm, train, monkeypatch):
  """The decoder levels read the skip features and the upsampled map as the parts of their
  concatenation (``conv.parts_function``: one oneDNN call per part): same outputs, batch
  statistics and gradients as concatenating first, to float32 rounding, and no
  concatenation in the program on oneDNN."""
  from jseg.models import conv

  m = UNet(num_classes=3, depth=3, width=8, batch_norm=batch_norm)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 24, 3)), jnp.float32)
  v = host_init(m, x)

  def run(split: bool):
    monkeypatch.setitem(conv._apply_parts.__kwdefaults__, "split", split)

    def loss(params):
      out, upd = m.apply({**v, "params": params}, x, train=train,
                         mutable=["batch_stats"] if train else False)
      (y, _), stats = (out, upd) if train else (out, {})
      return jnp.sum(y * jnp.cos(y)), (y, stats)

    (_, aux), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
    text = jax.jit(lambda p: loss(p)[0]).lower(v["params"]).as_text()  # the forward
    return aux, g, (text.count("stablehlo.concatenate"), text.count("@JsegConv"))

  (y, stats), g, (cats, calls) = run(True)
  (y_ref, stats_ref), g_ref, (cats_ref, calls_ref) = run(False)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  for u, w in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
    np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-4)
  # Gradients as one vector: the parts sum in another order, and where a pre-activation
  # lies within rounding of a ReLU's kink (one of 6144 here, 1.9e-7 from 0, without
  # BatchNorm) its mask flips and that pixel's gradient changes by O(1): 1.6e-3 of the
  # norm; a wrong partial sum or kernel piece is O(1) of it.
  flat = lambda t: jnp.concatenate([u.ravel() for u in jax.tree.leaves(t)])
  assert float(jnp.linalg.norm(flat(g) - flat(g_ref)) / jnp.linalg.norm(flat(g_ref))) < 1e-2
  if conv.onednn_active():  # the two decoder levels: no concatenation, a call per part
    assert (cats, calls) == (cats_ref - 2, calls_ref + 2)


def test_decoder_reads_the_skip_features_first():
  """U-Net against a hand-written two-level one that concatenates ``[skip, upsampled]``
  explicitly (the checkpoints' channel order), with the same variables: pins the order of
  the parts the decoder passes (``conv.parts_function`` takes the list's order)."""
  from flax import linen as nn

  from jseg.models.conv import Conv
  from jseg.models.layers import max_pool_2x2
  from jseg.models.unet import DoubleConv, Up

  class Ref(nn.Module):
    @nn.compact
    def __call__(self, x):
      s = DoubleConv(8, batch_norm=False, name="enc0")(x, False)
      y = DoubleConv(16, batch_norm=False, name="enc1")(max_pool_2x2(s), False)
      y = Up(8, "transpose", name="up0")(y, s.shape[1:3])
      y = DoubleConv(8, batch_norm=False, name="dec0")(jnp.concatenate([s, y], -1), False)
      return Conv(3, (1, 1), name="classifier")(y)

  m = UNet(num_classes=3, depth=2, width=8, batch_norm=False)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 16, 12, 3)), jnp.float32)
  v = host_init(m, x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, jax.eval_shape(Ref().init, jax.random.key(0), x))
  np.testing.assert_allclose(m.apply(v, x)[0], Ref().apply(v, x), rtol=1e-4, atol=1e-4)


def test_parameter_count_of_the_paper_unet():
  # Fig. 1: 1 input channel, 2 classes, no BN; 3x3 convs with bias, 2x2 up-convs halving
  # the channels, a 1x1 classifier. The paper prints no count; this is its layer list.
  enc = [(1, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512),
         (512, 512), (512, 1024), (1024, 1024)]
  dec = [(1024, 512), (512, 512), (512, 256), (256, 256), (256, 128), (128, 128), (128, 64),
         (64, 64)]
  ups = [(1024, 512), (512, 256), (256, 128), (128, 64)]
  ref = sum(9 * i * o + o for i, o in enc + dec) + sum(4 * i * o + o for i, o in ups) + 64 * 2 + 2
  model = UNet(2, padding="valid", batch_norm=False)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1))))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(v["params"])) == ref == 31_030_658


def test_bad_settings_are_named():
  x = jnp.zeros((1, 15, 64, 1))
  with pytest.raises(ValueError, match="at least 16x16 pixels; got 15x64"):
    jax.eval_shape(lambda: UNet(2, width=2).init(jax.random.PRNGKey(0), x))
  with pytest.raises(ValueError, match=r"padding must be one of \('same', 'valid'\); got 'full'"):
    jax.eval_shape(lambda: UNet(2, width=2, padding="full").init(jax.random.PRNGKey(0), x))
  with pytest.raises(ValueError, match="upsampling must be one of .*got 'nearest'"):
    jax.eval_shape(lambda: UNet(2, width=2, upsampling="nearest").init(jax.random.PRNGKey(0), x))


@pytest.mark.slow
def test_trains_on_camvid_sample(tfds_cache):
  """The paper's variant (valid, up-convolutions, no BN, dropout) at tiny width lowers the
  loss on the shipped CamVid sample; finite losses throughout mean finite gradients."""
  from jseg.trainer import quick_train

  c = load_config(str(REPO / "configs" / "unet.py"))
  c.model.width, c.model.depth, c.model.num_classes = 4, 4, 11
  c.data.name, c.data.root = "camvid", "samples/camvid"
  c.data.cache_dir, c.batch_size = tfds_cache, 24
  # The whole 24-image sample, downscaled to 48x64, not cropped or flipped, is every
  # step's batch, so the losses show training progress rather than batch-to-batch noise.
  c.data.crop_size, c.data.scale_range, c.data.hflip = (48, 64), (0.13334, 0.13334), False
  c.optimizer.name, c.optimizer.learning_rate = "adam", 1e-3
  losses = quick_train(c, 5)
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
