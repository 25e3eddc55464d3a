"""RefineNet: the fast stride-1 max-pool vs nn.max_pool, RCU/CRP residual structure,
odd input sizes, training on the CamVid sample, and the parameter count of the released
RefineNet-101."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from jseg.config import load_config
from jseg.models import build_model
from jseg.models.layers import max_pool_same
from jseg.models.refinenet import CRP, RCU, RefineNet
from jseg.trainer import quick_train
from tiny import camvid_config

K = 5
RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
TINY = dict(name="refinenet", num_classes=K, depth=18, width=4, features=8, rcu_blocks=1,
            crp_stages=2, out_rcu_blocks=1)


def _rand(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("k,hw", [(5, (9, 7)), (3, (6, 11)), (5, (3, 4))])
def test_max_pool_same_matches_nn_max_pool(k, hw):
  x = _rand((2, *hw, 3))
  r = _rand((2, *hw, 3), 1)
  p = (k - 1) // 2

  @jax.jit
  def both(x):
    ours = lambda t: max_pool_same(t, k)  # noqa: E731
    ref = lambda t: nn.max_pool(t, (k, k), padding=((p, p), (p, p)))  # noqa: E731
    return [(f(x), jax.grad(lambda t: jnp.sum(f(t) * r))(x)) for f in (ours, ref)]

  (y, g), (y_ref, g_ref) = both(x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(g, g_ref, atol=1e-6)
  with pytest.raises(ValueError, match="odd window; got 4"):
    max_pool_same(x, 4)


@pytest.mark.parametrize("k,hw", [(5, (9, 7)), (3, (6, 11)), (5, (2, 3)), (7, (13, 5))])
def test_max_pool_same_gradient_goes_to_torchs_position_under_ties(k, hw):
  """Ties (ReLU zeros, repeated values): every output's gradient goes to one input, the
  first maximum of its window in row-major order, as torch.nn.functional.max_pool2d;
  autodiff of the maxima split it between the tied inputs."""
  torch = pytest.importorskip("torch")
  x = np.maximum(np.round(_rand((2, *hw, 3)) * 2) / 2, 0).astype(np.float32)
  r = _rand((2, *hw, 3), 1)
  p = (k - 1) // 2
  g = jax.jit(jax.grad(lambda t: jnp.sum(max_pool_same(t, k) * r)))(x)
  tx = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
  ty = torch.nn.functional.max_pool2d(tx, k, 1, p)
  (ty * torch.tensor(r).permute(0, 3, 1, 2)).sum().backward()
  np.testing.assert_array_equal(max_pool_same(x, k), ty.detach().permute(0, 2, 3, 1).numpy())
  np.testing.assert_allclose(g, tx.grad.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  assert (x == 0).mean() > 0.3  # the case has ties


def test_rcu_and_crp_are_residual():
  """With the last conv of each unit zeroed, RCU and CRP are the identity (x + 0)."""
  x = _rand((1, 9, 9, 4))

  @jax.jit
  def run(x):
    rcu, crp = RCU(4, blocks=2), CRP(4, stages=3)
    vr = rcu.init(jax.random.key(0), x)
    vr = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 0 if "conv2" in jax.tree_util.keystr(path) else a, vr)
    vc = jax.tree.map(jnp.zeros_like, crp.init(jax.random.key(0), x))
    vc1 = crp.init(jax.random.key(1), x)
    return rcu.apply(vr, x), crp.apply(vc, x), crp.apply(vc1, x), vc1

  y_rcu, y_crp, y_crp1, vc1 = run(x)
  np.testing.assert_allclose(y_rcu, x, atol=1e-6)
  np.testing.assert_allclose(y_crp, x, atol=1e-6)
  # One CRP stage by hand: x + conv(maxpool5(x)).
  one = CRP(4, stages=1)
  p1 = {"params": {"stage1": vc1["params"]["stage1"]}}
  ref = x + jax.jit(nn.Conv(4, (3, 3), padding=1, use_bias=False).apply)(
      {"params": vc1["params"]["stage1"]}, max_pool_same(x, 5))
  np.testing.assert_allclose(jax.jit(one.apply)(p1, x), ref, rtol=1e-5, atol=1e-5)
  assert not np.allclose(y_crp1, x)


def test_logits_at_odd_input_sizes():
  m = build_model(ml_collections.ConfigDict(TINY))
  v = jax.eval_shape(lambda: m.init(RNGS, jnp.zeros((1, 64, 64, 3)), train=False))
  for hw in ((45, 37), (97, 131), (32, 33)):
    for train in (True, False):
      logits, aux = jax.eval_shape(lambda v: m.apply(
          v, jnp.zeros((2, *hw, 3)), train=train, rngs={"dropout": jax.random.key(2)},
          mutable=["batch_stats"])[0], v)
      assert logits.shape == (2, *hw, K) and aux == {}
  with pytest.raises(ValueError, match="at least 32x32"):
    jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, 31, 64, 3))), v)


@pytest.mark.slow
def test_trains_on_camvid_sample(tfds_cache):
  """A few jitted, data-sharded steps (jseg.trainer.quick_train) at tiny width on the shipped
  CamVid sample lower the loss; finite losses throughout also mean finite gradients."""
  tiny = {**{k: v for k, v in TINY.items() if k not in ("name", "num_classes")}, "dropout": 0.0}
  losses = quick_train(camvid_config("refinenet", tiny, tfds_cache), 4)
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


def test_parameter_count_matches_released_refinenet101():
  """Count the layers of DrSleep/refinenet-pytorch ``rf101`` (21 classes) independently."""

  def conv(cin, cout, k=3, bias=False):
    return k * k * cin * cout + (cout if bias else 0)

  def rcu(c, blocks):  # each block: 3x3 with bias, 3x3 without
    return blocks * (conv(c, c, bias=True) + conv(c, c))

  backbone = 44_549_160 - (2048 * 1000 + 1000)  # torchvision resnet101 minus fc
  top = conv(2048, 512) + rcu(512, 2) + 4 * conv(512, 512) + rcu(512, 3) + conv(512, 256)
  mid = sum(conv(cin, 256) + rcu(256, 2) + conv(256, 256) + 4 * conv(256, 256) + rcu(256, 3)
            + conv(256, 256) for cin in (1024, 512))
  last = conv(256, 256) + rcu(256, 2) + conv(256, 256) + 4 * conv(256, 256) + rcu(256, 3)
  reference = backbone + top + mid + last + conv(256, 21, bias=True)
  m = build_model(ml_collections.ConfigDict(dict(name="refinenet", num_classes=21)))
  shapes = jax.eval_shape(lambda: m.init(RNGS, jnp.zeros((1, 64, 64, 3)), train=False))
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"])) == reference


@pytest.mark.slow
def test_training_mode_logits_are_moderate_at_initialisation():
  """The BatchNorm-free decoder (pools, residual sums over four cascaded blocks) starts
  from PyTorch's default initialisation as the reference does: the training-mode logits
  at init stay O(1) (flax's default gave a standard deviation of ~46 here, and the paper
  configuration a first loss of 154 that diverged)."""
  m = RefineNet(num_classes=11, depth=18, width=16, features=32)
  x = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, (2, 64, 64, 3)), jnp.float32)
  v = jax.jit(lambda x: m.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                               train=False))(x)
  (y, _), _ = jax.jit(lambda v, x: m.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)},
                                           mutable=["batch_stats"]))(v, x)
  assert 0.05 < float(y.std()) < 3.0, float(y.std())


def test_residual_stream_relus_keep_only_their_outputs(monkeypatch):
  """The ReLUs on RefineNet's residual streams (``layers.relu_kept``): a block's gradient
  program keeps their outputs (the convolutions' inputs) and not the streams as well, which
  ``nn.relu`` made XLA keep (temporaries ratio 0.84 on one block; 0.83 on a whole tiny
  RefineNet)."""
  from flax import linen as nn
  from jseg.models import layers, refinenet
  m = refinenet.RefineNetBlock(16, rcu_blocks=2, crp_stages=2, out_rcu_blocks=2)
  x = jnp.asarray(_rand((2, 32, 32, 16)))
  v = jax.jit(lambda x: m.init(jax.random.key(0), x, None))(x)

  def temps():
    def loss(p, x):
      return jnp.sum(jnp.tanh(m.apply({"params": p}, x, None)))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(v["params"], x).compile().memory_analysis().temp_size_in_bytes

  ours = temps()
  monkeypatch.setattr(refinenet, "relu_kept", nn.relu)
  assert ours < 0.95 * temps()
