"""Pictures for people: palette masks, overlays, panels, indexed PNGs."""

import numpy as np
import pytest
from PIL import Image

from jseg import visualize

PALETTE = np.array([[10, 20, 30], [200, 100, 0]], np.uint8)


def test_colorize_maps_classes_and_blacks_out_ignore():
  mask = np.array([[0, 1], [255, 7]])
  out = visualize.colorize(mask, PALETTE, ignore_index=255)
  assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 0]
  assert out[1, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [0, 0, 0]


def test_overlay_blends_only_labelled_pixels():
  image = np.full((1, 2, 3), 100, np.uint8)
  out = visualize.overlay(image, np.array([[1, 255]]), PALETTE, alpha=0.5)
  assert out[0, 0].tolist() == [150, 100, 50] and out[0, 1].tolist() == [100, 100, 100]


def test_to_display_handles_gray_and_16_bit():
  gray16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
  out = visualize.to_display(gray16)
  assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and out.max() == 255 and out.min() == 0


def test_side_by_side_pads_heights():
  a, b = np.zeros((2, 3, 3), np.uint8), np.zeros((4, 1, 3), np.uint8)
  out = visualize.side_by_side(a, b, gap=2)
  assert out.shape == (4, 3 + 2 + 1, 3) and out[3, 0].tolist() == [255, 255, 255]


def test_indexed_png_round_trips_classes_and_palette(tmp_path):
  mask = np.array([[0, 1], [1, 0]], np.uint8)
  visualize.save_indexed_png(mask, PALETTE, tmp_path / "m.png")
  img = Image.open(tmp_path / "m.png")
  assert img.mode == "P" and np.array_equal(np.asarray(img), mask)
  assert np.asarray(img.convert("RGB"))[0, 1].tolist() == [200, 100, 0]
  with pytest.raises(ValueError, match="0..255"):
    visualize.save_indexed_png(np.array([[300]]), PALETTE, tmp_path / "bad.png")
