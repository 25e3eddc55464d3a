"""Pictures a person can look at: palette masks, overlays, side-by-side panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_COLOR = (0, 0, 0)


def to_display(image: np.ndarray) -> np.ndarray:
  """Any HxW[xC] image (uint8/uint16/float, 1 or more bands) as HxWx3 uint8 for viewing."""
  img = np.asarray(image)
  if img.ndim == 2:
    img = img[..., None]
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  img = img[..., :3]
  if img.dtype == np.uint8:
    return img
  img = img.astype(np.float64)
  lo, hi = np.percentile(img, 1), np.percentile(img, 99)
  img = np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)
  return (img * 255).round().astype(np.uint8)


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
  """Class-index mask -> HxWx3 uint8 colours; ignored or out-of-range pixels are black."""
  palette = np.asarray(palette, np.uint8)
  mask = np.asarray(mask)
  valid = (mask >= 0) & (mask < len(palette)) & (mask != ignore_index)
  out = np.zeros(mask.shape + (3,), np.uint8)
  out[valid] = palette[mask[valid]]
  return out


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5,
            ignore_index: int = 255) -> np.ndarray:
  """Blends the coloured mask over the image (ignored pixels show the image)."""
  img = to_display(image).astype(np.float32)
  col = colorize(mask, palette, ignore_index).astype(np.float32)
  keep = ((np.asarray(mask) == ignore_index) | (np.asarray(mask) >= len(palette)))[..., None]
  out = np.where(keep, img, (1 - alpha) * img + alpha * col)
  return out.round().astype(np.uint8)


def side_by_side(*panels: np.ndarray, gap: int = 4) -> np.ndarray:
  """Concatenates HxWx3 uint8 panels horizontally with a white gap."""
  h = max(p.shape[0] for p in panels)
  parts = []
  for i, p in enumerate(panels):
    pad = np.full((h, p.shape[1], 3), 255, np.uint8)
    pad[: p.shape[0]] = p
    parts.append(pad)
    if i < len(panels) - 1:
      parts.append(np.full((h, gap, 3), 255, np.uint8))
  return np.concatenate(parts, axis=1)


def save_indexed_png(mask: np.ndarray, palette: np.ndarray, path: str | Path) -> None:
  """Writes a 'P'-mode PNG: pixel values are class indices, colours from ``palette``."""
  mask = np.asarray(mask)
  if mask.max(initial=0) > 255 or mask.min(initial=0) < 0:
    raise ValueError(f"Mask values must be in 0..255 for an indexed PNG; got {mask.min()}..{mask.max()}.")
  img = Image.fromarray(mask.astype(np.uint8), mode="P")
  flat = np.zeros((256, 3), np.uint8)
  flat[: len(palette)] = np.asarray(palette, np.uint8)[:256]
  img.putpalette(flat.reshape(-1).tolist())
  img.save(path)
