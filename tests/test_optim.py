"""Optimiser chains and schedules: hand-computed updates, exact restarts, Lookahead, EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jseg import optim
from jseg.config import base_config, load_config


def cfg(opt=None, sched=None, total=100):
  c = base_config()
  c.total_steps = total
  for k, v in (opt or {}).items():
    setattr(c.optimizer, k, v)
  for k, v in (sched or {}).items():
    setattr(c.schedule, k, v)
  return c


def params():
  """A Flax-like tree: conv kernel + bias, BatchNorm scale/bias."""
  return {
      "conv": {"kernel": jnp.full((3, 3, 2, 2), 1.0), "bias": jnp.full((2,), 1.0)},
      "bn": {"scale": jnp.full((2,), 1.0), "bias": jnp.full((2,), 1.0)},
  }


def grads_of(p, value=0.5):
  return jax.tree.map(lambda x: jnp.full_like(x, value), p)


def steps(tx, p, n, grad=0.5):
  state = tx.init(p)
  update = tx.update  # un-jitted: a few steps on tiny trees beat compiling each chain
  history = []
  for _ in range(n):
    u, state = update(grads_of(p, grad), state, p)
    p = optax.apply_updates(p, u)
    history.append(p)
  return p, state, history


def test_poly_with_warmup_values():
  c = cfg(sched={"name": "poly", "power": 0.9, "warmup_steps": 10, "warmup_ratio": 0.1}, total=110)
  _, sched = optim.build_optimizer(c)
  lr = 0.01
  assert float(sched(0)) == pytest.approx(0.1 * lr)
  assert float(sched(5)) == pytest.approx(0.1 * lr + 0.5 * 0.9 * lr)
  assert float(sched(10)) == pytest.approx(lr)
  assert float(sched(60)) == pytest.approx(lr * (1 - 50 / 100) ** 0.9, rel=1e-5)
  assert float(sched(110)) == pytest.approx(0.0, abs=1e-12)
  assert float(jax.jit(sched)(110)) == 0.0  # optax.polynomial_schedule gives NaN here under jit
  c = cfg(sched={"name": "poly", "min_lr": 1e-4})
  assert float(optim.build_schedule(c)(100)) == pytest.approx(1e-4)


def test_other_schedules():
  cos = optim.build_schedule(cfg(sched={"name": "cosine", "min_lr": 0.001}))
  assert float(cos(0)) == pytest.approx(0.01) and float(cos(50)) == pytest.approx(0.0055, rel=1e-5)
  assert float(cos(100)) == pytest.approx(0.001)
  step = optim.build_schedule(cfg(sched={"name": "step", "boundaries": (30, 60), "factor": 0.1, "warmup_steps": 5}))
  assert [float(step(s)) for s in (29, 30, 59, 60)] == pytest.approx([0.01, 0.001, 0.001, 0.0001])
  const = optim.build_schedule(cfg(sched={"name": "constant"}))
  assert float(const(77)) == pytest.approx(0.01)


def test_sgdr_restarts_at_exact_steps():
  c = cfg(sched={"name": "sgdr", "cycle_steps": 10, "cycle_mult": 2.0, "min_lr": 0.0, "warmup_steps": 4},
          total=100)
  sched = optim.build_schedule(c)
  lrs = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(101)), np.float64)
  # Cycles after the 4 warm-up steps: [4, 14), [14, 34), [34, 74), [74, 154).
  restarts = [s for s in range(1, 101) if lrs[s] > lrs[s - 1] and s > 4]
  assert restarts == [14, 34, 74]
  for start, length in ((4, 10), (14, 20), (34, 40), (74, 80)):
    assert lrs[start] == pytest.approx(0.01)
    if start + length // 2 <= 100:
      assert lrs[start + length // 2] == pytest.approx(0.005, rel=1e-5)
  assert lrs[13] == pytest.approx(0.01 * 0.5 * (1 + np.cos(np.pi * 9 / 10)), rel=1e-5)
  # Snapshots are the step counts after the last update of each complete cycle.
  assert optim.snapshot_steps(c, 100) == [14, 34, 74]
  assert optim.snapshot_steps(c, 154) == [14, 34, 74, 154]
  assert optim.snapshot_steps(cfg(), 100) == []
  # Eager (Python int) steps give the same values as the jitted ones.
  np.testing.assert_allclose([float(sched(s)) for s in (0, 13, 14, 74, 100)], lrs[[0, 13, 14, 74, 100]], rtol=1e-6)


def test_sgd_masked_weight_decay_leaves_bn_and_bias_untouched():
  c = cfg(opt={"name": "sgd", "momentum": 0.9, "weight_decay": 0.1, "learning_rate": 0.1},
          sched={"name": "constant"})
  tx, _ = optim.build_optimizer(c)
  p0 = params()
  p, _, _ = steps(tx, p0, 2, grad=0.0)
  # Zero gradients: only weight decay moves parameters; BN params and biases do not move.
  for path in (("conv", "bias"), ("bn", "scale"), ("bn", "bias")):
    np.testing.assert_array_equal(p[path[0]][path[1]], p0[path[0]][path[1]])
  # Kernel: v1 = wd*w0 = 0.1, w1 = 1 - 0.01 = 0.99; v2 = 0.9*0.1 + 0.1*0.99 = 0.189, w2 = 0.99 - 0.0189.
  np.testing.assert_allclose(p["conv"]["kernel"], 0.99 - 0.0189, rtol=1e-6)
  assert optim.decay_mask(p0) == {"conv": {"kernel": True, "bias": False},
                                  "bn": {"scale": False, "bias": False}}


def test_sgd_nesterov_and_adamw_match_optax():
  p0 = params()
  c = cfg(opt={"name": "sgd", "nesterov": True, "weight_decay": 0.0}, sched={"name": "constant"})
  tx, _ = optim.build_optimizer(c)
  ref = optax.sgd(0.01, momentum=0.9, nesterov=True)
  np.testing.assert_allclose(steps(tx, p0, 3)[0]["conv"]["kernel"], steps(ref, p0, 3)[0]["conv"]["kernel"])
  c = cfg(opt={"name": "adamw", "weight_decay": 0.05, "learning_rate": 1e-3}, sched={"name": "constant"})
  tx, _ = optim.build_optimizer(c)
  ref = optax.adamw(1e-3, weight_decay=0.05, mask=optim.decay_mask)
  a, b = steps(tx, p0, 3)[0], steps(ref, p0, 3)[0]
  jax.tree.map(np.testing.assert_allclose, a, b)
  c = cfg(opt={"name": "adam", "weight_decay": 0.0, "learning_rate": 1e-3}, sched={"name": "constant"})
  tx, _ = optim.build_optimizer(c)
  jax.tree.map(np.testing.assert_allclose, steps(tx, p0, 2)[0], steps(optax.adam(1e-3), p0, 2)[0])


def test_grad_clipping():
  c = cfg(opt={"name": "sgd", "momentum": 0.0, "weight_decay": 0.0, "learning_rate": 1.0,
               "grad_clip_norm": 1.0}, sched={"name": "constant"})
  tx, _ = optim.build_optimizer(c)
  p0 = {"w": jnp.zeros((2, 2))}
  u, _ = tx.update({"w": jnp.full((2, 2), 3.0)}, tx.init(p0), p0)
  assert float(optax.tree.norm(u)) == pytest.approx(1.0)


def test_lookahead_slow_weights_hand_computed():
  k, alpha, lr, g = 3, 0.5, 0.1, 1.0
  c = cfg(opt={"name": "sgd", "momentum": 0.0, "weight_decay": 0.0, "learning_rate": lr,
               "lookahead_k": k, "lookahead_alpha": alpha}, sched={"name": "constant"})
  tx, _ = optim.build_optimizer(c)
  p0 = {"w": jnp.array([1.0, -2.0])}
  p, state, hist = steps(tx, p0, 2 * k, grad=g)
  # Fast weights move by -lr*g per step; at step k: slow = w0 + alpha*(w0 - k*lr*g - w0).
  np.testing.assert_allclose(hist[0]["w"], p0["w"] - lr * g, rtol=1e-6)
  slow1 = p0["w"] + alpha * (-k * lr * g)
  np.testing.assert_allclose(hist[k - 1]["w"], slow1, rtol=1e-6)  # fast reset onto slow
  slow2 = slow1 + alpha * (-k * lr * g)
  np.testing.assert_allclose(optim.eval_params(p, state, c)["w"], slow2, rtol=1e-6)
  np.testing.assert_allclose(p["w"], slow2, rtol=1e-6)
  # Between syncs eval_params gives the slow weights, not the fast ones.
  p, state, _ = steps(tx, p0, k + 1, grad=g)
  np.testing.assert_allclose(optim.eval_params(p, state, c)["w"], slow1, rtol=1e-6)
  np.testing.assert_allclose(p["w"], slow1 - lr * g, rtol=1e-6)


def test_ema_weights_and_eval_params():
  d = 0.9
  c = cfg(opt={"name": "sgd", "momentum": 0.0, "weight_decay": 0.0, "learning_rate": 0.1,
               "ema_decay": d}, sched={"name": "constant"})
  tx, _ = optim.build_optimizer(c)
  p0 = {"w": jnp.array([1.0])}
  p, state, hist = steps(tx, p0, 3, grad=1.0)
  ema = 1.0
  for h in hist:
    ema = d * ema + (1 - d) * float(h["w"][0])
  assert float(optim.eval_params(p, state, c)["w"][0]) == pytest.approx(ema, rel=1e-6)
  assert float(p["w"][0]) == pytest.approx(0.7, rel=1e-6)
  plain = cfg()
  tx, _ = optim.build_optimizer(plain)
  assert optim.eval_params(p, tx.init(p), plain) is p
  with pytest.raises(ValueError, match="no EMA"):
    optim.eval_params(p, tx.init(p), c)


def test_errors_name_bad_values():
  with pytest.raises(KeyError, match="adamw, sgd"):
    optim.build_optimizer(cfg(opt={"name": "rmsprop"}))
  with pytest.raises(KeyError, match="sgdr"):
    optim.build_optimizer(cfg(sched={"name": "linear"}))
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.build_optimizer(cfg(sched={"warmup_steps": 100}))
  with pytest.raises(ValueError, match="boundaries"):
    optim.build_optimizer(cfg(sched={"name": "step", "boundaries": (50, 20)}))
  with pytest.raises(ValueError, match="lookahead"):
    optim.build_optimizer(cfg(opt={"lookahead_k": 5, "lookahead_alpha": 1.5}))


def test_plot_schedule_writes_png(tmp_path):
  from PIL import Image

  from jseg import plot_schedule

  config_file = tmp_path / "sgdr.py"
  config_file.write_text(
      "from jseg.config import base_config\n"
      "def get_config():\n"
      "  c = base_config()\n"
      "  c.total_steps = 60\n"
      "  c.schedule.name = 'sgdr'\n"
      "  c.schedule.cycle_steps = 20\n"
      "  return c\n")
  steps, lrs = plot_schedule.schedule_values(load_config(str(config_file)))
  assert steps[0] == 0 and steps[-1] == 60 and {19, 20, 39, 40} <= set(steps.tolist())
  assert lrs[steps.tolist().index(20)] == pytest.approx(0.01) and np.all(np.isfinite(lrs))
  out = tmp_path / "lr.png"
  plot_schedule.main([f"--config={config_file}", f"--out={out}", "--width=300", "--height=150"])
  assert Image.open(out).size == (300, 150)


def test_flax_train_state_contract_with_lookahead_and_ema():
  """The trainer's use: TrainState.apply_gradients with plain params, BN masked from decay."""
  import flax.linen as nn
  from flax.training import train_state

  from jseg import losses

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Conv(4, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      return nn.Conv(3, (1, 1))(x), {"aux": nn.Conv(3, (1, 1), name="aux")(x)}

  c = cfg(opt={"lookahead_k": 2, "ema_decay": 0.5, "grad_clip_norm": 1.0, "weight_decay": 1e-2},
          sched={"name": "sgdr", "cycle_steps": 2, "warmup_steps": 1}, total=5)
  model, tx = Tiny(), optim.build_optimizer(c)[0]
  loss_fn = losses.build_loss(c)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 3, size=(2, 8, 8)).astype(np.int32)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(2), x, train=False)
  mask = optim.decay_mask(variables["params"])
  assert mask["BatchNorm_0"] == {"scale": False, "bias": False}
  assert mask["Conv_0"] == {"kernel": True} and mask["aux"] == {"kernel": True, "bias": False}
  state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

  @jax.jit
  def step(state, stats):
    def f(p):
      (logits, aux), new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                       mutable=["batch_stats"])
      return loss_fn(logits, y, aux)[0], new["batch_stats"]
    (loss, stats), g = jax.value_and_grad(f, has_aux=True)(state.params)
    return state.apply_gradients(grads=g), stats, loss

  stats = variables["batch_stats"]
  for _ in range(3):
    state, stats, loss = step(state, stats)
    assert np.isfinite(float(loss))
  ev = optim.eval_params(state.params, state.opt_state, c)
  assert jax.tree.structure(ev) == jax.tree.structure(state.params)
  assert not np.allclose(ev["Conv_0"]["kernel"], state.params["Conv_0"]["kernel"])
  model.apply({"params": ev, "batch_stats": stats}, x, train=False)


