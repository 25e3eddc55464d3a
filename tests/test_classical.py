"""Tests for the classical baselines (jseg.classical) and the jseg.baselines runner."""

import numpy as np
import pytest

from jseg import classical
from jseg.classical import base


def blocks(seed, h=48, w=64, noise=4.0):
  """Image of three flat colour blocks (top band, bottom-left, bottom-right) + labels."""
  rng = np.random.default_rng(seed)
  img = np.zeros((h, w, 3))
  lab = np.zeros((h, w), np.int32)
  img[: h // 3] = (200, 210, 240)  # bright "sky"
  img[h // 3 :, : w // 2] = (90, 60, 40)
  lab[h // 3 :, : w // 2] = 1
  img[h // 3 :, w // 2 :] = (30, 120, 30)
  lab[h // 3 :, w // 2 :] = 2
  img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
  return img, lab


def test_majority_mapping_by_hand():
  groups = np.array([0, 0, 0, 1, 1, 2, 2, 2])
  labels = np.array([1, 1, 0, 0, 255, 1, 1, 1])
  np.testing.assert_array_equal(base.majority_mapping(groups, labels, 4, 2, 255), [1, 0, 1, 1])
  # Balanced: class 0 has 2 pixels (1 in group 0, 1 in group 1); class 1 has 5
  # (2 in group 0, 3 in group 2). P(g0|0)=.5 > P(g0|1)=.4 -> group 0 -> class 0.
  np.testing.assert_array_equal(
      base.majority_mapping(groups, labels, 4, 2, 255, "balanced"), [0, 0, 1, 1])
  with pytest.raises(ValueError, match="mapping 'vote'"):
    base.majority_mapping(groups, labels, 4, 2, 255, "vote")


def test_resize_and_image_checks():
  lab = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(base.resize_labels(lab, (4, 6)), np.repeat(np.repeat(lab, 2, 0), 2, 1))
  assert base.resize_image(np.zeros((10, 20, 3), np.uint8), 0.5).shape == (5, 10, 3)
  with pytest.raises(ValueError, match="shape"):
    base.as_image(np.zeros((2, 3, 4, 5)))
  with pytest.raises(KeyError, match="kmeans"):
    classical.build("mean_shift", 3)


def test_otsu_and_multiotsu_separate_grey_levels():
  rng = np.random.default_rng(0)
  def grey_img(levels, seed):
    r = np.random.default_rng(seed)
    lab = np.zeros((40, 60), np.int32)
    for i in range(len(levels)):
      lab[:, i * 60 // len(levels):] = i
    img = np.asarray(levels, float)[lab] + r.normal(0, 3, lab.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lab
  im, lab = grey_img([40, 200], 1)
  m = classical.build("otsu", 2).fit([im], [lab])
  test_im, test_lab = grey_img([40, 200], 2)
  np.testing.assert_array_equal(m.predict(test_im), test_lab)
  im3, lab3 = grey_img([30, 120, 220], 3)
  m3 = classical.build("multiotsu", 3, levels=3).fit([im3], [lab3])
  t3, tl3 = grey_img([30, 120, 220], 4)
  assert (m3.predict(t3) == tl3).mean() > 0.99
  assert rng is not None


@pytest.mark.parametrize("name,params", [
    ("kmeans", {"clusters": 6}), ("slic", {"segments": 40, "trees": 20}),
    ("watershed", {"segments": 40, "trees": 20}), ("svm", {"max_pixels": 3000, "components": 100}),
])
def test_learned_methods_on_colour_blocks(name, params):
  train = [blocks(s) for s in range(2)]
  m = classical.build(name, 3, scale=1.0, **params).fit([t[0] for t in train], [t[1] for t in train])
  img, lab = blocks(5)
  pred = m.predict(img)
  assert pred.shape == lab.shape and pred.dtype == np.int32
  assert (pred == lab).mean() > 0.95, (name, (pred == lab).mean())


def test_svm_uses_texture():
  """Left half rough, right half smooth, same mean colour: colour alone cannot separate them."""
  def tex(seed):
    r = np.random.default_rng(seed)
    img = np.full((48, 64, 3), 128.0)
    img[:, :32] += r.normal(0, 40, (48, 32, 1))
    lab = np.zeros((48, 64), np.int32)
    lab[:, 32:] = 1
    return np.clip(img, 0, 255).astype(np.uint8), lab
  a, b = tex(0), tex(1)
  m = classical.build("svm", 2, scale=1.0, max_pixels=3000, components=100, sigma_max=4.0)
  m.fit([a[0]], [a[1]])
  acc = (m.predict(b[0]) == b[1])[:, 4:-4].mean()  # away from the two image borders
  assert acc > 0.9


def test_void_pixels_ignored():
  img, lab = blocks(0)
  lab = lab.copy()
  lab[:, :8] = 255
  m = classical.build("kmeans", 3, scale=1.0, clusters=6).fit([img], [lab])
  assert set(np.unique(m.predict(img))) <= {0, 1, 2}


def test_baselines_on_isbi_sample(tfds_cache):
  from jseg import baselines
  from jseg.config import load_config

  config = load_config("configs/unet.py")
  config.data.cache_dir = tfds_cache
  res = baselines.run_baselines(
      config, ["otsu", "multiotsu"], params={"multiotsu": {"levels": 3, "scale": 0.25},
                                             "otsu": {"scale": 0.25, "mapping": "balanced"}},
      max_train_images=1, verbose=False)
  for name in ("otsu", "multiotsu"):
    r = res[name]
    assert r["images"] == 2 and r["train_images"] == 1
    assert 0.0 <= r["metrics"]["miou"] <= 1.0 and "mIoU" in r["table"]
    assert np.asarray(r["confusion_matrix"]).sum() == 2 * 512 * 512  # every pixel, at full size
  # Dark membranes: with the balanced mapping Otsu's dark bin is the membrane class.
  assert res["otsu"]["per_class_iou"]["membrane"] > 0.2
  assert "| otsu |" in baselines.summary_table(res)
