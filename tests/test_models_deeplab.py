"""DeepLab v1/v2/v3/v3+: shapes at odd sizes, training on the CamVid sample, output-stride
switching, parameter counts against the papers / torchvision, config errors.

Shape and structure checks trace the models with ``jax.eval_shape`` (no compilation);
the only compiled code is each model's training step in ``quick_train``.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from jseg.config import load_config
from jseg.models import build_model
from jseg.models.layers import DepthwiseConv
from jseg.trainer import quick_train
from tiny import camvid_config

K = 5
RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
TINY = {
    "deeplabv1": dict(name="deeplabv1", width=4, fc_features=16),
    "deeplabv2": dict(name="deeplabv2", depth=18, width=4),
    "deeplabv3": dict(name="deeplabv3", depth=18, width=4, aspp_features=8, output_stride=16,
                      eval_output_stride=8),
    "deeplabv3plus": dict(name="deeplabv3plus", width=0.0625, middle_blocks=2, aspp_features=8,
                          decoder_features=8, low_level_features=4),
    "deeplabv3plus_resnet": dict(name="deeplabv3plus", backbone="resnet", depth=18, width=4,
                                 aspp_features=8, decoder_features=8, low_level_features=4),
}


def _model(num_classes=K, **kw):
  return build_model(ml_collections.ConfigDict(dict(num_classes=num_classes, **kw)))


def n_params(model, size=65):
  shapes = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, size, size, 3)), train=False))
  return int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes["params"])))


def eval_shapes(model, v, x, train=False):
  """Shapes of ``(logits, aux)``, traced but not compiled."""
  return jax.eval_shape(lambda v, x: model.apply(
      v, x, train=train, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])[0], v, x)


@pytest.mark.parametrize("key", sorted(TINY))
@pytest.mark.parametrize("hw", [(45, 37), (97, 131)])
def test_logits_at_odd_input_sizes(key, hw):
  m = _model(**TINY[key])
  x = jnp.zeros((2, *hw, 3))
  v = jax.eval_shape(lambda: m.init(RNGS, x, train=False))
  for train in (True, False):
    logits, aux = eval_shapes(m, v, x, train)
    assert logits.shape == (2, *hw, K) and logits.dtype == jnp.float32 and aux == {}


@pytest.mark.parametrize("key,overrides", [
    ("deeplabv1", dict(width=4, fc_features=16, dropout=0.0)),
    ("deeplabv2", dict(depth=18, width=4)),
    ("deeplabv3", dict(depth=18, width=4, aspp_features=8)),
    ("deeplabv3plus", dict(width=0.0625, middle_blocks=2, aspp_features=8, decoder_features=8,
                           low_level_features=4)),
])
@pytest.mark.slow
def test_trains_on_camvid_sample(key, overrides, tfds_cache):
  """A few jitted, data-sharded steps (jseg.trainer.quick_train) at tiny width on the shipped
  CamVid sample lower the loss; finite losses throughout also mean finite gradients."""
  losses = quick_train(camvid_config(key, overrides, tfds_cache), 4)
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


def _conv_dilations(fn, *args):
  """Set of rhs (kernel) dilations of every convolution in fn's jaxpr (XLA's or oneDNN's)."""
  out = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        out.add(tuple(eqn.params["rhs_dilation"]))
      if eqn.primitive.name == "ffi_call" and eqn.params["target_name"].startswith("JsegConv"):
        out.add(tuple(int(d) for d in dict(eqn.params["attributes"])["dilation"].val))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return {d[0] for d in out}


def test_deeplabv3_output_stride_selectable_at_train_and_eval():
  m = _model(**TINY["deeplabv3"])  # train 16, eval 8
  x = jnp.zeros((1, 64, 64, 3))
  v = jax.eval_shape(lambda: m.init(RNGS, x, train=False))

  def layer4(train):
    _, inter = jax.eval_shape(lambda v: m.apply(
        v, x, train=train, rngs={"dropout": jax.random.key(0)}, capture_intermediates=True,
        mutable=["intermediates", "batch_stats"]), v)
    return inter["intermediates"]["backbone"]["__call__"][0]["layer4"].shape

  assert layer4(True)[1:3] == (4, 4)   # stride 16 in training
  assert layer4(False)[1:3] == (8, 8)  # stride 8 at evaluation, same parameters
  train_d = _conv_dilations(lambda v: m.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)},
                                              mutable=["batch_stats"]), v)
  eval_d = _conv_dilations(lambda v: m.apply(v, x, train=False), v)
  # Multi-grid (1, 2, 4) on layer4's rate, ASPP rates (6, 12, 18) doubled at stride 8.
  # ResNet-18's layer4 has two blocks: multi-grid (1, 2) x rate.
  assert {2, 4, 6, 12, 18} <= train_d and not {8, 24, 36} & train_d
  assert {2, 4, 8, 12, 24, 36} <= eval_d and not {6, 18} & eval_d


