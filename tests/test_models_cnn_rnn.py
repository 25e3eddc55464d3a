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


def test_blocked_upsampling_is_the_same_function():
  """The blocked upsampling chain (one interleave after the classifier) against the
  interleaved layers, same parameters: logits and every parameter's gradient."""
  x = jnp.asarray(_rand((2, 32, 48, 3)))
  cfgs = [ml_collections.ConfigDict({**TINY, "blocked_upsampling": b}) for b in (True, False)]
  blocked, plain = (build_model(c) for c in cfgs)
  v = plain.init(jax.random.key(0), x, train=False)
  # Bias and classifier weights away from 0 so that ReLU masks and every term matter.
  v = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(_rand(a.shape, a.size % 97)), v)
  r = jnp.asarray(_rand((2, 32, 48, K), 5))

  def grads(m):
    return jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, x, train=True)[0] * r)))(v)

  for m in (blocked, plain):
    assert m.apply(v, x)[0].shape == (2, 32, 48, K)
  np.testing.assert_allclose(blocked.apply(v, x)[0], plain.apply(v, x)[0], rtol=1e-5, atol=1e-4)
  g_b, g_p = grads(blocked), grads(plain)
  for path, a in jax.tree_util.tree_leaves_with_path(g_b):
    e = np.asarray(_at(g_p, path))
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(e).max())),
                               err_msg=jax.tree_util.keystr(path))


def _at(tree, path):
  for p in path:
    tree = tree[p.key]
  return tree


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
