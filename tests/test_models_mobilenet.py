"""MobileNetV2 backbone: strides per output stride, torchvision's count, fast depthwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jseg.models.backbones.mobilenet import InvertedResidual, MobileNetV2, channels
from tiny import assert_same_variables_and_training_bits, host_init


def _shapes(model, shape):
  def run():
    x = jnp.zeros(shape)
    v = model.init(jax.random.PRNGKey(0), x, train=False)
    return v, model.apply(v, x, train=False)

  return jax.eval_shape(run)


@pytest.mark.parametrize("os,strides", [
    (32, (2, 4, 8, 16, 32)), (16, (2, 4, 8, 16, 16)), (8, (2, 4, 8, 8, 8)),
])
def test_feature_strides(os, strides):
  _, feats = _shapes(MobileNetV2(width_mult=0.25, output_stride=os), (1, 97, 131, 3))
  ch = channels(0.25)
  for name, s in zip(("stem", "layer1", "layer2", "layer3", "layer4"), strides):
    # 3x3 stride-2 convs with padding 1 give ceil(H / 2) at every step.
    h, w = 97, 131
    for _ in range(int(np.log2(s))):
      h, w = -(-h // 2), -(-w // 2)
    assert feats[name].shape == (1, h, w, ch[name]), name


def test_parameter_count_matches_torchvision():
  variables, feats = _shapes(MobileNetV2(last_features=1280), (1, 224, 224, 3))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert feats["last"].shape == (1, 7, 7, 1280)
  assert ours + 1280 * 1000 + 1000 == 3_504_872  # torchvision mobilenet_v2


def test_backbone_gradient_uses_no_grouped_convolution(monkeypatch):
  # XLA's grouped convolutions are slow on CPU; oneDNN's are fast and used (test_layers.py).
  monkeypatch.setenv("JSEG_CONV", "xla")
  model = MobileNetV2(width_mult=0.25, output_stride=16)
  x = jnp.zeros((2, 64, 64, 3))

  def loss(variables):
    feats, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean(feats["layer4"] ** 2)

  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(abstract))
  assert "feature_group_count=1" in jaxpr and "feature_group_count=2" not in jaxpr


@pytest.mark.parametrize("stride,dilation,residual", [(2, 1, False), (1, 2, True)])
def test_block_gradients_finite(stride, dilation, residual):
  block = InvertedResidual(8, stride=stride, expansion=6, dilation=dilation)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 17, 15, 8))
  v = host_init(block, x, train=False)

  def loss(params, x):
    y, _ = block.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                       mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y)), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(v["params"], x)
  assert y.shape == (2, -(-17 // stride), -(-15 // stride), 8)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads[0]["dw_conv"]["kernel"]).max()) > 0
  # With the identity shortcut, zeroing the projection leaves y == x exactly.
  if residual:
    zero = jax.tree.map(jnp.zeros_like, v["params"]["project_bn"])
    params = {**v["params"], "project_bn": zero}
    y0, _ = block.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=False,
                        mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(x))


@pytest.mark.parametrize("stride,expansion,dilation", [(2, 6, 1), (1, 1, 1), (1, 6, 2)])
def test_block_equals_the_plain_layer_stack(stride, expansion, dilation):
  """The BatchNorms feeding the depthwise and projection convolutions (after ReLU6) through
  ``then`` change nothing: same parameters, outputs, statistics, gradients, bit for bit."""
  from flax import linen as nn

  from jseg.models.conv import Conv
  from jseg.models.layers import DepthwiseConv
  from jseg.models.norm import BatchNorm

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
      bn = lambda name: BatchNorm(use_running_average=not train, momentum=0.9,  # noqa: E731
                                  epsilon=1e-5, name=name)
      y = x
      if expansion != 1:
        y = Conv(8 * expansion, (1, 1), use_bias=False, kernel_init=init, name="expand_conv")(y)
        y = nn.relu6(bn("expand_bn")(y))
      y = DepthwiseConv(3, stride, dilation, name="dw_conv")(y)
      y = nn.relu6(bn("dw_bn")(y))
      y = Conv(8, (1, 1), use_bias=False, kernel_init=init, name="project_conv")(y)
      y = bn("project_bn")(y)
      return x + y if stride == 1 else y

  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 9, 8)), jnp.float32)
  assert_same_variables_and_training_bits(
      InvertedResidual(8, stride=stride, expansion=expansion, dilation=dilation), Plain(), x)


def test_bad_output_stride():
  with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32; got 4"):
    _shapes(MobileNetV2(output_stride=4), (1, 32, 32, 3))