def test_deeplabv3plus_xception_output_stride_and_decoder_stride():
  x = jnp.zeros((1, 64, 64, 3))
  for os_, rates in ((16, {6, 12, 18}), (8, {12, 24, 36})):
    m = _model(**{**TINY["deeplabv3plus"], "output_stride": os_})
    v = jax.eval_shape(lambda: m.init(RNGS, x, train=False))
    _, inter = jax.eval_shape(lambda v: m.apply(v, x, train=False, capture_intermediates=True,
                                                mutable=["intermediates"]), v)
    feats = inter["intermediates"]["backbone"]["__call__"][0]
    assert feats["out"].shape[1:3] == (64 // os_,) * 2
    assert feats["low_level"].shape[1:3] == (16, 16)  # decoder fuses stride-4 features
    assert rates <= _depthwise_rates(m, v, x)  # separable ASPP: rates x2 at stride 8


def _depthwise_rates(m, v, x):
  """Depthwise rates are slice strides, not conv dilations: read them from the modules."""
  rates = set()

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, DepthwiseConv):
      rates.add(context.module.dilation)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v: m.apply(v, x, train=False), v)
  return rates


def test_deeplabv1_large_fov_layout_and_paper_parameter_count():
  m = _model(num_classes=21, name="deeplabv1")
  x = jnp.zeros((1, 65, 65, 3))
  v = jax.eval_shape(lambda: m.init(RNGS, x, train=False))
  assert v["params"]["fc6"]["kernel"].shape == (3, 3, 512, 1024)
  assert v["params"]["fc7"]["kernel"].shape == (1, 1, 1024, 1024)
  assert {2, 12} <= _conv_dilations(lambda v: m.apply(v, x), v)  # conv5 rate 2, fc6 rate 12
  # DeepLab v1 paper (ICLR 2015) Table 2: DeepLab-LargeFOV has 20.5M parameters.
  assert round(n_params(m) / 1e6, 1) == 20.5


def test_deeplabv2_and_v3_parameter_counts_match_torchvision():
  resnet101_no_fc = 44_549_160 - (2048 * 1000 + 1000)  # torchvision resnet101 num_params minus fc
  aspp_l = 4 * (3 * 3 * 2048 * 21 + 21)  # four 3x3 classifiers, rates 6/12/18/24
  assert n_params(_model(num_classes=21, name="deeplabv2")) == resnet101_no_fc + aspp_l
  # torchvision deeplabv3_resnet101 (60,996,202) adds an aux FCNHead(1024) and a 3x3 conv
  # (+BN) after ASPP that the paper does not have.
  aux = 3 * 3 * 1024 * 256 + 2 * 256 + 256 * 21 + 21
  extra_conv = 3 * 3 * 256 * 256 + 2 * 256
  assert n_params(_model(num_classes=21, name="deeplabv3")) == 60_996_202 - aux - extra_conv


def test_config_errors_name_the_bad_value():
  with pytest.raises(ValueError, match="output_stride.*got 32"):
    _model(name="deeplabv3", output_stride=32)
  with pytest.raises(ValueError, match="eval_output_stride.*got 4"):
    _model(name="deeplabv3plus", eval_output_stride=4)
  m = _model(name="deeplabv3plus", backbone="vgg")
  with pytest.raises(ValueError, match="backbone.*'vgg'"):
    jax.eval_shape(lambda: m.init(RNGS, jnp.zeros((1, 64, 64, 3)), train=False))
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(lambda: _model(name="deeplabv1").init(RNGS, jnp.zeros((64, 64, 3))))