@pytest.mark.parametrize("mode", ["auto", "xla"])
def test_global_norm_equals_optax_tree_norm(mode, monkeypatch):
  monkeypatch.setenv("JSEG_NORM", mode)
  rng = np.random.default_rng(0)
  tree = {"a": jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32),
          "b": {"c": jnp.asarray(rng.standard_normal((8,)), jnp.bfloat16),
                "d": jnp.asarray(rng.standard_normal(()), jnp.float32)}}
  got = optim.global_norm(tree)
  assert got.dtype == jnp.float32
  want = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # optax squares the bfloat16 leaf in bfloat16; ours upcasts first (closer to float64).
  np.testing.assert_allclose(float(got), float(optax.tree.norm(tree)), rtol=1e-5)
  assert float(optim.global_norm({})) == 0.0
  assert float(optim.global_norm({"w": jnp.array([3.0, 4.0])})) == 5.0


def test_global_norm_native_reads_the_leaves_where_they_lie(monkeypatch):
  """On jseg.native's kernels the norm is one custom call (no copy of every gradient into
  one array), summed in double in fixed pieces: the float64 value to float32 rounding,
  differentiable, and under vmap."""
  from jseg import native
  if not optim.norm_native_active():
    pytest.skip(native.onednn_error() or "jseg.native's kernels are not active here")
  rng = np.random.default_rng(1)
  # Leaves across the kernel's 65536-element pieces, and an empty one.
  tree = {"big": jnp.asarray(rng.standard_normal((3, 3, 64, 130)), jnp.float32),
          "odd": jnp.asarray(rng.standard_normal((65537,)), jnp.float32),
          "empty": jnp.zeros((0, 4), jnp.float32), "s": jnp.float32(2.0)}
  text = jax.jit(optim.global_norm).lower(tree).as_text()
  assert "JsegSumSquares" in text and "concatenate" not in text
  want = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))
  got = jax.jit(optim.global_norm)(tree)
  assert abs(float(got) - want) <= 1e-7 * want  # float32 rounding of a double sum
  monkeypatch.setenv("JSEG_NORM", "xla")
  xla = jax.jit(optim.global_norm)(tree)
  np.testing.assert_allclose(float(got), float(xla), rtol=1e-5)
  monkeypatch.setenv("JSEG_NORM", "native")
  g = jax.grad(optim.global_norm)(tree)  # d|t| / dt = t / |t|
  for k in tree:
    np.testing.assert_allclose(g[k], tree[k] / want, rtol=1e-5, atol=1e-7)
  batched = jax.jit(jax.vmap(optim.global_norm))({"w": jnp.asarray([[3.0, 4.0], [6.0, 8.0]])})
  np.testing.assert_allclose(batched, [5.0, 10.0])


@pytest.mark.parametrize("scale", [0.1, 10.0])  # below and above the threshold
def test_clip_by_global_norm_matches_optax(scale):
  rng = np.random.default_rng(1)
  g = {"k": jnp.asarray(rng.standard_normal((3, 3, 2, 4)) * scale, jnp.float32),
       "b": jnp.asarray(rng.standard_normal((4,)) * scale, jnp.float32)}
  ours, theirs = optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  u, s = ours.update(g, ours.init(g))
  v, _ = theirs.update(g, theirs.init(g))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), u, v)
  assert isinstance(s, optax.EmptyState)
  assert float(optim.global_norm(u)) == pytest.approx(min(1.0, float(optax.tree.norm(g))), rel=1e-5)
