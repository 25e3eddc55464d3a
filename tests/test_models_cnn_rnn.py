"""CNN+RNN (ReSeg-style): patching, the direction and reach of each recurrent sweep,
odd input sizes and training on the CamVid sample."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jseg.config import load_config
from jseg.models import build_model
from jseg.models.cnn_rnn import BiGRUSweep, ReNetLayer, space_to_depth
from jseg.trainer import quick_train
from tiny import camvid_config

K = 5
TINY = dict(name="cnn_rnn", num_classes=K, encoder_features=(4, 8, 8), encoder_convs=(1, 1, 1),
            hidden=(6, 6), up_features=8)


def _rand(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_space_to_depth_matches_numpy_with_padding():
  x = _rand((2, 5, 7, 3))
  y = jax.jit(space_to_depth, static_argnums=1)(x, 2)
  xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  ref = np.zeros((2, 3, 4, 12), np.float32)
  for i in range(3):
    for j in range(4):
      ref[:, i, j] = xp[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 12)
  np.testing.assert_array_equal(y, ref)
  assert space_to_depth(x, 1) is x


def _dependence(module, x, out_index, channels):
  """Boolean (H, W) map: which input pixels the chosen output pixel's channels depend on."""
  v = module.init(jax.random.key(0), x)
  g = jax.jit(jax.grad(lambda t: module.apply(v, t)[(0, *out_index)][channels].sum()))(x)
  return np.asarray(jnp.abs(g[0]).sum(-1) > 0)


@pytest.mark.parametrize("axis", [1, 2])
def test_sweeps_are_bidirectional_along_one_axis(axis):
  h = 4
  x = _rand((1, 6, 5, 3))
  sweep = BiGRUSweep(h, axis=axis)
  r, c = 2, 3
  fwd = _dependence(sweep, x, (r, c), slice(0, h))
  bwd = _dependence(sweep, x, (r, c), slice(h, 2 * h))
  expect_fwd = np.zeros((6, 5), bool)
  expect_bwd = np.zeros((6, 5), bool)
  if axis == 1:  # along the column c: forward sees rows <= r, backward rows >= r
    expect_fwd[: r + 1, c] = True
    expect_bwd[r:, c] = True
  else:  # along the row r
    expect_fwd[r, : c + 1] = True
    expect_bwd[r, c:] = True
  np.testing.assert_array_equal(fwd, expect_fwd)
  np.testing.assert_array_equal(bwd, expect_bwd)


def test_renet_layer_sees_the_whole_map():
  x = _rand((1, 8, 6, 2))
  layer = ReNetLayer(hidden=3, patch=2)
  v = layer.init(jax.random.key(0), x)
  y = jax.eval_shape(lambda: layer.apply(v, x))
  assert y.shape == (1, 4, 3, 6)
  assert _dependence(layer, x, (0, 0), slice(None)).all()


def test_logits_at_odd_input_sizes():
  m = build_model(ml_collections.ConfigDict(TINY))
  v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  for hw in ((45, 37), (97, 131), (8, 9)):
    logits, aux = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((2, *hw, 3)), train=True), v)
    assert logits.shape == (2, *hw, K) and aux == {}


@pytest.mark.slow
def test_trains_on_camvid_sample(tfds_cache):
  """A few jitted, data-sharded steps (jseg.trainer.quick_train) at tiny width on the shipped
  CamVid sample lower the loss; finite losses throughout also mean finite gradients."""
  tiny = dict(encoder_features=(4, 8, 8), encoder_convs=(1, 1, 1), hidden=(8, 8), up_features=8)
  losses = quick_train(camvid_config("cnn_rnn", tiny, tfds_cache), 4)
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


def test_config_errors():
  with pytest.raises(ValueError, match="patches must be powers of two.*3"):
    build_model(ml_collections.ConfigDict({**TINY, "patches": (3, 1)}))
  m = build_model(ml_collections.ConfigDict({**TINY, "hidden": (6,)}))
  with pytest.raises(ValueError, match="hidden.*patches.*same length"):
    jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
