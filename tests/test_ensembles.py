"""Tests for jseg.ensembles on hand-made probability maps."""

import warnings

import numpy as np
import pytest

from jseg import ensembles as ens


def px(*rows):
  """Members of a one-pixel map: each row is one member's class probabilities."""
  return np.asarray(rows, np.float32)[:, None, :]  # (M, 1 pixel, K)


def test_average_and_weighted():
  p = px([0.6, 0.4], [0.2, 0.8])
  np.testing.assert_allclose(ens.average(p), [[0.4, 0.6]], atol=1e-6)
  np.testing.assert_allclose(ens.weighted_average(p, [1, 3]), [[0.3, 0.7]], atol=1e-6)
  np.testing.assert_allclose(ens.weighted_average(list(p), [2, 0]), [[0.6, 0.4]], atol=1e-6)
  with pytest.raises(ValueError, match="3 weight"):
    ens.weighted_average(p, [1, 1, 1])
  with pytest.raises(ValueError, match=">= 0"):
    ens.weighted_average(p, [1, -1])


def test_weights_from_miou():
  np.testing.assert_allclose(ens.weights_from_miou([0.5, 0.25]), [2 / 3, 1 / 3])
  np.testing.assert_allclose(ens.weights_from_miou([0.5, 0.25], power=2), [0.8, 0.2])
  with pytest.raises(ValueError, match="mIoU"):
    ens.weights_from_miou([0.5, float("nan")])


def onehots(labels, k):
  """Members' one-hot maps from a list of member label lists (pixels along axis 1)."""
  return np.eye(k, dtype=np.float32)[np.asarray(labels)]


def test_majority_vote_with_rejection():
  # Pixels: 2 of 3 agree; all differ; unanimous.
  p = onehots([[0, 0, 2], [0, 1, 2], [1, 2, 2]], 3)
  labels, rate = ens.majority_vote(p, reject_label=255)
  np.testing.assert_array_equal(labels, [0, 255, 2])
  assert rate == pytest.approx(1 / 3)
  # Exactly half is not a majority.
  labels, rate = ens.majority_vote(onehots([[0, 1], [0, 1], [1, 0], [1, 1]], 2), reject_label=-1)
  np.testing.assert_array_equal(labels, [-1, 1])
  assert rate == pytest.approx(0.5)


def test_plurality_vote_ties():
  # Four members (rows) x three pixels (columns), K = 3.
  p = np.asarray([
      # pixel 0: class 1 has 3 votes; pixel 1: 2-2 tie of classes 0 and 2, class 2 has
      # the higher mean probability; pixel 2: votes 0, 1, 2, 1 -> class 1 by plurality.
      [[0.1, 0.8, 0.1], [0.6, 0.0, 0.4], [0.5, 0.25, 0.25]],
      [[0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.25, 0.5, 0.25]],
      [[0.9, 0.05, 0.05], [0.1, 0.0, 0.9], [0.25, 0.25, 0.5]],
      [[0.1, 0.8, 0.1], [0.2, 0.0, 0.8], [0.25, 0.5, 0.25]],
  ], np.float32)
  np.testing.assert_array_equal(ens.plurality_vote(p), [1, 2, 1])
  # A tie with equal mean probabilities goes to the lowest class index.
  q = np.asarray([[[0.6, 0.4]], [[0.4, 0.6]]], np.float32)
  np.testing.assert_array_equal(ens.plurality_vote(q), [0])


