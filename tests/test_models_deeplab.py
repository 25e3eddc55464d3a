"""DeepLab v1/v2/v3/v3+: shapes at odd sizes, finite gradients, output-stride switching,
parameter counts against the papers / torchvision, config errors.

Parameters for the tiny forward/backward checks come from NumPy (shapes from
``jax.eval_shape`` of ``init``), so each model compiles only its jitted steps.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from jseg.models import build_model
from jseg.models.layers import DepthwiseConv

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


def np_params(shapes, seed=0):
  """He-scaled NumPy values for every variable (BN: unit scale/var, zero bias/mean)."""
  rng = np.random.default_rng(seed)

  def init(path, s):
    name = path[-1].key
    if name in ("scale", "var"):
      return np.ones(s.shape, np.float32)
    if name in ("bias", "mean"):
      return np.zeros(s.shape, np.float32)
    fan_in = max(1, int(np.prod(s.shape[:-1])))
    return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(init, shapes)


def n_params(model, size=65):
  shapes = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, size, size, 3)), train=False))
  return int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes["params"])))


def run_train(model, x, labels):
  """One jitted train-mode loss and gradient with NumPy parameters (the only compile)."""
  v = np_params(jax.eval_shape(lambda: model.init(RNGS, x, train=False)))
  stats = {"batch_stats": v["batch_stats"]} if "batch_stats" in v else {}

  @jax.jit
  def train(params, x, labels):
    def loss_fn(p):
      (logits, aux), upd = model.apply({"params": p, **stats}, x, train=True,
                                       rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      for a in aux.values():
        loss = loss + 0.4 * optax.softmax_cross_entropy_with_integer_labels(a, labels).mean()
      return loss, (logits, aux, upd)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (logits, aux, upd)), grads = train(v["params"], x, labels)
  return dict(v=v, loss=loss, logits=logits, aux=aux, upd=upd, grads=grads, stats=stats)


def eval_shapes(model, v, x):
  """Shapes of ``(logits, aux)`` in eval mode, traced but not compiled."""
  return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 45, 37, 3)).astype(np.float32)
  labels = rng.integers(0, K, (2, 45, 37)).astype(np.int32)
  return x, labels


@pytest.mark.parametrize("key", ["deeplabv1", "deeplabv2", "deeplabv3", "deeplabv3plus"])
def test_odd_size_logits_and_finite_gradients(key, batch):
  x, labels = batch
  m = _model(**TINY[key])
  r = run_train(m, x, labels)
  logits, aux = eval_shapes(m, r["v"], x)
  assert r["logits"].shape == logits.shape == (2, 45, 37, K)
  assert r["aux"] == {} and aux == {}
  assert np.isfinite(float(r["loss"])) and np.isfinite(r["logits"]).all()
  leaves = jax.tree.leaves(r["grads"])
  assert all(np.isfinite(g).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) > 0.9 * len(leaves)
  if r["stats"]:  # BatchNorm statistics move in training mode
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), r["upd"]["batch_stats"],
                         r["stats"]["batch_stats"])
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("hw", [(45, 37), (97, 131), (64, 64)])
def test_deeplabv3plus_resnet_logits_at_input_size(hw):
  m = _model(**TINY["deeplabv3plus_resnet"])
  x = jnp.zeros((1, *hw, 3))
  v = jax.eval_shape(lambda: m.init(RNGS, x, train=False))
  logits, aux = eval_shapes(m, v, x)
  assert logits.shape == (1, *hw, K) and aux == {}
  assert "layer1" in v["params"]["backbone"] or "layer1_0" in v["params"]["backbone"]


def _conv_dilations(fn, *args):
  """Set of rhs (kernel) dilations of every convolution in fn's jaxpr."""
  out = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        out.add(tuple(eqn.params["rhs_dilation"]))
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
