"""Aligned Xception-65: feature strides, atrous rates, parameter count vs timm, the scanned
middle flow vs an unrolled one, and no grouped convolutions anywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jseg.models.backbones import xception
from jseg.models.layers import DepthwiseConv
from tiny import assert_same_variables_and_training_bits

KEY = jax.random.key(0)


def _init_shapes(m, x):
  return jax.eval_shape(lambda: m.init(KEY, x, train=False))


def _feature_shapes(m, x):
  v = _init_shapes(m, x)
  return jax.eval_shape(lambda v: m.apply(v, x, train=False), v)


@pytest.mark.parametrize("os_,top", [(8, (9, 12)), (16, (5, 6)), (32, (3, 3))])
def test_feature_strides_at_odd_size(os_, top):
  x = jnp.zeros((1, 65, 93, 3))
  f = _feature_shapes(xception.Xception65(output_stride=os_, width=0.125, middle_blocks=2), x)
  ch = xception.channels(0.125)
  assert f["stem"].shape == (1, 33, 47, ch["stem"])
  assert f["low_level"].shape == (1, 17, 24, ch["low_level"])  # stride 4 for the v3+ decoder
  assert f["out"].shape == (1, *top, ch["out"])


def _depthwise_calls(m, v, x):
  """(stride, dilation) of every DepthwiseConv call, in order."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, DepthwiseConv):
      calls.append((context.module.stride, context.module.dilation))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v: m.apply(v, x, train=False), v)
  return calls


@pytest.mark.parametrize("os_,rates", [(32, {1}), (16, {1, 2}), (8, {1, 2, 4})])
def test_strides_become_atrous_rates(os_, rates):
  x = jnp.zeros((1, 64, 64, 3))
  m = xception.Xception65(output_stride=os_, width=0.125, middle_blocks=1, scan_middle=False)
  calls = _depthwise_calls(m, _init_shapes(m, x), x)
  assert len(calls) == 3 * 3 + 3 + 3 + 3  # entry, middle (1 module), exit 1, exit 2
  assert sum(s == 2 for s, _ in calls) == {32: 4, 16: 3, 8: 2}[os_]
  assert {d for _, d in calls} == rates
  assert calls[-1][1] == max(rates)  # last module at the largest rate


def test_multi_grid_multiplies_last_module_rates():
  x = jnp.zeros((1, 64, 64, 3))
  m = xception.Xception65(output_stride=16, width=0.125, middle_blocks=1, multi_grid=(1, 2, 4))
  assert [d for _, d in _depthwise_calls(m, _init_shapes(m, x), x)[-3:]] == [2, 4, 8]


def test_parameter_count_matches_timm_xception65():
  """timm's xception65 (the TF DeepLab port) has 39.92M parameters with its 1000-way classifier."""
  shapes = _init_shapes(xception.Xception65(), jnp.zeros((1, 65, 65, 3)))
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
  assert round((n + 2048 * 1000 + 1000) / 1e6, 2) == 39.92
  assert shapes["params"]["middle"]["module"]["sepconv1"]["pointwise"]["kernel"].shape == (
      16, 1, 1, 728, 728)  # 16 middle modules stacked by nn.scan


def _conv_groups(jaxpr, out):
  """feature_group_count of every convolution in a jaxpr, including scan/jit bodies."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      out.add(eqn.params["feature_group_count"])
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _conv_groups(inner, out)
  return out


def test_no_grouped_convolution_in_forward_or_backward(monkeypatch):
  # XLA's grouped convolutions are slow on CPU; oneDNN's are fast and used (test_layers.py).
  monkeypatch.setenv("JSEG_CONV", "xla")
  m = xception.Xception65(width=0.125, middle_blocks=2)
  x = jnp.zeros((1, 32, 32, 3))
  v = _init_shapes(m, x)
  loss = lambda p, s: m.apply({"params": p, "batch_stats": s}, x, train=True,  # noqa: E731
                              mutable=["batch_stats"])[0]["out"].sum()
  jaxpr = jax.make_jaxpr(jax.grad(loss))(v["params"], v["batch_stats"]).jaxpr
  assert _conv_groups(jaxpr, set()) == {1}


def test_scanned_middle_flow_equals_unrolled():
  x = np.random.default_rng(0).standard_normal((1, 33, 35, 3)).astype(np.float32)
  kw = dict(width=0.0625, middle_blocks=3)
  scanned = xception.Xception65(**kw)
  unrolled = xception.Xception65(scan_middle=False, **kw)
  rng = np.random.default_rng(1)
  # Random values everywhere (BN statistics positive) so the comparison covers every variable.
  v = jax.tree.map(lambda s: (0.5 + 0.5 * rng.random(s.shape)).astype(np.float32),
                   _init_shapes(scanned, x))
  vu = {c: {k: t for k, t in v[c].items() if k != "middle"} for c in v}
  for c in v:
    for i in range(3):
      vu[c][f"middle_{i}"] = jax.tree.map(lambda a: a[i], v[c]["middle"])
  assert jax.tree.map(jnp.shape, vu) == jax.tree.map(jnp.shape, _init_shapes(unrolled, x))
  y = jax.jit(lambda v, x: scanned.apply(v, x, train=False)["out"])(v, x)
  yu = jax.jit(lambda v, x: unrolled.apply(v, x, train=False)["out"])(vu, x)
  np.testing.assert_allclose(y, yu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_second,relu_inside", [(True, False), (False, False), (False, True)])
def test_module_equals_its_units_called_one_by_one(keep_second, relu_inside):
  """Handing each unit's output to the next unit's depthwise conv through ``then``
  (``separable_chain``) changes nothing: same parameter tree and values, outputs, statistics
  and gradients as calling every ``SeparableConv`` whole, with the ReLUs in between."""

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      y, second = x, None
      for i, f in enumerate((6, 6, 8)):
        fused = not relu_inside and i < 2 and not (i == 1 and keep_second)
        if not relu_inside and (i == 0 or (i == 2 and keep_second)):
          y = nn.relu(y)
        y = xception.SeparableConv(f, 2 if i == 2 else 1, 2, relu_inside, fused,
                                   name=f"sepconv{i + 1}")(y, train)
        second = y if i == 1 and keep_second else second
      s = xception.Conv(8, (1, 1), strides=2, use_bias=False, name="shortcut")(x)
      return y + xception._bn("shortcut_bn", train, jnp.float32)(s), second

  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 13, 11, 5)), jnp.float32)
  ours = xception.XceptionModule((6, 6, 8), 2, 2, relu_inside=relu_inside, keep_second=keep_second)
  assert_same_variables_and_training_bits(ours, Plain(), x)


def test_bad_settings_raise():
  x = jnp.zeros((1, 64, 64, 3))
  with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32; got 4"):
    _init_shapes(xception.Xception65(output_stride=4), x)
  with pytest.raises(ValueError, match="multi_grid needs 3 rates"):
    _init_shapes(xception.Xception65(width=0.125, middle_blocks=1, multi_grid=(1, 2)), x)
