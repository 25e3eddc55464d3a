"""Tests for jseg.inference against independent NumPy / jax.image references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jseg import inference

C, K = 2, 3
_rng = np.random.default_rng(0)
W_PIX = jnp.asarray(_rng.normal(size=(C, K)), jnp.float32)
W_CTX = jnp.asarray(_rng.normal(size=(C, K)), jnp.float32)
V_RAMP = jnp.asarray(_rng.normal(size=(K,)), jnp.float32)


def make_fn(context=False, ramp=False):
  """A jitted toy network; ``calls['traces']`` counts compilations."""
  calls = {"traces": 0, "shapes": set()}

  @jax.jit
  def f(x):
    calls["traces"] += 1
    calls["shapes"].add(x.shape)
    y = x @ W_PIX
    if context:  # depends on the whole input: window placement matters
      y = y + x.mean(axis=(1, 2), keepdims=True) @ W_CTX
    if ramp:  # not flip-equivariant: flip TTA matters
      y = y + jnp.linspace(0.0, 1.0, x.shape[2])[None, None, :, None] * V_RAMP
    return y

  return f, calls


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def images(*sizes):
  return [_rng.normal(size=(h, w, C)).astype(np.float32) for h, w in sizes]


@pytest.mark.parametrize("n_in,n_out", [(7, 13), (13, 7), (10, 10), (5, 1)])
def test_interp_matrix_matches_jax_resize(n_in, n_out):
  v = _rng.normal(size=(n_in, 4)).astype(np.float32)
  ref = np.asarray(jax.image.resize(v, (n_out, 4), "bilinear", antialias=False))
  m = inference.interp_matrix(n_in, n_out, n_in + 3, n_out + 2)
  vp = np.concatenate([v, np.full((3, 4), 7.0, np.float32)])  # padding must be ignored
  np.testing.assert_allclose((m @ vp)[:n_out], ref, atol=1e-5)
  assert np.all(m[n_out:] == 0)
  mf = inference.interp_matrix(n_in, n_out, flip=True, flip_out=True)
  np.testing.assert_allclose(mf @ v[::-1], ref[::-1], atol=1e-5)


def test_whole_varied_sizes_one_compile_and_exact():
  f, calls = make_fn()
  ims = images((40, 50), (45, 60), (33, 64), (64, 64), (40, 50))
  out = inference.predict_logits(f, ims, {"mode": "whole", "bucket": 64, "batch_size": 2})
  assert calls["traces"] == 1 and calls["shapes"] == {(2, 64, 64, C)}
  for im, o in zip(ims, out):
    assert o.shape == im.shape[:2] + (K,)
    np.testing.assert_allclose(o, np_log_softmax(im @ np.asarray(W_PIX)), atol=1e-5)
  assert inference.count_compiles_hint([im.shape[:2] for im in ims], {"bucket": 64}) == 1


def test_array_input_and_labels():
  f, _ = make_fn()
  x = np.stack(images((20, 30), (20, 30), (20, 30)))
  lp = inference.predict_logits(f, x, {"batch_size": 2})
  assert lp.shape == (3, 20, 30, K) and lp.dtype == np.float32
  np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-5)
  lab = inference.predict_labels(f, x, {"batch_size": 2})
  np.testing.assert_array_equal(lab, np.argmax(x @ np.asarray(W_PIX), -1))


def ref_slide(fn, img, crop, stride, wts):
  """MMSegmentation's slide_inference written out with Python loops."""
  H, W = img.shape[:2]
  ch, cw = crop
  sh, sw = stride
  ph, pw = max(H, ch), max(W, cw)
  pad = np.zeros((ph, pw, img.shape[2]), np.float32)
  pad[:H, :W] = img
  out = np.zeros((ph, pw, K))
  norm = np.zeros((ph, pw))
  for hi in range(max(H - ch + sh - 1, 0) // sh + 1):
    for wi in range(max(W - cw + sw - 1, 0) // sw + 1):
      y1, x1 = hi * sh, wi * sw
      y2, x2 = min(y1 + ch, H), min(x1 + cw, W)
      y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
      lg = np.asarray(fn(jnp.asarray(pad[None, y1 : y1 + ch, x1 : x1 + cw])))[0]
      out[y1 : y1 + ch, x1 : x1 + cw] += lg * wts[..., None]
      norm[y1 : y1 + ch, x1 : x1 + cw] += wts
  return np_log_softmax(out / norm[..., None])[:H, :W]


@pytest.mark.parametrize("blend", ["average", "gaussian"])
def test_slide_matches_reference(blend):
  f, calls = make_fn(context=True)
  crop, stride = (16, 24), (10, 16)
  cfg = {"mode": "slide", "crop_size": crop, "stride": stride, "blend": blend, "batch_size": 3, "bucket": 32}
  ims = images((37, 50), (16, 24), (12, 30))  # several windows; exactly one; smaller than crop
  out = inference.predict_logits(f, ims, cfg)
  wts = inference.blend_weights(crop, blend, 0.125)
  for im, o in zip(ims, out):
    np.testing.assert_allclose(o, ref_slide(f, im, crop, stride, wts), atol=1e-4)
  assert calls["shapes"] <= {(3, 16, 24, C), (1, 16, 24, C)}  # the reference's batch of 1 too


def test_gaussian_weights():
  w = inference.blend_weights((9, 5), "gaussian", 0.125)
  assert w.shape == (9, 5) and w[4, 2] == pytest.approx(1.0)
  np.testing.assert_allclose(w[0, 2], np.exp(-0.5 * (4 / (0.125 * 9)) ** 2), rtol=1e-5)
  np.testing.assert_allclose(w, w[::-1, ::-1])


def ref_multiscale(fn, img, scales, flip):
  H, W = img.shape[:2]
  acc = 0.0
  n = 0
  for s in scales:
    for fl in (False, True) if flip else (False,):
      im = img[:, ::-1] if fl else img
      h, w = int(H * s + 0.5), int(W * s + 0.5)
      xs = jax.image.resize(jnp.asarray(im), (h, w, C), "bilinear", antialias=False)
      lg = jax.image.resize(fn(xs[None])[0], (H, W, K), "bilinear", antialias=False)
      lg = np.asarray(lg)[:, ::-1] if fl else np.asarray(lg)
      acc = acc + np.exp(np_log_softmax(lg))
      n += 1
  return np.log(acc / n)


def test_multiscale_flip_matches_reference():
  f, _ = make_fn(context=True, ramp=True)
  scales = (0.5, 1.5)
  ims = images((21, 30))
  out = inference.predict_logits(f, ims, {"mode": "multiscale", "scales": scales, "flip": True, "bucket": 0})
  for im, o in zip(ims, out):
    np.testing.assert_allclose(o, ref_multiscale(f, im, scales, True), atol=1e-4)


def test_flip_and_bucketing_pointwise_exact():
  # A pointwise network gives the same answer with padding, flips and scale 1.
  f, calls = make_fn()
  ims = images((30, 41), (50, 20))
  cfg = {"mode": "multiscale", "scales": (1.0,), "flip": True, "bucket": 32, "batch_size": 2}
  out = inference.predict_logits(f, ims, cfg)
  for im, o in zip(ims, out):
    np.testing.assert_allclose(o, np_log_softmax(im @ np.asarray(W_PIX)), atol=1e-5)
  sizes = [im.shape[:2] for im in ims]
  assert len(calls["shapes"]) == inference.count_compiles_hint(sizes, cfg)


def test_make_apply_fn_with_flax_model():
  model = nn.Conv(K, (3, 3))
  x = np.stack(images((24, 24)))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(x))

  class Wrap(nn.Module):  # jseg models return (logits, aux)
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Conv(K, (3, 3), name="conv")(x), {}

  fn = inference.make_apply_fn(Wrap(), {"params": {"conv": variables["params"]}})
  lp = inference.predict_logits(fn, x, {"bucket": 0})
  np.testing.assert_allclose(lp, np_log_softmax(np.asarray(model.apply(variables, x))), atol=1e-5)


@pytest.mark.parametrize("bad,word", [
    ({"mode": "tiled"}, "mode"), ({"blend": "max"}, "blend"), ({"stride": (300, 300)}, "stride"),
    ({"scales": ()}, "scales"), ({"batch_size": 0}, "batch_size"), ({"crop_size": (0, 4)}, "crop_size"),
])
def test_bad_config_named(bad, word):
  with pytest.raises(ValueError, match=word):
    inference.settings(bad)


def test_bad_image_shape():
  f, _ = make_fn()
  with pytest.raises(ValueError, match="expected"):
    inference.predict_logits(f, np.zeros((4, 4, C), np.float32))


def test_crf_block_refines_with_raw_images():
  from jseg import crf

  f, _ = make_fn()
  ims = np.stack(images((12, 16), (12, 16)))
  raw = (np.clip(ims[..., :1] * 40 + 128, 0, 255)).astype(np.uint8)
  cfg = inference.default_config()
  cfg.crf.enabled = True
  cfg.crf.iterations = 3
  cfg.crf.bi_xy_std = 5.0
  out = inference.predict_logits(f, ims, cfg, raw_images=raw)
  plain = inference.predict_logits(f, ims, {"mode": "whole"})
  ref = np.stack([crf.dense_crf(lp, r, {"iterations": 3, "bi_xy_std": 5.0}) for lp, r in zip(plain, raw)])
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert not np.allclose(out, plain, atol=1e-3)
  with pytest.raises(ValueError, match="raw_images"):
    inference.predict_logits(f, ims, cfg)
