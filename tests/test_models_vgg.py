"""VGG backbone: feature names and strides, ceil-mode pooling, FCN geometry, counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jseg.models.backbones.vgg import VGG, max_pool_2x2_ceil, min_input_size
from tiny import assert_same_variables_and_training_bits


def _shapes(model, shape, **kw):
  def run():
    x = jnp.zeros(shape)
    v = model.init(jax.random.PRNGKey(0), x, train=False)
    return v, model.apply(v, x, train=False, **kw)

  return jax.eval_shape(run)


def test_features_by_name_at_odd_size():
  _, feats = _shapes(VGG(depth=16, width=4), (2, 97, 131, 3))
  sizes = [(97, 131), (48, 65), (24, 32), (12, 16), (6, 8)]
  for s, ((h, w), ch) in enumerate(zip(sizes, (4, 8, 16, 32, 32))):
    assert feats[f"conv{s + 1}"].shape == (2, h, w, ch)
    assert feats[f"pool{s + 1}"].shape == (2, h // 2, w // 2, ch)
  assert "fc7" not in feats


def test_fcn_geometry_pad100_ceil_mode_fits_any_size():
  model = VGG(width=2, ceil_mode=True, first_padding=100, fc=True, fc_features=8)
  _, feats = _shapes(model, (1, 1, 1, 3))
  # 1 + 198 = 199 -> 100 -> 50 -> 25 -> 13 -> 7 (ceil) -> fc6 7x7 valid -> 1
  assert feats["pool5"].shape == (1, 7, 7, 16)
  assert feats["fc7"].shape == (1, 1, 1, 8)
  assert min_input_size(fc=True, ceil_mode=True, first_padding=100) == 1
  assert min_input_size() == 32
  assert min_input_size(fc=True) == 224
  with pytest.raises(ValueError, match="VGG-16 with fc6/fc7 needs inputs of at least 224x224"):
    _shapes(VGG(width=2, fc=True), (1, 223, 300, 3))


def test_ceil_pool_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  ref = np.full((2, 3, 4, 3), -np.inf, np.float32)
  for i in range(5):
    for j in range(7):
      ref[:, i // 2, j // 2] = np.maximum(ref[:, i // 2, j // 2], x[:, i, j])
  np.testing.assert_array_equal(np.asarray(max_pool_2x2_ceil(jnp.asarray(x))), ref)


@pytest.mark.parametrize("depth,bn,expected", [
    (16, False, 138_357_544),  # torchvision vgg16
    (16, True, 138_365_992),  # torchvision vgg16_bn
    (19, False, 143_667_240),  # torchvision vgg19
    (11, False, 132_863_336),  # torchvision vgg11
])
def test_parameter_count_matches_torchvision(depth, bn, expected):
  variables, _ = _shapes(VGG(depth=depth, batch_norm=bn, fc=True), (1, 224, 224, 3))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert ours + 4096 * 1000 + 1000 == expected  # plus torchvision's 1000-way classifier


def test_batchnorm_names_and_bad_depth():
  variables, _ = _shapes(VGG(depth=19, width=2, batch_norm=True), (1, 32, 32, 3))
  assert {"conv3_4", "bn5_4"} <= set(variables["params"])
  assert set(variables["batch_stats"]["bn1_1"]) == {"mean", "var"}
  with pytest.raises(ValueError, match="VGG depth must be one of .*got 17"):
    _shapes(VGG(depth=17), (1, 32, 32, 3))


@pytest.mark.parametrize("batch_norm", [True, False])
def test_stages_equal_the_plain_conv_bn_relu_stack(batch_norm):
  """Each BatchNorm feeding the stage's next conv through ``then`` changes nothing: same
  parameter tree and values, same features, statistics and gradients, bit for bit."""
  from flax import linen as nn

  from jseg.models.conv import Conv
  from jseg.models.layers import max_pool_2x2
  from jseg.models.norm import BatchNorm

  class Plain(nn.Module):  # VGG-11's layout, written out
    @nn.compact
    def __call__(self, x, train):
      feats = {}
      init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
      for s, (n, ch) in enumerate(zip((1, 1, 2, 2, 2), (2, 4, 8, 16, 16))):
        for i in range(n):
          x = Conv(ch, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init,
                   name=f"conv{s + 1}_{i + 1}")(x)
          if batch_norm:
            x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          name=f"bn{s + 1}_{i + 1}")(x)
          x = nn.relu(x)
        feats[f"conv{s + 1}"] = x
        x = max_pool_2x2(x)
        feats[f"pool{s + 1}"] = x
      return feats

  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 36, 40, 3)), jnp.float32)
  assert_same_variables_and_training_bits(VGG(depth=11, width=2, batch_norm=batch_norm), Plain(), x)