def synthetic_members(n, k, seed):
  """Member A is accurate but predicts its classes permuted (y+1 mod k);
  member B is right 50% of the time. Averaging is misled; stacking learns A's permutation."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n)
  a_lab = np.where(rng.random(n) < 0.95, (y + 1) % k, rng.integers(0, k, n))
  b_lab = np.where(rng.random(n) < 0.5, y, rng.integers(0, k, n))
  def soft(lab):
    p = np.full((n, k), 0.1 / (k - 1))
    p[np.arange(n), lab] = 0.9
    return p
  probs = np.stack([soft(a_lab), soft(b_lab)]).reshape(2, 1, 1, n, k).astype(np.float32)
  return probs, y.reshape(1, 1, n)


@pytest.mark.parametrize("method", ["logreg", "conv1x1"])
def test_stacking_learns_member_reliability(method):
  k = 3
  fit_p, fit_y = synthetic_members(1000, k, 0)
  ev_p, ev_y = synthetic_members(1000, k, 1)
  st = ens.fit_stacker(fit_p, fit_y, method=method, steps=100, learning_rate=0.05)
  pred = st.predict_proba(ev_p)
  assert pred.shape == ev_p.shape[1:]
  np.testing.assert_allclose(pred.sum(-1), 1.0, atol=1e-4)
  acc = (pred.argmax(-1) == ev_y).mean()
  avg_acc = (ens.average(ev_p).argmax(-1) == ev_y).mean()
  assert acc > 0.9 and avg_acc < 0.5
  labels, _ = ens.combine("stacking", ev_p, stacker=st)
  np.testing.assert_array_equal(labels, pred.argmax(-1))


def test_stacking_ignores_void_and_warns_when_small():
  fit_p, fit_y = synthetic_members(60, 3, 2)
  fit_y = fit_y.copy()
  fit_y[..., :10] = 255
  with pytest.warns(ens.StackingOverfitWarning, match="only 50 pixels"):
    st = ens.fit_stacker(fit_p, fit_y)
  assert st.fit_pixels == 50
  with pytest.warns(ens.StackingOverfitWarning, match="overfitting"):
    gap = ens.overfit_gap(st, st.fit_accuracy - 0.2)
  assert gap == pytest.approx(0.2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ens.overfit_gap(st, st.fit_accuracy)


def test_combine_and_errors():
  p = onehots([[0, 1], [0, 0], [1, 0]], 2)
  labels, extra = ens.combine("majority", p, reject_label=9)
  np.testing.assert_array_equal(labels, [0, 0])
  assert extra == {"reject_rate": 0.0}
  with pytest.raises(ValueError, match="Unknown ensemble rule 'mean'"):
    ens.combine("mean", p)
  with pytest.raises(ValueError, match="needs weights"):
    ens.combine("weighted", p)
  with pytest.raises(ValueError, match="different shapes"):
    ens.average([np.zeros((2, 3)), np.zeros((2, 4))])
  with pytest.raises(ValueError, match="Unknown stacking"):
    ens.fit_stacker(p, np.zeros(2), method="svm")


def test_evaluate_ensemble_with_toy_networks():
  """Two toy 'networks' over a few tiny images: the rules' confusion matrices
  equal the ones computed directly from the members' probabilities."""
  import jax
  import jax.numpy as jnp

  from jseg import metrics

  rng = np.random.default_rng(0)
  k = 3
  ws = [jnp.asarray(rng.normal(size=(2, k)), jnp.float32) for _ in range(3)]
  fns = [jax.jit(lambda x, w=w: x @ w) for w in ws]
  def examples(seed, n=3):
    r = np.random.default_rng(seed)
    return [{"image": r.normal(size=(8, 10, 2)).astype(np.float32),
             "label": r.integers(0, k, (8, 10)).astype(np.int32)} for _ in range(n)]
  ev, fit = examples(1), examples(2, 6)
  # Random labels: the meta-learner can only overfit, and says so.
  with pytest.warns(ens.StackingOverfitWarning):
    res = ens.evaluate_ensemble(fns, ev, k, 255, ("average", "weighted", "majority", "plurality", "stacking"),
                                {"mode": "whole", "bucket": 8}, fit, max_fit_pixels=300)
  cm = {r: np.zeros((k, k), np.int64) for r in ("average", "weighted", "majority", "plurality")}
  rej = 0
  for e in ev:
    p = np.stack([np.asarray(jax.nn.softmax(f(jnp.asarray(e["image"])), -1)) for f in fns])
    for r, lab in (("average", ens.average(p).argmax(-1)),
                   ("weighted", ens.weighted_average(p, res["weights"]).argmax(-1)),
                   ("majority", ens.majority_vote(p)[0]), ("plurality", ens.plurality_vote(p))):
      cm[r] += np.asarray(metrics.confusion_matrix(lab, e["label"], k, 255))
    rej += (ens.majority_vote(p)[0] == 255).sum()
  for r in cm:
    np.testing.assert_array_equal(res["rules"][r], cm[r])
  assert res["reject_rate"] == pytest.approx(rej / (3 * 80))
  np.testing.assert_allclose(res["weights"], ens.weights_from_miou(res["fit_member_miou"]))
  assert res["stacking"]["fit_pixels"] == 6 * 50
  assert res["rules"]["stacking"].sum() == 3 * 80
