"""SegNet / Bayesian SegNet: index unpooling by hand and vs torch, sharding, shapes,
parameter count, Monte-Carlo dropout, training on the CamVid sample."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jseg.config import load_config
from jseg.models.segnet import SegNet, max_unpool_2x2, mc_predict
from tiny import (assert_same_variables_and_training_bits, camvid_config, host_init,
                  xla_flags_with_devices)

REPO = Path(__file__).resolve().parent.parent


# Windows: top-left max 5 at (0,1), top-right 8 at (1,2), bottom-left 9 at (3,0), and a
# bottom-right tie of four 1s, which goes to the first position in row-major order (2,2).
REF = np.array([[1, 5, 2, 0],
                [3, 2, 8, 1],
                [0, 0, 1, 1],
                [9, 0, 1, 1]], np.float32)
Y = np.array([[10, 20], [30, 40]], np.float32)
EXPECTED = np.array([[0, 10, 0, 0],
                     [0, 0, 20, 0],
                     [0, 0, 40, 0],
                     [30, 0, 0, 0]], np.float32)


def test_unpool_puts_values_at_argmax_positions():
  out = max_unpool_2x2(jnp.asarray(Y)[None, :, :, None], jnp.asarray(REF)[None, :, :, None])
  np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], EXPECTED)
  # Odd size: the dropped last row/column stays zero; channels are independent.
  ref = np.zeros((1, 5, 5, 2), np.float32)
  ref[0, :4, :4, 0] = REF
  ref[0, :4, :4, 1] = -REF  # maxima: (0,0); (0,3); ties (2,0),(2,1),(3,1) and all of BR: first wins
  ref[0, 4, :, :] = 100.0  # larger than everything, but outside every window
  y = np.stack([Y, Y + 1], axis=-1)[None]
  out = np.asarray(max_unpool_2x2(jnp.asarray(y), jnp.asarray(ref)))
  np.testing.assert_array_equal(out[0, :4, :4, 0], EXPECTED)
  expected1 = np.zeros((4, 4), np.float32)
  expected1[0, 0], expected1[0, 3], expected1[2, 0], expected1[2, 2] = 11, 21, 31, 41
  np.testing.assert_array_equal(out[0, :4, :4, 1], expected1)
  assert np.all(out[0, 4, :] == 0) and np.all(out[0, :, 4] == 0)


def test_unpool_gradient_routes_back_from_the_argmax_positions():
  w = jnp.arange(16.0).reshape(1, 4, 4, 1)
  grad = jax.grad(lambda y: jnp.sum(max_unpool_2x2(y, jnp.asarray(REF)[None, :, :, None]) * w))(
      jnp.asarray(Y)[None, :, :, None])
  np.testing.assert_array_equal(np.asarray(grad)[0, :, :, 0], [[1, 6], [12, 10]])


def test_unpool_matches_torch_max_unpool():
  torch = pytest.importorskip(
      "torch", reason="torch not installed: `pip install torch==2.13.0` runs this comparison")
  x = np.random.default_rng(0).normal(size=(2, 7, 9, 3)).astype(np.float32)
  y = np.random.default_rng(1).normal(size=(2, 3, 4, 3)).astype(np.float32)
  tx = torch.from_numpy(x).permute(0, 3, 1, 2)
  _, idx = torch.nn.functional.max_pool2d(tx, 2, 2, return_indices=True)
  ref = torch.nn.functional.max_unpool2d(torch.from_numpy(y).permute(0, 3, 1, 2), idx, 2, 2,
                                         output_size=(7, 9))
  ours = max_unpool_2x2(jnp.asarray(y), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy())


SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jseg.models.segnet import max_unpool_2x2
from jseg.models.layers import max_pool_2x2
mesh = Mesh(np.array(jax.devices()), ("data",))
batch = NamedSharding(mesh, P("data"))
x = np.random.default_rng(0).normal(size=(4, 10, 6, 3)).astype(np.float32)
def f(x):
  grad = jax.grad(lambda x: jnp.sum(max_unpool_2x2(max_pool_2x2(x), x) ** 2))(x)
  return max_unpool_2x2(max_pool_2x2(x) * 2.0, x), grad
out, grad = jax.jit(f, in_shardings=batch, out_shardings=batch)(jax.device_put(x, batch))
ref_out, ref_grad = jax.jit(f)(x)
print(json.dumps({"devices": len(jax.devices()),
                  "sharded": out.sharding.spec == P("data") and grad.sharding.spec == P("data"),
                  "same": bool(np.array_equal(out, ref_out) and np.array_equal(grad, ref_grad)),
                  "nonzero": int((np.asarray(out) != 0).sum())}))
"""


