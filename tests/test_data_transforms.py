"""Host-side transforms: image/label alignment under augmentation, scale, padding, photometric ops."""

import numpy as np
import pytest
from scipy import ndimage

from jseg.config import base_config
from jseg.data import transforms
from jseg.data.info import DatasetInfo

H, W, BLOCK = 96, 128, 8
PAD = (7.0, 9.0, 11.0)


def _synthetic():
  """8x8 blocks with labels 0..10 in an asymmetric pattern; the image encodes each pixel's label."""
  by, bx = np.meshgrid(np.arange(H) // BLOCK, np.arange(W) // BLOCK, indexing="ij")
  label = ((by * 3 + bx * 5 + by * bx) % 11).astype(np.uint8)
  image = np.stack([label * 20 + 20, 250 - label * 20, label * 7 + 30], axis=-1).astype(np.uint8)
  return image, label


def _uniform_interior(label, r=2):
  """Pixels whose (2r+1)^2 neighbourhood lies in the crop and has a single label.

  Away from block edges the resampled image must show exactly the block's value;
  the crop border is left out because the block beyond it is not visible.
  """
  lo = ndimage.minimum_filter(label, size=2 * r + 1, mode="constant", cval=0)
  hi = ndimage.maximum_filter(label, size=2 * r + 1, mode="constant", cval=255)
  return lo == hi


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_augment_keeps_image_and_label_aligned(jitter):
  image, label = _synthetic()
  cfg = transforms.AugmentConfig(crop_size=(64, 80), scale_range=(0.5, 2.0), hflip=True, color_jitter=jitter, pad_value=PAD)
  checked = padded = flipped = 0
  for seed in range(24):
    img, lab = transforms.augment(image, label, np.random.default_rng(seed), cfg)
    assert img.shape == (64, 80, 3) and img.dtype == np.float32 and lab.shape == (64, 80) and lab.dtype == np.uint8
    pad = lab == 255  # the pattern has no void, so 255 is padding
    np.testing.assert_array_equal(img[pad], np.broadcast_to(np.float32(PAD), img[pad].shape))
    padded += pad.any()
    inner = _uniform_interior(lab) & ~pad
    if jitter == 0:
      np.testing.assert_allclose(img[inner][:, 0], lab[inner] * 20.0 + 20, atol=0.51)
      np.testing.assert_allclose(img[inner][:, 1], 250.0 - lab[inner] * 20, atol=0.51)
    else:  # jitter maps colours pixelwise: one label block keeps one colour
      for k in np.unique(lab[inner]):
        px = img[inner & (lab == k)]
        np.testing.assert_allclose(px, np.broadcast_to(px[0], px.shape), atol=1.0)
    checked += inner.sum()
    # The pattern is not mirror-symmetric: a flipped crop shows label 0 blocks right of label 5 blocks.
    ref_img, ref_lab = transforms.augment(
        image, label, np.random.default_rng(seed), transforms.AugmentConfig(**{**cfg.__dict__, "hflip": False})
    )
    if not np.array_equal(ref_lab, lab):
      flipped += 1
      np.testing.assert_array_equal(ref_lab[:, ::-1], lab)
  assert checked > 24 * 1000 and padded > 0 and 0 < flipped < 24


def test_unit_scale_is_exact_crop_and_flip():
  image, label = _synthetic()
  cfg = transforms.AugmentConfig(crop_size=(64, 80), scale_range=(1.0, 1.0), hflip=True, pad_value=PAD)
  for seed in range(6):
    img, lab = transforms.augment(image, label, np.random.default_rng(seed), cfg)
    np.testing.assert_array_equal(img[..., 0], lab * 20.0 + 20)  # every pixel, block edges included
    # the crop is a window of the original (possibly mirrored)
    found = [
        (y, x) for y in range(H - 63) for x in range(W - 79)
        if np.array_equal(label[y : y + 64, x : x + 80], lab) or np.array_equal(label[y : y + 64, x : x + 80], lab[:, ::-1])
    ]  # fmt: skip
    assert found


def test_scale_two_doubles_blocks():
  image, label = _synthetic()
  _, lab = transforms.random_scale_crop(image, label, (64, 80), (2.0, 2.0), np.random.default_rng(0), PAD)
  row = lab[5]
  edges = np.flatnonzero(np.diff(row.astype(int))) + 1
  np.testing.assert_array_equal(np.diff(edges), 2 * BLOCK)


def test_small_scale_pads_with_mean_and_ignore():
  image, label = _synthetic()
  img, lab = transforms.random_scale_crop(image, label, (64, 80), (0.5, 0.5), np.random.default_rng(3), PAD)
  content = lab != 255
  assert content.sum() == (H // 2) * (W // 2)  # 48x64 scaled image inside the 64x80 crop
  rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
  assert len(rows) == 48 and len(cols) == 64
  np.testing.assert_array_equal(img[~content], np.broadcast_to(np.float32(PAD), img[~content].shape))
  info = _info(3)
  normed = transforms.normalize(img, info, base_config().data)
  assert np.all(normed[~content] == 0)  # padding is the mean, so it normalises to exactly 0


def test_multiband_uint16_path_aligned():
  image, label = _synthetic()
  bands = np.concatenate([image.astype(np.uint16) * 200] * 2, axis=-1)[..., :5]  # 5 bands, 16-bit
  img, lab = transforms.random_scale_crop(bands, label, (40, 40), (0.7, 1.3), np.random.default_rng(1), (0.0,) * 5)
  assert img.shape == (40, 40, 5) and img.dtype == np.float32
  inner = _uniform_interior(lab) & (lab != 255)
  np.testing.assert_allclose(img[inner][:, 0], (lab[inner] * 20.0 + 20) * 200, rtol=1e-4)


def test_color_jitter_range_and_strength():
  image, _ = _synthetic()
  x = image.astype(np.float32)
  out = transforms.color_jitter(x, 0.5, np.random.default_rng(0), 255.0)
  assert out.min() >= 0 and out.max() <= 255 and not np.allclose(out, x)
  np.testing.assert_allclose(transforms.color_jitter(x, 0.0, np.random.default_rng(0), 255.0), x, atol=1e-3)
  gray = x[..., :1]
  out1 = transforms.color_jitter(gray, 0.5, np.random.default_rng(0), 255.0)
  assert out1.shape == gray.shape


def test_gaussian_blur_matches_scipy():
  x = np.random.default_rng(0).random((20, 24, 2)).astype(np.float32)
  ours = transforms.gaussian_blur(x, 1.0)
  ref = ndimage.gaussian_filter(x, sigma=(1.0, 1.0, 0), mode="nearest", truncate=3.0)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def _info(channels):
  return DatasetInfo(
      name="t", num_classes=2, class_names=("a", "b"), palette=np.zeros((2, 3), np.uint8), ignore_index=255,
      mean=np.array(PAD[:channels], np.float32), std=np.full(channels, 2.0, np.float32), channels=channels,
  )  # fmt: skip


def test_normalize_modes_and_errors():
  cfg = base_config().data
  x = np.full((2, 2, 3), 100, np.uint8)
  np.testing.assert_allclose(transforms.normalize(x, _info(3), cfg)[0, 0], [(100 - 7) / 2, (100 - 9) / 2, (100 - 11) / 2])
  cfg.normalize = "minmax"
  np.testing.assert_allclose(transforms.normalize(x, _info(3), cfg), 100 / 255, rtol=1e-6)
  with pytest.raises(ValueError, match="2 channel"):
    transforms.normalize(x[..., :2], _info(3), cfg)
  cfg.normalize = "zscore"
  with pytest.raises(ValueError, match="standardize"):
    transforms.normalize(x, _info(3), cfg)
  with pytest.raises(ValueError, match="scale_range"):
    transforms.check_augment_config(transforms.AugmentConfig(crop_size=(8, 8), scale_range=(2.0, 1.0)))
