"""Host-side NumPy transforms: random scale and crop, flip, colour jitter, blur, normalisation.

Training order (``augment``): random scale first, then a random crop of
``crop_size`` from the scaled image (the scaled image is padded where it is
smaller than the crop: image with the normalisation mean, so it normalises to 0,
label with the void value), then colour jitter and blur on the image content,
then a horizontal flip. Random rescaling is the augmentation that helps
segmentation most (PSPNet Sec. 4.1; DeepLab v2 Sec. 4), hence its place first
and its default range 0.5-2.0.

Scaling and cropping are done in one Pillow resize of only the crop's source
region (``Image.resize(box=...)``), so a 2x scale never materialises the 2x image.
Images are resampled bilinearly (antialiased when shrinking), labels with
nearest neighbour from the same box, so image and label stay aligned.
Every random draw comes from the ``np.random.Generator`` passed in: the loader
gives each record its own generator (grain ``RandomMapTransform``), which makes
augmentation reproducible from the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from jseg.data.info import STORED_VOID, DatasetInfo

NORMALIZE_MODES = ("standardize", "minmax")

# Luma weights (ITU-R BT.601), used for grayscale, contrast and saturation.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation settings, from ``config.data`` and the dataset info."""

  crop_size: tuple[int, int]
  scale_range: tuple[float, float] = (0.5, 2.0)
  hflip: bool = True
  color_jitter: float = 0.0  # strength s: brightness/contrast/saturation factors in [1-s, 1+s], hue +-s/4 turn
  blur: bool = False  # Gaussian blur with probability 0.5, sigma in [0.1, 2.0] px
  pad_value: tuple[float, ...] = (0.0,)  # per channel, raw units (the dataset mean)
  clip_max: float | None = 255.0  # photometric results are clipped to [0, clip_max]; None: no clipping


def check_augment_config(cfg: AugmentConfig) -> None:
  """Raises on values that cannot work, naming the field."""
  h, w = cfg.crop_size
  if h < 1 or w < 1:
    raise ValueError(f"data.crop_size={cfg.crop_size}: both sides must be positive integers.")
  lo, hi = cfg.scale_range
  if not 0 < lo <= hi:
    raise ValueError(f"data.scale_range={cfg.scale_range}: need 0 < low <= high.")
  if not 0 <= cfg.color_jitter <= 1:
    raise ValueError(f"data.color_jitter={cfg.color_jitter}: a strength in [0, 1] (0 turns it off).")


def padding_fraction(image_hw: tuple[int, int], crop_size: tuple[int, int], min_scale: float) -> float:
  """Largest share of a crop that is padding, reached at the smallest scale."""
  hs, ws = max(1, round(image_hw[0] * min_scale)), max(1, round(image_hw[1] * min_scale))
  ch, cw = crop_size
  return 1.0 - min(hs, ch) * min(ws, cw) / (ch * cw)


def _resize(array: np.ndarray, size_hw: tuple[int, int], box: tuple[float, float, float, float], resample: int) -> np.ndarray:
  """Resamples the ``box`` region (left, top, right, bottom) of ``array`` to ``size_hw``."""
  size = (size_hw[1], size_hw[0])
  if array.ndim == 2:
    return np.asarray(Image.fromarray(array).resize(size, resample, box=box))
  if array.dtype == np.uint8 and array.shape[2] == 3:
    return np.asarray(Image.fromarray(array, "RGB").resize(size, resample, box=box))
  if array.dtype == np.uint8 and array.shape[2] == 1:
    return np.asarray(Image.fromarray(array[..., 0]).resize(size, resample, box=box))[..., None]
  # Any other band count or dtype: one float32 ('F') image per band.
  bands = [
      np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c], np.float32), "F").resize(size, resample, box=box))
      for c in range(array.shape[2])
  ]
  return np.stack(bands, axis=-1)


