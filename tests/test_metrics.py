"""Confusion-matrix metrics against scikit-learn and hand-checked cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from jseg import metrics

K = 6
IGNORE = 255


@pytest.fixture(scope="module")
def random_maps():
  rng = np.random.default_rng(0)
  label = rng.integers(0, K, size=(3, 24, 20))
  # Class 5 never occurs in the labels; class 4 is never predicted.
  label[label == 5] = 0
  pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, K, size=label.shape))
  pred[pred == 4] = 1
  label[rng.random(label.shape) < 0.15] = IGNORE
  return pred.astype(np.int32), label.astype(np.int32)


@pytest.fixture(scope="module")
def jitted_cm():
  return jax.jit(metrics.confusion_matrix, static_argnames=("num_classes", "ignore_index", "method"))


@pytest.mark.parametrize("method", ["bincount", "onehot"])
def test_confusion_matrix_matches_sklearn(random_maps, jitted_cm, method):
  pred, label = random_maps
  cm = np.asarray(jitted_cm(pred, label, num_classes=K, ignore_index=IGNORE, method=method))
  keep = label != IGNORE
  ref = skm.confusion_matrix(label[keep], pred[keep], labels=range(K))
  np.testing.assert_array_equal(cm, ref)


def test_confusion_matrix_adds_across_batches(random_maps, jitted_cm):
  pred, label = random_maps
  whole = jitted_cm(pred, label, num_classes=K, ignore_index=IGNORE)
  parts = sum(jitted_cm(pred[i], label[i], num_classes=K, ignore_index=IGNORE) for i in range(3))
  np.testing.assert_array_equal(whole, parts)


def test_confusion_matrix_psum_over_devices(random_maps):
  pred, label = random_maps
  f = jax.jit(jax.vmap(lambda p, y: jax.lax.psum(metrics.confusion_matrix(p, y, K, IGNORE), "d"), axis_name="d"))
  out = np.asarray(f(pred, label))
  np.testing.assert_array_equal(out[0], np.asarray(metrics.confusion_matrix(pred, label, K, IGNORE)))


def test_confusion_matrix_from_scores_and_errors():
  label = jnp.array([[0, 1], [2, IGNORE]])
  scores = jax.nn.one_hot(jnp.array([[0, 2], [2, 1]]), 3)
  cm = metrics.confusion_matrix(scores, label, 3, IGNORE)
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 0, 1], [0, 0, 1]])
  with pytest.raises(ValueError, match="does not match"):
    metrics.confusion_matrix(jnp.zeros((2, 3), jnp.int32), label, 3, IGNORE)
  with pytest.raises(ValueError, match="bincount, onehot"):
    metrics.confusion_matrix(label, label, 3, IGNORE, method="loop")


def test_summarize_matches_sklearn(random_maps):
  pred, label = random_maps
  keep = label != IGNORE
  y, p = label[keep], pred[keep]
  cm = metrics.confusion_matrix(pred, label, K, IGNORE)
  s = metrics.summarize(cm)
  # Per class, on classes where the ratio is defined (sklearn would give 0 with a warning).
  kw = dict(labels=range(K), average=None, zero_division=0)
  for key, fn in (("iou", skm.jaccard_score), ("f1", skm.f1_score),
                  ("precision", skm.precision_score), ("recall", skm.recall_score)):
    ref = fn(y, p, **kw)
    ours = s[key]
    defined = ~np.isnan(ours)
    np.testing.assert_allclose(ours[defined], ref[defined], rtol=1e-12, err_msg=key)
  assert s["pixel_accuracy"] == pytest.approx(skm.accuracy_score(y, p))
  assert s["fw_accuracy"] == pytest.approx(s["pixel_accuracy"])
  # Class 5: absent from labels but predicted -> IoU 0, recall undefined.
  assert s["iou"][5] == 0.0 and np.isnan(s["recall"][5])
  # Class 4: present in labels, never predicted -> precision undefined, recall 0.
  assert np.isnan(s["precision"][4]) and s["recall"][4] == 0.0
  assert s["mean_accuracy"] == pytest.approx(np.mean(skm.recall_score(y, p, labels=range(5), average=None)))
  # sklearn's convention: undefined ratios count as 0 in the macro average.
  z = metrics.summarize(cm, absent="zero")
  assert z["miou"] == pytest.approx(skm.jaccard_score(y, p, labels=range(K), average="macro", zero_division=0))
  assert z["mean_f1"] == pytest.approx(skm.f1_score(y, p, labels=range(K), average="macro", zero_division=0))
  assert z["mean_precision"] == pytest.approx(
      skm.precision_score(y, p, labels=range(K), average="macro", zero_division=0))
  # FWIoU = support-weighted IoU, the same as sklearn's 'weighted' average.
  assert s["fwiou"] == pytest.approx(skm.jaccard_score(y, p, labels=range(K), average="weighted", zero_division=0))
  np.testing.assert_array_equal(s["tp"] + s["fp"] + s["fn"] + s["tn"], np.full(K, keep.sum()))


def test_summarize_hand_checked():
  # GT:   0 0 1 1      pred: 0 1 1 1     class 2 absent from both.
  cm = metrics.confusion_matrix(jnp.array([0, 1, 1, 1]), jnp.array([0, 0, 1, 1]), 3, IGNORE)
  s = metrics.summarize(cm)
  np.testing.assert_array_equal(s["tp"], [1, 2, 0])
  np.testing.assert_array_equal(s["fp"], [0, 1, 0])
  np.testing.assert_array_equal(s["fn"], [1, 0, 0])
  np.testing.assert_array_equal(s["tn"], [2, 1, 4])
  np.testing.assert_array_equal(s["support"], [2, 2, 0])
  np.testing.assert_allclose(s["iou"][:2], [1 / 2, 2 / 3])
  assert np.isnan(s["iou"][2]) and np.isnan(s["f1"][2])
  assert s["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert s["pixel_accuracy"] == pytest.approx(3 / 4)
  assert s["mean_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
  np.testing.assert_allclose(s["f1"][:2], [2 / 3, 4 / 5])
  assert s["mean_dice"] == s["mean_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
  assert s["fwiou"] == pytest.approx(0.5 * 1 / 2 + 0.5 * 2 / 3)
  z = metrics.summarize(cm, absent="zero")
  assert z["miou"] == pytest.approx((1 / 2 + 2 / 3) / 3)


def test_summarize_empty_and_bad_input():
  s = metrics.summarize(np.zeros((3, 3), np.int64))
  assert np.isnan(s["miou"]) and np.isnan(s["pixel_accuracy"]) and s["total"] == 0
  with pytest.raises(ValueError, match="must be \\(K, K\\)"):
    metrics.summarize(np.zeros((3, 2)))
  with pytest.raises(ValueError, match="absent"):
    metrics.summarize(np.eye(2), absent="mmseg")


def test_format_table():
  cm = np.array([[5, 1, 0], [0, 3, 0], [0, 0, 0]])
  text = metrics.format_table(metrics.summarize(cm), ["road", "sky", "tree"])
  lines = text.splitlines()
  road = next(l for l in lines if l.startswith("road"))
  assert "83.33" in road  # IoU 5/6
  tree = next(l for l in lines if l.startswith("tree"))
  assert "-" in tree and "nan" not in text
  assert any(l.startswith("mIoU") and f"{100 * (5 / 6 + 3 / 4) / 2:6.2f}" in l for l in lines)
  with pytest.raises(ValueError, match="2 class names for 3 classes"):
    metrics.format_table(metrics.summarize(cm), ["a", "b"])


def test_boundary_f1_hand_checked():
  label = np.zeros((12, 12), np.int32)
  label[3:9, 3:9] = 1
  # Perfect prediction: every class BF = 1.
  perfect = metrics.boundary_f1(label, label, 2, IGNORE, tolerance=0)
  np.testing.assert_allclose(perfect["bf_f1"], [1.0, 1.0])
  # Square shifted by one pixel: zero tolerance misses the moved edges, 1 px tolerance matches all.
  pred = np.roll(label, 1, axis=1)
  strict = metrics.boundary_counts(pred, label, 2, IGNORE, tolerance=0)
  loose = metrics.boundary_counts(pred, label, 2, IGNORE, tolerance=1)
  assert strict[1, 1] == loose[1, 1] == 20  # a 6x6 square's inner boundary has 20 pixels
  assert strict[1, 0] < 20 and loose[1, 0] == 20 and loose[1, 2] == 20
  # Counts add over images.
  both = metrics.boundary_counts(np.stack([pred, label]), np.stack([label, label]), 2, IGNORE, 1)
  np.testing.assert_array_equal(both, loose + metrics.boundary_counts(label, label, 2, IGNORE, 1))
  # Predicted boundaries on ignored ground truth are not judged.
  ign = label.copy()
  ign[:, 8:] = IGNORE
  c = metrics.boundary_counts(pred, ign, 2, IGNORE, 0)
  assert c[1, 1] < strict[1, 1]


def test_onehot_refuses_inexact_sizes():
  big = jax.ShapeDtypeStruct((2**24,), jnp.int32)
  with pytest.raises(ValueError, match="2\\^24"):
    jax.eval_shape(lambda p, y: metrics.confusion_matrix(p, y, 3, IGNORE, method="onehot"), big, big)


def test_bench_metrics_runs_tiny(tmp_path):
  from jseg.bench import metrics as bench

  out = tmp_path / "bench.json"
  report = bench.main(["--batch=1", "--size=16", "--classes=3", "--repeats=1", "--methods=bincount",
                       f"--out={out}"])
  assert out.is_file() and report["shape"] == [1, 16, 16] and len(report["confusion_matrix"]) == 2
