"""PSPNet: odd input sizes, auxiliary head only in training, output stride 8/16,
pyramid pooling against a NumPy adaptive-average-pool reference, and the ResNet-18/101
configs (parameter count vs the official Caffe model). PSPNet's training on the CamVid
sample is covered by tests/test_train.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jseg.config import load_config
from jseg.models import build_model
from jseg.models.pspnet import PyramidPooling

K = 5
RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
TINY = dict(name="pspnet", num_classes=K, depth=18, width=4, head_features=8, aux_features=4)


def _model(**kw):
  return build_model(ml_collections.ConfigDict({**TINY, **kw}))


def _apply_shapes(m, x, train):
  v = jax.eval_shape(lambda: m.init(RNGS, x, train=False))
  (logits, aux), state = jax.eval_shape(
      lambda v: m.apply(v, x, train=train, rngs={"dropout": jax.random.key(2)},
                        capture_intermediates=True, mutable=["batch_stats", "intermediates"]), v)
  return v, logits, aux, state["intermediates"]


@pytest.mark.parametrize("hw", [(45, 37), (97, 131), (64, 64)])
def test_logits_at_input_size_and_aux_only_in_training(hw):
  x = jnp.zeros((2, *hw, 3))
  v, logits, aux, _ = _apply_shapes(_model(), x, train=True)
  assert "aux_head" in v["params"]  # an eval-mode init creates it
  assert logits.shape == aux["aux"].shape == (2, *hw, K)
  _, logits, aux, _ = _apply_shapes(_model(), x, train=False)
  assert logits.shape == (2, *hw, K) and aux == {}
  _, _, aux, _ = _apply_shapes(_model(aux_head=False), x, train=True)
  assert aux == {}


@pytest.mark.parametrize("os_", [8, 16])
def test_output_stride(os_):
  x = jnp.zeros((1, 65, 97, 3))
  _, _, _, inter = _apply_shapes(_model(output_stride=os_), x, train=False)
  feats = inter["backbone"]["__call__"][0]
  assert feats["layer4"].shape[1:3] == (-(-65 // os_), -(-97 // os_))
  bins = inter["ppm"]["__call__"][0]  # the split head takes the bins at their pooled sizes
  assert [b.shape[1:] for b in bins] == [(s, s, feats["layer4"].shape[-1] // 4) for s in (1, 2, 3, 6)]
  _, _, _, inter = _apply_shapes(_model(output_stride=os_, split_head=False), x, train=False)
  assert inter["ppm"]["__call__"][0].shape[-1] == 2 * feats["layer4"].shape[-1]


@pytest.mark.parametrize("conv", ["auto", "xla"])
def test_split_head_same_parameters_outputs_and_gradients_as_concatenation(conv, monkeypatch):
  """The head's 3x3 convolution in parts (features at full size, pyramid bins at their pooled
  sizes) against the same convolution over the upsampled concatenation: same parameter tree
  and initial values, same logits at evaluation (BatchNorm folded on oneDNN) and in
  training, same gradients."""
  monkeypatch.setenv("JSEG_CONV", conv)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 45, 37, 3)), jnp.float32)
  split, concat = _model(split_head=True), _model(split_head=False)
  v = split.init(RNGS, x, train=False)
  v_concat = concat.init(RNGS, x, train=False)
  assert jax.tree.structure(v) == jax.tree.structure(v_concat)
  for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_concat)):
    np.testing.assert_array_equal(a, b)
  # Non-trivial running statistics, so that the evaluation fold's scale matters.
  rng = np.random.default_rng(1)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, t: jnp.asarray(rng.uniform(0.5, 1.5, t.shape) if p[-1].key == "var"
                               else rng.normal(0, 0.1, t.shape), jnp.float32), v["batch_stats"])
  v = {"params": v["params"], "batch_stats": stats}
  ev = [jax.jit(lambda v, m=m: m.apply(v, x, train=False)[0])(v) for m in (split, concat)]
  assert float(jnp.abs(ev[1]).std()) > 1e-3  # not all rectified away
  np.testing.assert_allclose(ev[0], ev[1], rtol=1e-4, atol=1e-5 * float(jnp.abs(ev[1]).max()))

  def loss(m):
    def f(p):
      (y, aux), _ = m.apply({"params": p, "batch_stats": stats}, x, train=True,
                            rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
      return jnp.mean(y ** 2) + jnp.mean(aux["aux"] ** 2)
    return jax.jit(jax.value_and_grad(f))

  (l0, g0), (l1, g1) = [loss(m)(v["params"]) for m in (split, concat)]
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  head0, head1 = g0["head"]["conv"]["conv"]["kernel"], g1["head"]["conv"]["conv"]["kernel"]
  assert head0.shape == head1.shape == (3, 3, 64, 8)  # layer4's 32 channels + 4 bins of 8
  assert float(jnp.abs(head0[:, :, 32:]).min()) > 0  # the bins' part of the kernel is trained
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()) + 1e-12)


def _np_adaptive_avg_pool(x, bins):
  n, h, w, c = x.shape
  out = np.zeros((n, bins, bins, c))
  for i in range(bins):
    h0, h1 = (i * h) // bins, -((-(i + 1) * h) // bins)
    for j in range(bins):
      w0, w1 = (j * w) // bins, -((-(j + 1) * w) // bins)
      out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


def _np_resize(x, size):
  """Half-pixel bilinear resize (align_corners=False)."""

  def weights(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] += 1 - (src - i0)
    m[np.arange(n_out), i1] += src - i0
    return m

  return np.einsum("ih,nhwc,jw->nijc", weights(x.shape[1], size[0]), x, weights(x.shape[2], size[1]))


def test_pyramid_pooling_matches_numpy_adaptive_pool():
  """With identity 1x1 convs and unit BN, each branch is the upsampled adaptive average pool."""
  c, bins = 3, (1, 2, 3, 6)
  x = np.abs(np.random.default_rng(0).standard_normal((2, 13, 10, c))).astype(np.float32) + 0.1
  ppm = PyramidPooling(bins, reduction_features=c)
  shapes = jax.eval_shape(lambda: ppm.init(RNGS, x, train=False))
  eye = np.eye(c, dtype=np.float32)[None, None]
  v = jax.tree_util.tree_map_with_path(
      lambda p, s: eye if p[-1].key == "kernel" else
      (np.ones if p[-1].key in ("scale", "var") else np.zeros)(s.shape, np.float32), shapes)
  y = np.asarray(jax.jit(lambda v, x: ppm.apply(v, x, train=False))(v, x))
  assert y.shape == (2, 13, 10, c * (1 + len(bins)))
  np.testing.assert_allclose(y[..., :c], x, rtol=1e-6)
  bn = 1 / np.sqrt(1 + 1e-5)  # eval BN with mean 0, var 1
  for i, b in enumerate(bins):
    ref = _np_resize(_np_adaptive_avg_pool(x.astype(np.float64), b), (13, 10)) * bn
    np.testing.assert_allclose(y[..., c * (i + 1):c * (i + 2)], ref, rtol=1e-5, atol=1e-6)


def _count(config):
  m = build_model(config.model)
  shapes = jax.eval_shape(lambda: m.init(RNGS, jnp.zeros((1, 64, 64, 3)), train=False))
  n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
  aux = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]["aux_head"]))
  return n, aux


def test_pspnet101_config_matches_official_model_size():
  """The official pspnet101_VOC2012_473.prototxt (21 classes, no aux branch at test time):
  stem 3x3 convs 64-64-128, ResNet-101 body, 4 x (1x1 2048->512 + BN), 3x3 4096->512 + BN,
  1x1 512->21 with bias. Our stem is 32-32-64 (ResNet-D), 0.16% fewer parameters."""
  resnet101_body = 44_549_160 - (2048 * 1000 + 1000) - (7 * 7 * 3 * 64 + 2 * 64)
  caffe_stem = 9 * (3 * 64 + 64 * 64 + 64 * 128) + 2 * (64 + 64 + 128)
  wider_layer1 = (128 - 64) * 64 + (128 - 64) * 256  # layer1 reads 128 channels, not 64
  head = 4 * (2048 * 512 + 2 * 512) + 9 * 4096 * 512 + 2 * 512 + 512 * 21 + 21
  official = resnet101_body + caffe_stem + wider_layer1 + head
  assert official == 65_708_501
  config = load_config("configs/pspnet_r101.py")
  config.model.num_classes = 21
  n, aux = _count(config)
  ours = n - aux
  our_stem = 9 * (3 * 32 + 32 * 32 + 32 * 64) + 2 * (32 + 32 + 64)
  assert official - ours == caffe_stem - our_stem + wider_layer1
  assert abs(ours - official) / official < 0.002
  assert aux == 9 * 1024 * 256 + 2 * 256 + 256 * 21 + 21


def test_pspnet18_config():
  config = load_config("configs/pspnet_r18.py")
  assert (config.model.depth, config.model.head_features, config.model.aux_features) == (18, 128, 64)
  n, aux = _count(config)
  body = 11_689_512 - (512 * 1000 + 1000) - (7 * 7 * 3 * 64 + 2 * 64)  # torchvision resnet18
  stem = 9 * (3 * 32 + 32 * 32 + 32 * 64) + 2 * (32 + 32 + 64)
  head = 4 * (512 * 128 + 2 * 128) + 9 * 1024 * 128 + 2 * 128 + 128 * 11 + 11
  assert n - aux == body + stem + head
  assert aux == 9 * 256 * 64 + 2 * 64 + 64 * 11 + 11
