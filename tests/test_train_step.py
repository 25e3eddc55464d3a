"""The training step as two programs (``trainer.SplitStep``) against the single program."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from jseg import parallel, trainer
from tiny import tiny_pspnet_config


def _batches(n: int) -> list[dict]:
  rs = np.random.RandomState(0)
  out = []
  for _ in range(n):
    b = {"image": rs.randn(4, 64, 64, 3).astype(np.float32),
         "label": rs.randint(0, 11, (4, 64, 64)).astype(np.int32)}
    b["label"][:, :8] = 255
    out.append(b)
  return out


def _train(split: bool, compiled: bool = False):
  config = tiny_pspnet_config(dropout=0.1, split_update=split,
                              **{"optimizer.lookahead_k": 2, "optimizer.grad_clip_norm": 1.0})
  run = trainer.setup(config)
  assert isinstance(run.step_fn, trainer.SplitStep) == split
  state, out = run.state, []
  step = run.step_fn
  for host in _batches(3):
    batch = parallel.shard_batch(host, run.mesh)
    if compiled and step is run.step_fn:
      step = run.step_fn.lower(state, batch, run.step_rng).compile()
    state, m = step(state, batch, run.step_rng)
    out.append({k: float(v) for k, v in m.items()})
  return state, out, step


@pytest.fixture(scope="module")
def single():
  return _train(split=False)


def _assert_same(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_split_step_equals_the_single_program(single):
  state1, metrics1, _ = single
  state2, metrics2, _ = _train(split=True)
  assert int(state2.step) == 3
  _assert_same((state1.params, state1.batch_stats, state1.opt_state),
               (state2.params, state2.batch_stats, state2.opt_state))
  for m1, m2 in zip(metrics1, metrics2):
    assert m1.keys() == m2.keys()
    for k in m1:
      assert m2[k] == pytest.approx(m1[k], rel=1e-5), k
  # the parameters moved: the comparison is not between two untouched states
  assert metrics2[0]["loss"] != metrics2[-1]["loss"]


def test_lowered_and_compiled_split_step(single):
  state1, metrics1, _ = single
  state2, metrics2, compiled = _train(split=True, compiled=True)
  assert isinstance(compiled, trainer.SplitStep)
  _assert_same(state1.params, state2.params)
  assert metrics2[-1]["loss"] == pytest.approx(metrics1[-1]["loss"], rel=1e-5)
  assert compiled.cost_analysis()["flops"] > 0
  assert compiled.as_text().count("HloModule") == 2


def test_update_program_donates_the_state():
  config = tiny_pspnet_config()
  run = trainer.setup(config)
  state = run.state
  batch = parallel.shard_batch(_batches(1)[0], run.mesh)
  new, _ = run.step_fn(state, batch, run.step_rng)
  jax.block_until_ready(new)
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.is_deleted(), "the old state's buffers should be reused for the new state"
  assert not jax.tree.leaves(new.params)[0].is_deleted()


@pytest.mark.slow
def test_initial_state_compiled_for_memory_has_the_default_compile_bits():
  """``Setup.state`` compiles the initialiser with its own compiler options (CPU: no fusion
  emitters, for the compiler's memory); the parameters are the same bits as the default
  compilation's."""
  run = trainer.setup(tiny_pspnet_config())
  ref = jax.jit(run.init_fn)(run.init_rng)  # default options
  got = run.state
  leaves_a, leaves_b = jax.tree.leaves((got.params, got.batch_stats, got.opt_state)), \
      jax.tree.leaves((ref.params, ref.batch_stats, ref.opt_state))
  assert len(leaves_a) == len(leaves_b) > 10
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_program_writes_into_the_previous_steps_gradients(monkeypatch):
  """The gradients of 1 MiB and more (here: threshold lowered to 64 KiB) are kept between
  calls and donated to the next gradient program, so XLA reuses their (already mapped)
  buffers; ``release`` drops them."""
  from jseg import runtime
  monkeypatch.setattr(runtime, "MMAP_THRESHOLD", 1 << 16)
  run = trainer.setup(tiny_pspnet_config())
  step, state = run.step_fn, run.state
  batches = [parallel.shard_batch(b, run.mesh) for b in _batches(3)]
  state, _ = step(state, batches[0], run.step_rng)
  kept = step._spare
  big = [p for p in jax.tree.leaves(state.params) if p.size * 4 >= 1 << 16]
  assert 0 < len(big) < len(jax.tree.leaves(state.params))
  assert [g.shape for g in kept] == [p.shape for p in big]
  state, m = step(state, batches[1], run.step_rng)
  jax.block_until_ready(state)
  assert all(g.is_deleted() for g in jax.tree.leaves(kept)), "previous gradients not reused"
  assert not any(g.is_deleted() for g in jax.tree.leaves(step._spare))
  assert np.isfinite(float(m["loss"]))
  step.release()
  assert step._spare is None
  state, m = step(state, batches[2], run.step_rng)  # fresh buffers again
  assert int(state.step) == 3 and np.isfinite(float(m["loss"]))
  text = step.lower(state, batches[0], run.step_rng).compile().grads_fn.as_text()
  assert "input_output_alias" in text


def test_step_compiled_with_the_older_fusion_emitters(compile_options_seen):
  """``config.step_fusion_emitters=False``: both programs of the step compile with XLA:CPU's
  LLVM-IR emitters, on the trainer's path (the step called) and on the bench's (lowered,
  compiled); the step can still be traced inside another trace; same values as the default.
  (The tests' processes compile with those emitters anyway, see conftest.py, so the options
  are read where JAX's compile receives them.)"""
  seen = compile_options_seen
  off = {"xla_cpu_use_fusion_emitters": False}
  hosts = _batches(2)
  out = {}
  for emitters in (True, False):
    run = trainer.setup(tiny_pspnet_config(step_fusion_emitters=emitters))
    assert trainer.step_compiler_options(run.config) == (None if emitters else off)
    state = run.state
    batch = parallel.shard_batch(hosts[0], run.mesh)
    jaxpr = jax.make_jaxpr(run.step_fn)(state, batch, run.step_rng)  # the bench's FLOP count
    assert "grad_step_into" in str(jaxpr) and "update_step" in str(jaxpr)
    seen.clear()
    losses = []
    for host in hosts:
      state, m = run.step_fn(state, parallel.shard_batch(host, run.mesh), run.step_rng)
      losses.append(float(m["loss"]))
    assert seen == ([] if emitters else [off, off])  # compiled once, both programs
    if not emitters:
      run.step_fn.release()
      assert all(c._spare is None for c in run.step_fn._compiled.values())
      seen.clear()
      lowered = run.step_fn.lower(state, batch, run.step_rng)
      lowered.compile()
      assert seen == [off, off]
    out[emitters] = (state.params, losses)
  _assert_same(out[True][0], out[False][0])
  assert out[False][1] == pytest.approx(out[True][1], rel=1e-6)


def test_step_fusion_emitters_is_checked():
  # ml_collections refuses a string for the shipped bool field; a config built elsewhere
  # (a dict, an old run's file) is checked by the trainer.
  with pytest.raises(TypeError):
    tiny_pspnet_config(step_fusion_emitters="no")
  with pytest.raises(ValueError, match="step_fusion_emitters must be True or False"):
    trainer.step_compiler_options(ml_collections.ConfigDict({"step_fusion_emitters": "no"}))
  with pytest.raises(ValueError, match="needs config.split_update=True"):
    trainer.setup(tiny_pspnet_config(step_fusion_emitters=False, split_update=False))