def test_unpool_under_jit_and_batch_sharding():
  env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(2), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  # One value per 2x2 window survives: 4 * 5 * 3 * 3 of the 4 * 10 * 6 * 3 positions.
  assert res == {"devices": 2, "sharded": True, "same": True, "nonzero": 180}


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_output_at_input_resolution(dropout):
  model = SegNet(11, width=2, dropout=dropout)
  x = jnp.zeros((2, 97, 131, 3))

  def run():
    v = model.init(jax.random.PRNGKey(0), x)
    train = model.apply(v, x, train=True, mutable=["batch_stats"],
                        rngs={"dropout": jax.random.PRNGKey(1)})
    return model.apply(v, x), train[0]

  (logits, aux), (train_logits, train_aux) = jax.eval_shape(run)
  assert logits.shape == train_logits.shape == (2, 97, 131, 11)
  assert aux == train_aux == {}


@pytest.mark.slow
def test_decoder_equals_the_plain_unit_stack():
  """The decoder's BatchNorms feeding the next convolution (or the classifier) through
  ``then`` change nothing: same parameter tree and values, logits, statistics and
  gradients as calling each ConvBNReLUBias whole, bit for bit."""
  from flax import linen as nn

  from jseg.models.backbones.vgg import VGG
  from jseg.models.conv import Conv
  from jseg.models.segnet import DECODER, ConvBNReLUBias

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      feats = VGG(depth=16, width=2, batch_norm=True, name="backbone")(x, train)
      y = feats["pool5"]
      for stage in (5, 4, 3, 2, 1):
        y = max_unpool_2x2(y, feats[f"conv{stage}"])
        for conv_name, mult in DECODER[stage]:
          y = ConvBNReLUBias(2 * mult, name=conv_name)(y, train)
      return Conv(3, (3, 3), padding=((1, 1), (1, 1)), name="conv1_1_D")(y), {}

  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  assert_same_variables_and_training_bits(SegNet(3, width=2), Plain(), x)


def test_too_small_input_names_the_minimum():
  model = SegNet(11, width=2)
  with pytest.raises(ValueError, match="at least 32x32 pixels; got 31x64"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 31, 64, 3))))


def test_parameter_count_of_the_caffe_segnet():
  # segnet_train.prototxt: 13 encoder + 13 decoder 3x3 convs with bias, BN (scale, shift)
  # after all but the 3x3 classifier (11 classes).
  enc = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
         (256, 512)] + [(512, 512)] * 5
  dec = [(512, 512)] * 5 + [(512, 256), (256, 256), (256, 256), (256, 128), (128, 128),
                            (128, 64), (64, 64)]
  ref = sum(9 * i * o + o + 2 * o for i, o in enc + dec) + 9 * 64 * 11 + 11
  v = jax.eval_shape(lambda: SegNet(11).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(v["params"])) == ref == 29_449_355


@pytest.fixture(scope="module")
def mc_results():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 48, 3))
  out = {}
  for dropout, chunk in ((0.5, 2), (0.0, None)):
    model = SegNet(5, width=2, dropout=dropout)
    v = host_init(model, x)
    out[dropout] = jax.jit(mc_predict, static_argnums=(0, 4, 5))(
        model, v, x, jax.random.PRNGKey(3), 4, chunk)
  return out


def test_mc_dropout_gives_uncertainty(mc_results):
  r = mc_results[0.5]
  assert r["mean"].shape == r["variance"].shape == (1, 32, 48, 5)
  assert r["entropy"].shape == (1, 32, 48)
  np.testing.assert_allclose(np.asarray(r["mean"]).sum(-1), 1.0, rtol=1e-5)
  assert float(r["variance"].max()) > 1e-4
  ent = np.asarray(r["entropy"])
  assert np.all(ent >= 0) and np.all(ent <= np.log(5) + 1e-5)
  ref = -(np.asarray(r["mean"]) * np.log(np.asarray(r["mean"]))).sum(-1)
  np.testing.assert_allclose(ent, ref, rtol=1e-5, atol=1e-6)


def test_mc_without_dropout_has_zero_variance(mc_results):
  assert float(jnp.abs(mc_results[0.0]["variance"]).max()) < 1e-12


@pytest.mark.parametrize("name", ["segnet", "bayesian_segnet"])
@pytest.mark.slow
def test_trains_on_camvid_sample(name, tfds_cache):
  """A few steps at tiny width on the shipped CamVid sample lower the loss (finite
  losses throughout also mean the gradients were finite: one NaN poisons the params)."""
  from jseg.trainer import quick_train

  c = camvid_config(name, {"width": 4}, tfds_cache)
  losses = quick_train(c, 5)
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
