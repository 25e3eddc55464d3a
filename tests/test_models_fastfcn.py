"""FastFCN: JPU output stride and channels, JPU vs dilated backbone, the three heads,
auxiliary head only in training, training on the CamVid sample, parameter count vs
torchvision FCN."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jseg.config import load_config
from jseg.models import build_model
from jseg.models.fastfcn import JPU
from jseg.trainer import quick_train
from tiny import camvid_config

K = 5
RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
TINY = dict(name="fastfcn", num_classes=K, depth=18, width=4, jpu_features=8, head_features=8,
            aux_features=4)


def _model(**kw):
  return build_model(ml_collections.ConfigDict({**TINY, **kw}))


def _shapes(m, x, train):
  v = jax.eval_shape(lambda: m.init(RNGS, x, train=False))
  out = jax.eval_shape(lambda v: m.apply(v, x, train=train, rngs={"dropout": jax.random.key(2)},
                                         capture_intermediates=True,
                                         mutable=["batch_stats", "intermediates"]), v)
  (logits, aux), state = out
  return v, logits, aux, state["intermediates"]


def test_jpu_gives_stride_8_with_four_branches():
  c3, c4, c5 = (jnp.zeros((1, s, s + 1, c)) for s, c in ((9, 16), (5, 32), (3, 64)))
  jpu = JPU(features=6)
  v = jax.eval_shape(lambda: jpu.init(RNGS, c3, c4, c5, train=False))
  y = jax.eval_shape(lambda v: jpu.apply(v, c3, c4, c5, train=False), v)
  assert y.shape == (1, 9, 10, 4 * 6)
  assert set(v["params"]) == {"conv3", "conv4", "conv5", "dilation1", "dilation2", "dilation4",
                              "dilation8"}
  assert v["params"]["dilation2"]["depthwise"]["kernel"].shape == (3, 3, 1, 3 * 6)


@pytest.mark.parametrize("jpu", [True, False])
def test_jpu_and_dilated_backbone_reach_the_same_stride(jpu):
  x = jnp.zeros((1, 65, 97, 3))
  _, logits, aux, inter = _shapes(_model(jpu=jpu), x, train=False)
  layer4 = inter["backbone"]["__call__"][0]["layer4"].shape[1:3]
  head_in = inter["head"]["__call__"][0].shape  # head output, at the head's resolution
  assert layer4 == ((3, 4) if jpu else (9, 13))  # stride 32 with the JPU, 8 dilated
  assert head_in[1:3] == (9, 13)  # both heads work at stride 8
  assert logits.shape == (1, 65, 97, K) and aux == {}


@pytest.mark.parametrize("head", ["psp", "aspp"])
def test_other_heads(head):
  x = jnp.zeros((1, 49, 35, 3))
  v, logits, aux, _ = _shapes(_model(head=head), x, train=True)
  assert logits.shape == (1, 49, 35, K) and aux["aux"].shape == (1, 49, 35, K)
  assert ("ppm" if head == "psp" else "aspp") in v["params"]


def test_psp_head_in_parts_equals_the_concatenation(monkeypatch):
  """The PSP head runs as pspnet.PyramidHead: same variables and logits as FCNHead over the
  upsampled concatenation (the form before)."""
  from flax import linen as nn

  from jseg.models import fastfcn
  from jseg.models.layers import resize_bilinear
  from jseg.models.pspnet import FCNHead

  class ConcatHead(FCNHead):
    @nn.compact
    def __call__(self, x, bins, train):
      y = jnp.concatenate([x] + [resize_bilinear(b, x.shape[1:3]) for b in bins], -1)
      return FCNHead.__call__(self, y, train)

  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 49, 35, 3)), jnp.float32)
  m = _model(head="psp")
  v = m.init(RNGS, x, train=False)
  rng = np.random.default_rng(1)
  v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map_with_path(
      lambda p, t: jnp.asarray(rng.uniform(0.5, 1.5, t.shape) if p[-1].key == "var"
                               else rng.normal(0, 0.1, t.shape), jnp.float32), v["batch_stats"])}
  parts = jax.jit(lambda v: m.apply(v, x, train=False)[0])(v)
  monkeypatch.setattr(fastfcn, "PyramidHead", ConcatHead)
  v_ref = m.init(RNGS, x, train=False)
  assert jax.tree.structure(v_ref["params"]) == jax.tree.structure(v["params"])
  concat = jax.jit(lambda v: m.apply(v, x, train=False)[0])(v)
  assert float(jnp.abs(concat).std()) > 1e-3
  np.testing.assert_allclose(parts, concat, rtol=1e-4, atol=1e-5 * float(jnp.abs(concat).max()))


def test_aux_head_only_in_training():
  x = jnp.zeros((2, 45, 37, 3))
  v, logits, aux, _ = _shapes(_model(), x, train=True)
  assert "aux_head" in v["params"]  # created even by an eval-mode init
  assert logits.shape == aux["aux"].shape == (2, 45, 37, K)
  _, logits, aux, _ = _shapes(_model(), x, train=False)
  assert logits.shape == (2, 45, 37, K) and aux == {}
  v, _, aux, _ = _shapes(_model(aux_head=False), x, train=True)
  assert aux == {} and "aux_head" not in v["params"]


@pytest.mark.slow
def test_trains_on_camvid_sample(tfds_cache):
  """A few jitted, data-sharded steps (jseg.trainer.quick_train) at tiny width on the shipped
  CamVid sample lower the loss; finite losses throughout also mean finite gradients."""
  tiny = dict(depth=18, width=4, jpu_features=8, head_features=8, aux_features=4)
  losses = quick_train(camvid_config("fastfcn", tiny, tfds_cache), 4)
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses


def test_parameter_count_is_torchvision_fcn_plus_jpu():
  """FastFCN's FCN-JPU = torchvision fcn_resnet101 (backbone, FCN head, aux head) + JPU."""
  w = 512
  jpu = sum(9 * cin * w + 2 * w for cin in (2048, 1024, 512))  # conv5/4/3 + BN
  jpu += 4 * (9 * 3 * w + 2 * 3 * w + 3 * w * w + 2 * w)  # depthwise+BN, pointwise+BN
  def count(**kw):
    m = build_model(ml_collections.ConfigDict(dict(name="fastfcn", num_classes=21, **kw)))
    shapes = jax.eval_shape(lambda: m.init(RNGS, jnp.zeros((1, 64, 64, 3)), train=False))
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))

  assert count(jpu=False) == 54_314_346  # torchvision fcn_resnet101 num_params
  assert count() == 54_314_346 + jpu


def test_config_errors():
  with pytest.raises(ValueError, match="head must be one of.*'unet'"):
    _model(head="unet")
  with pytest.raises(ValueError, match="output_stride must be 8 with the JPU.*got 16"):
    _model(output_stride=16)
  _model(jpu=False, output_stride=16)
