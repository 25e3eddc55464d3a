"""Tests for jseg.compiling: XLA options that reach JAX's compile, per signature, and the
evaluation / prediction programs that use them (``config.eval_fusion_emitters``).

The tests' processes compile with the older emitters anyway (conftest.py), so the options
are read where JAX's compile receives them, with a spy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny import tiny_pspnet_config

from jseg import compiling, inference, trainer
from jseg import data as data_lib

OFF = {"xla_cpu_use_fusion_emitters": False}


@pytest.fixture
def seen(compile_options_seen):
  return compile_options_seen


def test_on_call_compiles_once_per_signature_with_the_options(seen):
  fn = compiling.OnCall(jax.jit(lambda a, b: a * 2 + b), OFF)
  x, y = jnp.arange(6.0), jnp.ones(6)
  np.testing.assert_array_equal(fn(x, y), x * 2 + y)
  np.testing.assert_array_equal(fn(x + 1, y), (x + 1) * 2 + y)  # same signature: no compile
  assert seen == [OFF]
  fn(jnp.arange(4.0), jnp.ones(4))  # a new shape compiles again, with the options
  fn(jnp.arange(6, dtype=jnp.int32), jnp.ones(6, jnp.int32))  # so does a new dtype
  assert seen == [OFF, OFF, OFF]
  assert len(fn._compiled) == 3


def test_on_call_inside_another_trace_uses_the_plain_jit(seen):
  fn = compiling.OnCall(jax.jit(lambda a: jnp.sin(a) * 3), OFF)
  x = jnp.linspace(0, 1, 5)
  jaxpr = jax.make_jaxpr(fn)(x)
  assert "sin" in str(jaxpr)
  outer = jax.jit(lambda a: fn(a) + 1)
  np.testing.assert_allclose(outer(x), jnp.sin(x) * 3 + 1, rtol=1e-6)
  assert OFF not in seen and not fn._compiled


def test_on_call_without_options_is_the_jit_itself(seen):
  jitted = jax.jit(lambda a: a - 1)
  fn = compiling.OnCall(jitted, None)
  assert compiling.OnCall(jitted, {}).options is None
  np.testing.assert_array_equal(fn(jnp.ones(3)), jnp.zeros(3))
  assert seen == [] and not fn._compiled  # jax.jit's own path, not Lowered.compile
  assert fn.lower(jnp.ones(3)).as_text() == jitted.lower(jnp.ones(3)).as_text()
  assert compiling.compile_kwargs(None) == {}
  assert compiling.compile_kwargs(OFF) == {"compiler_options": OFF}


def test_fusion_emitter_options_read_the_field():
  c = ml_collections.ConfigDict({"a": True, "b": False})
  assert compiling.fusion_emitter_options(c, "a") is None
  assert compiling.fusion_emitter_options(c, "b") == OFF  # the tests run on the CPU backend
  assert compiling.fusion_emitter_options(c, "missing") is None  # old configs: the default
  with pytest.raises(ValueError, match="config.b must be True or False"):
    compiling.fusion_emitter_options(ml_collections.ConfigDict({"b": "no"}), "b")
  assert trainer.eval_compiler_options(tiny_pspnet_config(eval_fusion_emitters=False)) == OFF
  assert trainer.eval_compiler_options(tiny_pspnet_config()) is None


def test_signature_tells_shapes_dtypes_and_structure_apart():
  a = compiling.signature({"x": jnp.ones((2, 3))}, 1.0)
  assert a == compiling.signature({"x": jnp.zeros((2, 3))}, 2.0)
  assert a != compiling.signature({"x": jnp.ones((3, 2))}, 1.0)
  assert a != compiling.signature({"x": jnp.ones((2, 3), jnp.int32)}, 1.0)
  assert a != compiling.signature({"y": jnp.ones((2, 3))}, 1.0)
  assert compiling.traced(1.0) is False


def _source(n: int = 3, size: int = 64) -> list[dict]:
  rng = np.random.default_rng(0)
  return [{"image": rng.standard_normal((size, size, 3)).astype(np.float32),
           "label": rng.integers(0, 11, (size, size)).astype(np.int32)} for _ in range(n)]


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluation_compiles_with_the_options_and_counts_the_same(seen, mode):
  """``eval_fusion_emitters=False``: the evaluator's program (whole images on device, or
  the host path's forward for sliding windows) compiles with the older emitters; the
  confusion matrix is the default's."""
  source = _source()
  out = {}
  for emitters in (True, False):
    config = tiny_pspnet_config(eval_fusion_emitters=emitters)
    config.inference.mode = mode
    config.inference.crop_size = (32, 32)
    config.inference.stride = (32, 32)
    run = trainer.setup(config)
    info = data_lib.get_info(config.data)
    evaluator = trainer.Evaluator(config, run.model, run.mesh, info)
    variables = trainer.variables(run.state.params, run.state.batch_stats)
    seen.clear()
    out[emitters] = evaluator.confusion(variables, source)
    assert (OFF in seen) == (not emitters), seen
    if not emitters:
      assert all(o == OFF for o in seen)
  assert out[True].sum() == 3 * 64 * 64
  np.testing.assert_array_equal(out[True], out[False])


def test_make_apply_fn_passes_the_options(seen):
  run = trainer.setup(tiny_pspnet_config())
  variables = trainer.variables(run.state.params, run.state.batch_stats)
  x = jnp.asarray(_source(1)[0]["image"])[None]
  seen.clear()  # setup compiles its initialiser with its own options
  plain = inference.make_apply_fn(run.model, variables)(x)
  assert OFF not in seen
  off = inference.make_apply_fn(run.model, variables, OFF)(x)
  assert seen[-1] == OFF
  np.testing.assert_allclose(np.asarray(off), np.asarray(plain), rtol=1e-5, atol=1e-5)
