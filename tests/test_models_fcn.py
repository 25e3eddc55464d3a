"""FCN-32s/16s/8s: sub-pixel transposed conv, bilinear init, crops vs a torch port of the
Caffe net, any input size, parameter count, training on the CamVid sample."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jseg.config import load_config
from jseg.models.fcn import FCN, BilinearUpsample, bilinear_kernel, phase_transpose_conv
from tiny import host_init

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _transpose_conv_reference(x: np.ndarray, k: np.ndarray, s: int) -> np.ndarray:
  """Scatter definition of a transposed conv: each input pixel stamps its kernel."""
  n, h, w, _ = x.shape
  kh = k.shape[0]
  out = np.zeros((n, (h - 1) * s + kh, (w - 1) * s + kh, k.shape[-1]))
  for i in range(h):
    for j in range(w):
      out[:, i * s : i * s + kh, j * s : j * s + kh] += np.einsum("nc,abco->nabo", x[:, i, j], k)
  return out


@pytest.mark.parametrize("s,h,w", [(2, 3, 5), (3, 4, 2), (8, 2, 3)])
def test_phase_transpose_conv_matches_scatter_definition(s, h, w):
  rng = np.random.default_rng(s)
  x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
  k = rng.normal(size=(2 * s, 2 * s, 3, 4)).astype(np.float32)
  y = np.asarray(phase_transpose_conv(jnp.asarray(x), jnp.asarray(k), s))
  np.testing.assert_allclose(y, _transpose_conv_reference(x, k, s), rtol=1e-5, atol=1e-5)


def test_bilinear_initialisation_interpolates():
  np.testing.assert_allclose(bilinear_kernel(4, 1, 1)[:, 0, 0, 0], [0.0625, 0.1875, 0.1875, 0.0625])
  k = bilinear_kernel(4, 2, 3)
  assert np.all(k[:, :, 0, 1] == 0) and np.all(k[:, :, 1, 1] == k[:, :, 0, 0])
  # A ramp stays a ramp (slope 1/s) away from the borders: bilinear interpolation.
  s = 4
  up = BilinearUpsample(2, s)
  ramp = jnp.asarray(np.add.outer(np.arange(6.0), 2 * np.arange(7.0))[None, :, :, None]
                     * np.ones(2), jnp.float32)
  y, _ = jax.jit(lambda x: up.init_with_output(jax.random.PRNGKey(0), x))(ramp)
  inner = np.asarray(y)[0, 2 * s : -2 * s, 2 * s : -2 * s, 1]
  np.testing.assert_allclose(np.diff(inner, axis=0), 1 / s, atol=1e-5)
  np.testing.assert_allclose(np.diff(inner, axis=1), 2 / s, atol=1e-5)


@pytest.mark.parametrize("variant", [32, 16, 8])
@pytest.mark.parametrize("size", [(97, 131), (1, 1), (5, 300)])
def test_output_at_input_resolution_for_any_size(variant, size):
  model = FCN(5, variant=variant, width=2, fc_features=4)
  x = jnp.zeros((2, *size, 3))
  logits, aux = jax.eval_shape(
      lambda: model.init_with_output(jax.random.PRNGKey(0), x, train=False)[0])
  assert logits.shape == (2, *size, 5) and aux == {}


def test_bad_variant():
  with pytest.raises(ValueError, match="variant must be one of .*got 4"):
    jax.eval_shape(lambda: FCN(5, variant=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))


def _count(model, shape=(1, 64, 64, 3)) -> int:
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(v["params"]))


def test_parameter_count_of_the_caffe_fcn8s():
  # voc-fcn8s layer by layer: VGG-16 convs, fc6 7x7x512x4096, fc7, three 1x1 score
  # layers, 4x4 / 4x4 / 16x16 deconvolutions (21 -> 21, no bias).
  convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512)] + [(512, 512)] * 5
  ref = sum(9 * i * o + o for i, o in convs)
  ref += 49 * 512 * 4096 + 4096 + 4096 * 4096 + 4096
  ref += (4096 + 1) * 21 + (512 + 1) * 21 + (256 + 1) * 21
  ref += (16 + 16 + 256) * 21 * 21
  assert _count(FCN(21, variant=8)) == ref == 134_489_759


def test_matches_torch_port_of_the_caffe_fcn8s():
  """Crops and fusion against an independent torch port of voc-fcn8s (pad 100, ceil-mode
  pools, score_pool4 crop 5, score_pool3 crop 9, final crop 31), on an odd-sized input."""
  torch = pytest.importorskip(
      "torch", reason="torch not installed: `pip install torch==2.13.0` runs this comparison")
  tnn, F = torch.nn, torch.nn.functional
  model = FCN(3, variant=8, width=2, fc_features=8, dropout=0.5)
  x = np.random.default_rng(1).normal(size=(1, 37, 53, 3)).astype(np.float32)
  variables = host_init(model, jnp.asarray(x), train=False)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)

  p = jax.tree.map(lambda a: torch.from_numpy(np.asarray(a)), variables["params"])

  def conv(t, layer, padding=0):
    return F.conv2d(t, layer["kernel"].permute(3, 2, 0, 1), layer["bias"], padding=padding)

  def deconv(t, layer, s):
    return F.conv_transpose2d(t, layer["kernel"].permute(2, 3, 0, 1), stride=s)

  with torch.no_grad():
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    feats, b = {}, p["backbone"]
    for stage, n in enumerate((2, 2, 3, 3, 3), start=1):
      for i in range(1, n + 1):
        t = F.relu(conv(t, b[f"conv{stage}_{i}"], 100 if (stage, i) == (1, 1) else 1))
      t = F.max_pool2d(t, 2, 2, ceil_mode=True)
      feats[stage] = t
    t = F.relu(conv(F.relu(conv(t, b["fc6"])), b["fc7"]))
    up2 = deconv(conv(t, p["score_fr"]), p["upscore2"], 2)
    h, w = up2.shape[2:]
    fuse4 = up2 + conv(feats[4], p["score_pool4"])[:, :, 5 : 5 + h, 5 : 5 + w]
    up4 = deconv(fuse4, p["upscore_pool4"], 2)
    h, w = up4.shape[2:]
    fuse3 = up4 + conv(feats[3], p["score_pool3"])[:, :, 9 : 9 + h, 9 : 9 + w]
    ref = deconv(fuse3, p["upscore8"], 8)[:, :, 31 : 31 + 37, 31 : 31 + 53]
  np.testing.assert_allclose(np.asarray(logits), ref.permute(0, 2, 3, 1).numpy(),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["fcn8s", "fcn16s", "fcn32s"])
@pytest.mark.slow
def test_trains_on_camvid_sample(name, tfds_cache):
  """A few SGD steps at tiny width on the shipped CamVid sample lower the loss (finite
  losses throughout also mean the gradients were finite: one NaN poisons the params)."""
  from jseg.trainer import quick_train

  c = load_config(str(CONFIGS / f"{name}.py"))
  c.model.width, c.model.fc_features, c.model.dropout = 4, 16, 0.0
  c.data.cache_dir, c.batch_size = tfds_cache, 24
  # The whole 24-image sample, downscaled to 48x64, not cropped or flipped, is every
  # step's batch, so the losses show training progress rather than batch-to-batch noise.
  c.data.crop_size, c.data.scale_range, c.data.hflip = (48, 64), (0.13334, 0.13334), False
  c.optimizer.name, c.optimizer.learning_rate = "adam", 1e-3
  losses = quick_train(c, 5)
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
