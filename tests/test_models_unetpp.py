"""UNet++: deep-supervision heads, accurate and pruned inference checked exactly against
the training-mode heads, odd sizes, errors, parameter count, training on CamVid."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jseg.config import load_config
from jseg.models.unetplusplus import UNetPlusPlus
from tiny import host_init

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("ds", [False, True])
def test_output_at_input_resolution(ds):
  model = UNetPlusPlus(3, depth=4, width=2, deep_supervision=ds)
  x = jnp.zeros((2, 97, 131, 3))

  def run():
    v = model.init(jax.random.PRNGKey(0), x)
    return model.apply(v, x), model.apply(v, x, train=True, mutable=["batch_stats"])[0]

  (logits, aux), (train_logits, train_aux) = jax.eval_shape(run)
  assert logits.shape == train_logits.shape == (2, 97, 131, 3) and aux == {}
  heads = {"head1", "head2", "head3"} if ds else set()
  assert set(train_aux) == heads
  assert all(a.shape == (2, 97, 131, 3) for a in train_aux.values())


@pytest.fixture(scope="module")
def heads_and_modes():
  """Without BatchNorm or dropout, train and eval mode compute the same heads, so
  evaluation can be checked exactly against the training-mode heads."""
  kw = dict(num_classes=3, depth=3, width=4, batch_norm=False, deep_supervision=True)
  full, pruned1, pruned2 = (UNetPlusPlus(**kw, prune_level=p) for p in (0, 1, 2))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 37, 45, 3))
  v = host_init(full, x)

  @jax.jit
  def run(v, x):
    train = full.apply(v, x, train=True)
    return train, full.apply(v, x)[0], pruned1.apply(v, x)[0], pruned2.apply(v, x)[0]

  def loss(params):
    logits, aux = full.apply({"params": params}, x, train=True)
    return sum(jnp.mean(jax.nn.log_softmax(h)[..., 0]) for h in [logits, *aux.values()])

  return run(v, x), jax.jit(jax.grad(loss))(v["params"])


def test_accurate_mode_averages_the_heads_probabilities(heads_and_modes):
  ((last, aux), accurate, _, _), _ = heads_and_modes
  heads = [aux["head1"], aux["head2"], last]
  mean_prob = np.mean([np.asarray(jax.nn.softmax(h)) for h in heads], axis=0)
  np.testing.assert_allclose(np.exp(np.asarray(accurate)), mean_prob, rtol=1e-5, atol=1e-6)


def test_pruned_inference_is_the_shallow_head(heads_and_modes):
  ((_, aux), _, pruned1, pruned2), _ = heads_and_modes
  np.testing.assert_allclose(np.asarray(pruned1), np.asarray(aux["head1"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(pruned2), np.asarray(aux["head2"]), rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_node(heads_and_modes):
  _, grads = heads_and_modes
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  nodes = {k for k in grads if k.startswith("X")}
  assert nodes == {f"X{i}_{j}" for i in range(4) for j in range(4 - i)}
  assert all(float(jnp.abs(grads[k]["conv1"]["kernel"]).max()) > 0 for k in nodes)


def test_bad_settings_are_named():
  x = jnp.zeros((1, 32, 32, 3))
  init = lambda m, x=x: jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
  with pytest.raises(ValueError, match="prune_level=2 needs deep_supervision=True"):
    init(UNetPlusPlus(2, width=2, prune_level=2))
  with pytest.raises(ValueError, match=r"prune_level must be in 0..4 .*got 5"):
    init(UNetPlusPlus(2, width=2, deep_supervision=True, prune_level=5))
  with pytest.raises(ValueError, match="at least 16x16 pixels; got 15x32"):
    init(UNetPlusPlus(2, width=2), jnp.zeros((1, 15, 32, 3)))


def test_parameter_count_matches_the_paper():
  # Zhou et al. 2018, Table 1 (32..512 filters, no BN): UNet++ 9.04M parameters.
  model = UNetPlusPlus(1, depth=4, width=32, batch_norm=False, deep_supervision=True)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1))))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(v["params"]))
  assert round(n / 1e6, 2) == 9.04


@pytest.mark.slow
def test_trains_on_camvid_sample(tfds_cache):
  """Deep supervision, summed head losses, tiny width: the loss goes down on the shipped
  CamVid sample; finite losses throughout mean finite gradients."""
  from jseg.trainer import quick_train

  c = load_config(str(REPO / "configs" / "unetpp.py"))
  c.model.width, c.model.depth, c.model.num_classes = 4, 3, 11
  c.data.name, c.data.root = "camvid", "samples/camvid"
  c.data.cache_dir, c.batch_size = tfds_cache, 24
  # The whole 24-image sample, downscaled to 48x64, not cropped or flipped, is every
  # step's batch, so the losses show training progress rather than batch-to-batch noise.
  c.data.crop_size, c.data.scale_range, c.data.hflip = (48, 64), (0.13334, 0.13334), False
  c.optimizer.learning_rate = 1e-3
  losses = quick_train(c, 5)
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("train", [True, False])
def test_nodes_read_their_inputs_as_parts(train, monkeypatch):
  """Each node's convolution reads its inputs as the parts of their concatenation
  (``conv.parts_function``): same outputs (and batch statistics) as concatenating first,
  one oneDNN call per part instead of a concatenation."""
  from jseg.models import conv

  m = UNetPlusPlus(num_classes=3, depth=2, width=4)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 12, 3)), jnp.float32)
  v = host_init(m, x)

  def run(split: bool):
    monkeypatch.setitem(conv._apply_parts.__kwdefaults__, "split", split)
    f = jax.jit(lambda v: m.apply(v, x, train=train, mutable=["batch_stats"] if train else False))
    text = f.lower(v).as_text()
    out = f(v)
    return out, text.count("stablehlo.concatenate"), text.count("@JsegConv")

  out, cats, calls = run(True)
  ref, cats_ref, calls_ref = run(False)
  for u, w in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-4)
  if conv.onednn_active():  # nodes X0_1 (2 parts), X1_1 (2), X0_2 (3): 3 fewer, 4 more calls
    assert (cats, calls) == (cats_ref - 3, calls_ref + 4)


def test_nodes_read_earlier_nodes_first_then_the_upsampled_map():
  """UNet++ of depth 1 against a hand-written one that concatenates ``[X0_0, up]``
  explicitly (the checkpoints' channel order), same variables: pins the order of the
  parts a node passes (``conv.parts_function`` takes the list's order)."""
  from flax import linen as nn

  from jseg.models.conv import Conv
  from jseg.models.layers import PixelTransposeConv, max_pool_2x2
  from jseg.models.unet import DoubleConv

  class Ref(nn.Module):
    @nn.compact
    def __call__(self, x):
      x00 = DoubleConv(4, name="X0_0")(x, False)
      x10 = DoubleConv(8, name="X1_0")(max_pool_2x2(x00), False)
      up = PixelTransposeConv(4, 2, name="up1_0")(x10)
      x01 = DoubleConv(4, name="X0_1")(jnp.concatenate([x00, up], -1), False)
      return Conv(3, (1, 1), name="head1")(x01)

  m = UNetPlusPlus(num_classes=3, depth=1, width=4)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 8, 12, 3)), jnp.float32)
  v = host_init(m, x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(
      jnp.shape, jax.eval_shape(Ref().init, jax.random.key(0), x))
  np.testing.assert_allclose(m.apply(v, x)[0], Ref().apply(v, x), rtol=1e-4, atol=1e-4)