def _crop_axis(scaled: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
  """(start in the scaled image, length of content, offset of content in the crop) along one axis."""
  if scaled >= crop:
    return int(rng.integers(0, scaled - crop + 1)), crop, 0
  return 0, scaled, int(rng.integers(0, crop - scaled + 1))


def scale_crop_region(
    image: np.ndarray, label: np.ndarray, crop_size: tuple[int, int], scale_range: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """Random scale then random crop, without padding.

  Returns the image content (float32), its label, and the (row, col) offset where
  the content sits in the ``crop_size`` canvas (non-zero only where the scaled
  image is smaller than the crop).
  """
  h, w = image.shape[:2]
  scale = rng.uniform(*scale_range)
  hs, ws = max(1, round(h * scale)), max(1, round(w * scale))
  y0, hh, oy = _crop_axis(hs, crop_size[0], rng)
  x0, ww, ox = _crop_axis(ws, crop_size[1], rng)
  sy, sx = h / hs, w / ws
  box = (x0 * sx, y0 * sy, min(w, (x0 + ww) * sx), min(h, (y0 + hh) * sy))
  content = _resize(image, (hh, ww), box, Image.BILINEAR).astype(np.float32, copy=False)
  content_label = _resize(label, (hh, ww), box, Image.NEAREST)
  return content, content_label, (oy, ox)


def pad_to(
    content: np.ndarray, label: np.ndarray, crop_size: tuple[int, int], offset: tuple[int, int], pad_value, label_pad: int
) -> tuple[np.ndarray, np.ndarray]:
  """Places content and label at ``offset`` on a canvas filled with the pad values."""
  ch, cw = crop_size
  if content.shape[:2] == (ch, cw):
    return content, label
  oy, ox = offset
  hh, ww = content.shape[:2]
  canvas = np.empty((ch, cw, content.shape[2]), np.float32)
  canvas[...] = np.asarray(pad_value, np.float32)
  canvas[oy : oy + hh, ox : ox + ww] = content
  out_label = np.full((ch, cw), label_pad, label.dtype)
  out_label[oy : oy + hh, ox : ox + ww] = label
  return canvas, out_label


def random_scale_crop(
    image: np.ndarray,
    label: np.ndarray,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float],
    rng: np.random.Generator,
    pad_value,
    label_pad: int = STORED_VOID,
) -> tuple[np.ndarray, np.ndarray]:
  """Random scale, then a random ``crop_size`` crop padded where the scaled image is smaller."""
  content, content_label, offset = scale_crop_region(image, label, crop_size, scale_range, rng)
  return pad_to(content, content_label, crop_size, offset, pad_value, label_pad)


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator, clip_max: float | None) -> np.ndarray:
  """Brightness, contrast, then (3 channels only) saturation and hue, with random factors.

  Factors are drawn in [1 - s, 1 + s]; the hue turns by up to s/4 of a circle
  (rotation of the chroma plane in YIQ space, a linear stand-in for HSV hue).
  Single and multi-band images get brightness and contrast only.
  """
  s = float(strength)
  x = image.astype(np.float32) * np.float32(rng.uniform(1 - s, 1 + s))
  contrast = np.float32(rng.uniform(1 - s, 1 + s))
  if x.shape[-1] == 3:
    mean = np.float32((x @ _LUMA).mean())
    x = (x - mean) * contrast + mean
    sat = rng.uniform(1 - s, 1 + s)
    theta = rng.uniform(-s / 4, s / 4) * 2 * np.pi
    rot = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    saturate = sat * np.eye(3) + (1 - sat) * np.outer(np.ones(3), _LUMA)
    matrix = (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ @ saturate).astype(np.float32)
    x = x @ matrix.T
  else:
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = (x - mean) * contrast + mean
  if clip_max is not None:
    x = np.clip(x, 0, clip_max)
  return x


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of an (H, W, C) array, radius 3 sigma, edges replicated."""
  r = max(1, int(np.ceil(3 * sigma)))
  t = np.arange(-r, r + 1, dtype=np.float32)
  kernel = np.exp(-0.5 * (t / sigma) ** 2)
  kernel /= kernel.sum()
  x = image.astype(np.float32)
  for axis in (0, 1):
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode="edge")
    window = [slice(None)] * x.ndim
    out = None
    for i, k in enumerate(kernel):  # sum of shifted copies: slices are views, no gather
      window[axis] = slice(i, i + n)
      term = k * padded[tuple(window)]
      out = term if out is None else out.__iadd__(term)
    x = out
  return x


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
  """The full training augmentation; returns a float32 image in raw units and the label crop."""
  content, content_label, offset = scale_crop_region(image, label, cfg.crop_size, cfg.scale_range, rng)
  if cfg.color_jitter > 0:
    content = color_jitter(content, cfg.color_jitter, rng, cfg.clip_max)
  if cfg.blur and rng.random() < 0.5:
    content = gaussian_blur(content, rng.uniform(0.1, 2.0))
  image, label = pad_to(content, content_label, cfg.crop_size, offset, cfg.pad_value, STORED_VOID)
  if cfg.hflip and rng.random() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  return np.ascontiguousarray(image), np.ascontiguousarray(label)


def to_class_label(stored: np.ndarray, ignore_index: int) -> np.ndarray:
  """Stored uint8 mask -> int32 class indices with void replaced by ``ignore_index``."""
  label = stored.astype(np.int32)
  if ignore_index != STORED_VOID:
    label[stored == STORED_VOID] = ignore_index
  return label


def normalize_mode(data_cfg) -> str:
  mode = data_cfg.get("normalize", "standardize")
  if mode not in NORMALIZE_MODES:
    raise ValueError(f"data.normalize='{mode}' is not valid; choose one of {NORMALIZE_MODES}.")
  return mode


def normalize(image: np.ndarray, info: DatasetInfo, data_cfg) -> np.ndarray:
  """Raw image (H, W, C) or batch (..., C) -> float32, by ``data_cfg.normalize``.

  ``standardize``: ``(x - mean) / std`` with the dataset's per-channel statistics;
  ``minmax``: ``x / info.max_value``, so 8-bit images land in [0, 1].
  """
  if image.shape[-1] != info.channels:
    raise ValueError(
        f"Image has {image.shape[-1]} channel(s) (shape {image.shape}); dataset '{info.name}' has {info.channels}."
    )
  x = image.astype(np.float32, copy=False)
  if normalize_mode(data_cfg) == "minmax":
    return x * np.float32(1.0 / info.max_value)
  return (x - info.mean.astype(np.float32)) * (1.0 / info.std.astype(np.float32))
