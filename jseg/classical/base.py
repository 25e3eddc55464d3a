"""Shared pieces of the classical baselines: the method interface, colour and
position features, majority mapping of groups to classes, resizing."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jseg.registry import Registry

METHODS: Registry = Registry("classical method")


@dataclasses.dataclass
class Method:
  """A classical segmenter: ``fit`` on training images, ``predict`` one image.

  ``scale`` is the resolution factor the method works at (features, clusters,
  superpixels); predictions are returned at the input size.
  """

  num_classes: int
  ignore_index: int = 255
  scale: float = 0.5
  seed: int = 0

  def fit(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> "Method":
    raise NotImplementedError

  def predict_small(self, image: np.ndarray) -> np.ndarray:
    """Labels at ``scale`` resolution for an image already resized to it."""
    raise NotImplementedError

  def predict(self, image: np.ndarray) -> np.ndarray:
    """int32 label map ``(H, W)`` for a raw image ``(H, W, C)`` or ``(H, W)``."""
    image = as_image(image)
    small = self.predict_small(resize_image(image, self.scale))
    return resize_labels(small, image.shape[:2])

  def _train_pairs(self, images, labels):
    """Training images and labels at ``scale``, checked."""
    if len(images) != len(labels) or not images:
      raise ValueError(f"fit needs equally many images and labels (>= 1); got {len(images)} and {len(labels)}.")
    out = []
    for i, (im, lab) in enumerate(zip(images, labels)):
      im = as_image(im)
      lab = np.asarray(lab)
      if lab.shape != im.shape[:2]:
        raise ValueError(f"Training pair {i}: image {im.shape} and label {lab.shape} differ in size.")
      small = resize_image(im, self.scale)
      out.append((small, resize_labels(lab, small.shape[:2])))
    return out


def as_image(image: np.ndarray) -> np.ndarray:
  """``(H, W, C)`` array (a 2-D grey image gets a channel axis)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise ValueError(f"Classical methods take (H, W), (H, W, 1) or (H, W, 3) images; got shape {image.shape}.")
  return image[..., :3]


def to_unit(image: np.ndarray) -> np.ndarray:
  """Float image in [0, 1] (8- or 16-bit input)."""
  scale = 65535.0 if image.dtype == np.uint16 else 255.0 if image.dtype.kind in "ui" or image.max() > 1.0 else 1.0
  return image.astype(np.float32) / scale


def grey(image: np.ndarray) -> np.ndarray:
  """Luminance in [0, 1] (ITU-R BT.601 weights for colour)."""
  x = to_unit(image)
  if x.shape[2] == 1:
    return x[..., 0]
  return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def lab(image: np.ndarray) -> np.ndarray:
  """CIELAB colour scaled to about [0, 1] / [-1, 1] (grey images: L only)."""
  x = to_unit(image)
  if x.shape[2] == 1:
    return x
  from skimage.color import rgb2lab

  out = rgb2lab(x)
  return (out / np.array([100.0, 128.0, 128.0])).astype(np.float32)


def positions(h: int, w: int) -> np.ndarray:
  """``(H, W, 2)`` normalised (y, x) in [0, 1]."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  return np.stack([yy / max(h - 1, 1), xx / max(w - 1, 1)], -1)


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
  """Area-averaged downscale (or no-op at scale 1), keeping the dtype."""
  if scale == 1.0:
    return image
  if not 0 < scale <= 1:
    raise ValueError(f"Classical methods take 0 < scale <= 1; got scale={scale}.")
  from PIL import Image

  h, w = image.shape[:2]
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  chans = [np.asarray(Image.fromarray(image[..., c]).resize(size, Image.BOX)) for c in range(image.shape[2])]
  return np.stack(chans, -1).astype(image.dtype)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of a label map to ``size`` (pixel-centre sampling)."""
  h, w = labels.shape
  if (h, w) == tuple(size):
    return labels.astype(np.int32)
  ys = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(int), h - 1)
  xs = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(int), w - 1)
  return labels[ys[:, None], xs[None, :]].astype(np.int32)


MAPPINGS = ("majority", "balanced")


def majority_mapping(groups: np.ndarray, labels: np.ndarray, num_groups: int, num_classes: int,
                     ignore_index: int, mapping: str = "majority") -> np.ndarray:
  """Class of each group (cluster, bin, region) from the training pixels.

  ``majority``: the most frequent valid label among the group's pixels.
  ``balanced``: the class c maximising ``P(group | c)`` (counts divided by the
  class's total), which lets a group stand for a rare class that it captures
  most of (e.g. dark membranes in ISBI: a minority of the dark bin, but most of
  the membrane pixels fall in it). Groups without labelled pixels get the most
  frequent class.
  """
  if mapping not in MAPPINGS:
    raise ValueError(f"Unknown group-to-class mapping '{mapping}'; choose one of {', '.join(MAPPINGS)}.")
  g = np.asarray(groups).reshape(-1)
  y = np.asarray(labels).reshape(-1)
  ok = (y != ignore_index) & (y >= 0) & (y < num_classes)
  counts = np.bincount(g[ok] * num_classes + y[ok], minlength=num_groups * num_classes)
  counts = counts.reshape(num_groups, num_classes)
  totals = counts.sum(0)
  overall = int(totals.argmax())
  score = counts / np.maximum(totals, 1) if mapping == "balanced" else counts
  return np.where(counts.sum(1) > 0, score.argmax(1), overall).astype(np.int32)


def sample_indices(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
  return np.arange(n) if n <= k else np.sort(rng.choice(n, k, replace=False))
