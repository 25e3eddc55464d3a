"""jseg.models.norm.BatchNorm against flax.linen.BatchNorm: same variables, values, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jseg.models.norm import BatchNorm

KW = dict(momentum=0.9, epsilon=1e-5)


def _x(shape=(2, 5, 6, 8), seed=0, offset=0.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 2 + offset, jnp.float32)


def _variables(shape, seed=1):
  """Non-trivial parameters and running statistics, shared by both modules."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  return {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
                     "bias": jnp.asarray(rng.standard_normal(c), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.standard_normal(c), jnp.float32),
                          "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)}}


def test_same_variables_as_flax():
  x = _x()
  ours = jax.eval_shape(BatchNorm(use_running_average=False).init, jax.random.key(0), x)
  ref = jax.eval_shape(nn.BatchNorm(use_running_average=False).init, jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(
      lambda a: (a.shape, a.dtype), ref)
  init = BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  np.testing.assert_array_equal(init["params"]["scale"], np.ones(8))
  np.testing.assert_array_equal(init["batch_stats"]["var"], np.ones(8))


@pytest.mark.parametrize("offset", [0.0, 30.0])  # a large mean: the affine form's cancellation
def test_training_values_gradients_and_running_stats_equal_flax(offset):
  x = _x(offset=offset)
  v = _variables(x.shape)
  ours, ref = BatchNorm(use_running_average=False, **KW), nn.BatchNorm(use_running_average=False, **KW)
  y, upd = ours.apply(v, x, mutable=["batch_stats"])
  y_ref, upd_ref = ref.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-5 * (1 + offset))
  for k in ("mean", "var"):
    np.testing.assert_allclose(upd["batch_stats"][k], upd_ref["batch_stats"][k], rtol=1e-5, atol=1e-5)
  w = _x(x.shape, seed=3)

  def loss(m, params, x):
    out, _ = m.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(out) * w)

  g = jax.grad(loss, argnums=(1, 2))(ours, v["params"], x)
  g_ref = jax.grad(loss, argnums=(1, 2))(ref, v["params"], x)
  for a, e in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * (1 + offset))


def test_eval_uses_running_stats_and_matches_flax():
  x = _x()
  v = _variables(x.shape)
  y = BatchNorm(**KW).apply(v, x, use_running_average=True)
  y_ref = nn.BatchNorm(**KW).apply(v, x, use_running_average=True)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  s, b = v["params"]["scale"], v["params"]["bias"]
  m, var = v["batch_stats"]["mean"], v["batch_stats"]["var"]
  np.testing.assert_allclose(y, (x - m) / jnp.sqrt(var + 1e-5) * s + b, rtol=1e-5, atol=1e-5)


def test_bfloat16_output_with_float32_statistics():
  x = _x().astype(jnp.bfloat16)
  m = BatchNorm(use_running_average=False, dtype=jnp.bfloat16, **KW)
  v = m.init(jax.random.key(0), x)
  y, upd = m.apply(v, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16 and upd["batch_stats"]["mean"].dtype == jnp.float32
  y_ref, _ = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16, **KW).apply(
      v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=0.05)


def test_running_average_must_be_given():
  with pytest.raises(ValueError):
    BatchNorm().init(jax.random.key(0), _x())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("constant_channel", [False, True])
def test_training_vjp_equals_autodiff_of_its_forward(dtype, constant_channel):
  """The written-out backward of the training forward (all three outputs: y, mean, var)
  against JAX's autodiff of the same forward, incl. a constant channel (variance exactly
  0: jnp.maximum's tie, where autodiff takes half)."""
  from jseg.models import norm

  x = np.random.default_rng(0).standard_normal((2, 4, 4, 6)).astype(np.float32) * 2 + 1
  if constant_channel:
    x[..., 2] = 2.0  # sums 64 and 128 over 32 pixels are exact: var_raw == 0
  x = jnp.asarray(x, dtype)
  rng = np.random.default_rng(1)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(6), jnp.float32)
  cts = (jnp.asarray(rng.standard_normal(x.shape), dtype),
         jnp.asarray(rng.standard_normal(6), jnp.float32),
         jnp.asarray(rng.standard_normal(6), jnp.float32))
  if constant_channel:
    assert float(norm._moments(x)[1][2]) == 0.0
  fwd = lambda x, s, b: norm._batch_norm_train_fwd(x, s, b, 1e-5, dtype)[0]
  custom = lambda x, s, b: norm._batch_norm_train(x, s, b, 1e-5, dtype)
  out, vjp = jax.vjp(custom, x, scale, bias)
  out_ref, vjp_ref = jax.vjp(fwd, x, scale, bias)
  for a, e in zip(out, out_ref):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(e, np.float32))
  # bfloat16: autodiff adds the input's three cotangent terms in bfloat16, ours in float32
  # then rounds once, so they differ by a few bfloat16 steps of the largest value.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, e in zip(vjp(cts), vjp_ref(cts)):
    assert a.dtype == e.dtype
    e = np.asarray(e, np.float32)
    np.testing.assert_allclose(np.asarray(a, np.float32), e, rtol=tol,
                               atol=tol * max(1.0, float(np.abs(e).max())))


@pytest.mark.parametrize("use_scale,use_bias", [(False, True), (True, False), (False, False)])
def test_without_scale_or_bias_matches_flax(use_scale, use_bias):
  x = _x()
  kw = dict(KW, use_running_average=False, use_scale=use_scale, use_bias=use_bias)
  v = nn.BatchNorm(**kw).init(jax.random.key(0), x)
  assert jax.tree.structure(BatchNorm(**kw).init(jax.random.key(0), x)) == jax.tree.structure(v)
  w = _x(x.shape, seed=3)

  def loss(m, x):
    out, upd = m.apply(v, x, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(out) * w), upd

  (l, upd), g = jax.value_and_grad(loss, argnums=1, has_aux=True)(BatchNorm(**kw), x)
  (l_ref, upd_ref), g_ref = jax.value_and_grad(loss, argnums=1, has_aux=True)(nn.BatchNorm(**kw), x)
  np.testing.assert_allclose(l, l_ref, rtol=1e-5)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), upd, upd_ref)
