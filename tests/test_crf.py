"""Tests for jseg.crf: the lattice filter and mean field against dense O(N^2) references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jseg import crf

_rng = np.random.default_rng(0)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def edge_problem(h=24, w=32, k=3, noise=1.0, seed=0):
  """Two flat colour regions split by a vertical edge; a noisy unary."""
  rng = np.random.default_rng(seed)
  img = np.zeros((h, w, 3))
  img[:, : w // 2] = (200, 40, 30)
  img[:, w // 2 :] = (30, 60, 190)
  img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
  lab = np.zeros((h, w), int)
  lab[:, w // 2 :] = 1
  p = np.full((h, w, k), 0.2)
  p[np.arange(h)[:, None], np.arange(w)[None], lab] = 0.5
  lp = np_log_softmax(np.log(p) + rng.normal(0, noise, (h, w, k))).astype(np.float32)
  return img, lab, lp


@pytest.mark.parametrize("d", [2, 5])
def test_lattice_filter_approximates_dense_gaussian(d):
  f = _rng.random((300, d)) * 3
  v = _rng.random((300, 4))
  lat = crf.build_lattice(f)
  lf = jax.jit(crf.lattice_filter)
  approx = np.asarray(lf(lat, jnp.asarray(v, jnp.float32)))
  approx = approx / np.asarray(lf(lat, jnp.ones((300, 1), jnp.float32)))
  exact = crf.naive_filter(f, v) / crf.naive_filter(f, np.ones((300, 1)))
  # The lattice is an approximation (Adams et al. report a few % error);
  # normalised outputs agree closely.
  err = np.abs(approx - exact)
  assert err.max() < 0.05 and err.mean() < 0.015, (err.max(), err.mean())
  # Unnormalised, the lattice's kernel has a different overall scale: this is
  # why densecrf (and jseg) always normalise.
  raw = np.asarray(lf(lat, jnp.asarray(v, jnp.float32))) / crf.naive_filter(f, v)
  assert raw.std() < 0.1 * raw.mean()


def test_lattice_structure():
  f = _rng.random((200, 5)) * 4
  lat = crf.build_lattice(f)
  w = np.asarray(lat.weights)
  np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-5)  # barycentric weights
  assert w.min() >= -1e-6
  off = np.asarray(lat.offsets)
  assert off.max() < lat.num_points and len(np.unique(off)) == lat.num_points
  # A far-away point shares no vertex with the cluster.
  lat2 = crf.build_lattice(np.concatenate([f, f[:1] + 100.0]))
  o2 = np.asarray(lat2.offsets)
  assert not set(o2[:, -1]) & set(o2[:, :-1].ravel())


def test_grid_gaussian_is_exact():
  h, w, std = 9, 11, 1.5
  v = _rng.random((h, w, 2)).astype(np.float32)
  yy, xx = np.mgrid[0:h, 0:w]
  feats = np.stack([xx.ravel(), yy.ravel()], 1) / std
  ref = crf.naive_filter(feats, v.reshape(-1, 2)).reshape(h, w, 2)
  got = np.asarray(jax.jit(lambda x: crf.grid_gaussian(x, std))(v))
  np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_zero_pairwise_returns_unary_argmax():
  img, _, lp = edge_problem()
  for cfg in ({"bi_w": 0.0, "pos_w": 0.0}, {"iterations": 0}):
    out = crf.dense_crf(lp, img, cfg)
    np.testing.assert_array_equal(out.argmax(-1), lp.argmax(-1))
    np.testing.assert_allclose(out, np_log_softmax(lp), atol=1e-5)


def test_crf_recovers_sharp_edge():
  img, lab, lp = edge_problem(noise=1.0)
  assert (lp.argmax(-1) == lab).mean() < 0.75  # the unary alone is poor
  out = crf.dense_crf(lp, img, {"bi_xy_std": 10.0, "bi_rgb_std": 10.0, "pos_xy_std": 2.0})
  assert (out.argmax(-1) == lab).mean() > 0.98
  np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("normalization", ["symmetric", "after", "none"])
def test_mean_field_matches_dense_reference(normalization):
  img, _, lp = edge_problem(h=16, w=20, noise=1.5, seed=1)
  cfg = {"bi_xy_std": 6.0, "bi_rgb_std": 20.0, "pos_xy_std": 1.5, "iterations": 5,
         "normalization": normalization, "bi_w": 2.0 if normalization == "none" else 4.0,
         "pos_w": 1.0 if normalization == "none" else 3.0}
  fast = crf.dense_crf(lp, img, cfg)
  ref = crf.naive_dense_crf(lp, img, cfg)
  assert (fast.argmax(-1) == ref.argmax(-1)).mean() > 0.97
  assert np.abs(np.exp(fast) - np.exp(ref)).mean() < 0.03


def test_grayscale_and_batch():
  img, lab, lp = edge_problem()
  gray = img.mean(-1)
  out = crf.dense_crf_batch(np.stack([lp, lp]), np.stack([gray, gray]),
                            {"bi_xy_std": 10.0, "bi_rgb_std": 10.0, "pos_xy_std": 2.0})
  assert out.shape == (2,) + lp.shape
  assert (out[0].argmax(-1) == lab).mean() > 0.95


def test_bad_inputs_named():
  img, _, lp = edge_problem()
  with pytest.raises(ValueError, match="normalization"):
    crf.params({"normalization": "sum"})
  with pytest.raises(ValueError, match="bi_rgb_sd"):
    crf.params({"bi_rgb_sd": 3})
  with pytest.raises(ValueError, match="same H, W"):
    crf.dense_crf(lp, img[:5])
