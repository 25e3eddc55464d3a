"""``DatasetInfo``: what the rest of jseg needs to know about a dataset.

Mean and std are per channel in raw pixel units (0-255 for 8-bit images,
0-65535 for 16-bit ones), so ``(x - mean) / std`` works on decoded files
directly; ``max_value`` is the value min-max normalisation divides by.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Value stored in the built masks for pixels no class covers (void, unlabelled,
# padding); it becomes ``data.ignore_index`` when examples are loaded.
STORED_VOID = 255


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetInfo:
  """Static facts about a dataset: classes, colours, normalisation statistics."""

  name: str
  num_classes: int
  class_names: tuple[str, ...]
  palette: np.ndarray  # (num_classes, 3) uint8, RGB colour of each class
  ignore_index: int
  mean: np.ndarray  # (channels,) float32, raw pixel units
  std: np.ndarray  # (channels,) float32, raw pixel units
  channels: int
  max_value: float = 255.0  # min-max normalisation divides by this
  image_dtype: str = "uint8"  # dtype of the stored images

  def __post_init__(self):
    if not 1 <= self.num_classes < STORED_VOID:
      raise ValueError(
          f"Dataset '{self.name}' has {self.num_classes} classes; jseg stores masks as uint8 and supports 1 to {STORED_VOID - 1}."
      )
    if len(self.class_names) != self.num_classes:
      raise ValueError(
          f"Dataset '{self.name}': {len(self.class_names)} class names for {self.num_classes} classes."
      )
    if self.palette.shape != (self.num_classes, 3):
      raise ValueError(f"Dataset '{self.name}': palette shape {self.palette.shape}, expected ({self.num_classes}, 3).")
    for field in ("mean", "std"):
      if np.shape(getattr(self, field)) != (self.channels,):
        raise ValueError(
            f"Dataset '{self.name}': {field} has shape {np.shape(getattr(self, field))}, "
            f"expected ({self.channels},) for {self.channels} channel(s)."
        )
    if np.any(np.asarray(self.std) <= 0):
      raise ValueError(f"Dataset '{self.name}': std must be positive, got {self.std}.")


def default_palette(num_classes: int) -> np.ndarray:
  """Distinct colours for datasets without their own (the PASCAL VOC bit-interleaving scheme)."""
  palette = np.zeros((num_classes, 3), np.uint8)
  for k in range(num_classes):
    c, r, g, b = k, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= ((c >> 0) & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    palette[k] = (r, g, b)
  return palette
