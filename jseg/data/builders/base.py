"""What a jseg dataset is, without TensorFlow Datasets.

Each dataset module subclasses ``DatasetSpec`` and says three things: its
``DatasetInfo`` (classes, palette, statistics), how to list the (image, mask)
file pairs of a split under a root folder, and how raw mask values map to class
indices. ``jseg.data.builders.tfds_builder`` turns a spec into the tfds builder
that writes the array_record files; this module does not import tfds, so a
process that only needs a dataset's info (the model benchmark, prediction on
files) does not load it. Nothing is downloaded: files are read from the local
root (tfds' "manual" data).

Stored masks hold class indices with ``STORED_VOID`` (255) for unlabelled pixels;
the loader maps that value to ``data.ignore_index``. Mask values outside the
class set raise an error listing the values and files, or become void when
``data.invalid_labels == 'ignore'`` (the pixel count is logged and kept in
``label_report``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import ml_collections
import numpy as np

from jseg.data.info import STORED_VOID, DatasetInfo
from jseg.data.io import read_image, read_mask

log = logging.getLogger("jseg.data")

INVALID_LABEL_MODES = ("error", "ignore")


class Pair(NamedTuple):
  """One example's files."""

  name: str
  image: Path
  mask: Path


def invalid_label_mode(data_cfg: ml_collections.ConfigDict) -> str:
  mode = data_cfg.get("invalid_labels", "error")
  if mode not in INVALID_LABEL_MODES:
    raise ValueError(f"data.invalid_labels='{mode}' is not valid; choose one of {INVALID_LABEL_MODES}.")
  return mode


def _describe_values(values: np.ndarray) -> str:
  if values.ndim == 2:  # RGB colours
    return ", ".join(f"({r},{g},{b})" for r, g, b in values[:10]) + (" ..." if len(values) > 10 else "")
  return ", ".join(str(v) for v in values[:20]) + (" ..." if len(values) > 20 else "")


class DatasetSpec:
  """A dataset over a local folder; subclasses define the dataset specifics.

  The class methods describe the dataset without an instance (info, splits, file
  pairs); an instance is one root and config, and generates the checked examples.
  """

  # The tfds builder's name: its folder inside the build directory.
  name = ""
  # Says where to get the data; part of the error when `data.root` does not exist.
  ROOT_HINT = ""

  def __init__(self, data_cfg: ml_collections.ConfigDict, root: Path):
    self.data_cfg = data_cfg
    self.root = Path(root)
    self.info = self.dataset_info(data_cfg, self.root)
    self.label_report: dict[str, dict[str, Any]] = {}

  # ---- what a dataset defines ----
  @classmethod
  def dataset_info(cls, data_cfg: ml_collections.ConfigDict, root: Path | None = None) -> DatasetInfo:
    raise NotImplementedError

  @classmethod
  def split_names(cls, root: Path, data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Splits this root provides (a split may still turn out empty)."""
    raise NotImplementedError

  @classmethod
  def list_pairs(cls, root: Path, split: str, data_cfg: ml_collections.ConfigDict) -> list[Pair]:
    """The split's (name, image, mask) triples in a fixed order; missing files raise."""
    raise NotImplementedError

  @classmethod
  def split_location(cls, root: Path, split: str, data_cfg: ml_collections.ConfigDict) -> str:
    """Where ``list_pairs`` looks, for error messages."""
    return str(root / split)

  @classmethod
  def map_label(cls, mask: np.ndarray, data_cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """Raw mask -> (class indices with STORED_VOID for void, bool map of values outside the class set)."""
    raise NotImplementedError

  @classmethod
  def build_fields(cls, data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Config fields that change what the build contains (part of the cache key)."""
    return {"invalid_labels": invalid_label_mode(data_cfg)}

  # ---- examples ----
  def splits(self) -> dict[str, list[Pair]]:
    """The pairs of each split of this root that has files (empty splits are reported when asked for)."""
    out = {}
    for split in self.split_names(self.root, self.data_cfg):
      pairs = self.list_pairs(self.root, split, self.data_cfg)
      if pairs:
        out[split] = pairs
    return out

  def generate_examples(self, split: str, pairs: list[Pair]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, example) per pair, checked; bad mask values raise or become void (``data.invalid_labels``)."""
    info = self.info
    mode = invalid_label_mode(self.data_cfg)
    offenders: dict[str, np.ndarray] = {}
    invalid_pixels = 0
    for pair in pairs:
      image = read_image(pair.image)
      mask = read_mask(pair.mask)
      if mask.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"Mask '{pair.mask}' is {mask.shape[0]}x{mask.shape[1]} but its image '{pair.image}' is "
            f"{image.shape[0]}x{image.shape[1]} (HxW); they must match."
        )
      if image.shape[2] != info.channels or image.dtype != np.dtype(info.image_dtype):
        raise ValueError(
            f"Image '{pair.image}' has {image.shape[2]} channel(s) of {image.dtype}; dataset '{info.name}' "
            f"expects {info.channels} channel(s) of {info.image_dtype}."
        )
      label, invalid = self.map_label(mask, self.data_cfg)
      if invalid.any():
        values = np.unique(mask[invalid], axis=0)
        offenders[str(pair.mask)] = values
        invalid_pixels += int(invalid.sum())
        label = np.where(invalid, STORED_VOID, label).astype(label.dtype)
      if mode == "error" and offenders:
        continue  # the whole split is scanned so the error lists every bad file
      yield pair.name, {"image": image, "label": label, "name": pair.name}
    if not offenders:
      return
    lines = [f"  {f}: values {_describe_values(v)}" for f, v in list(offenders.items())[:20]]
    more = f"\n  ... and {len(offenders) - 20} more files" if len(offenders) > 20 else ""
    summary = (
        f"{len(offenders)} mask file(s) of split '{split}' of '{info.name}' hold {invalid_pixels} pixel(s) with values "
        f"outside the class set (classes 0..{info.num_classes - 1}"
        f"{self.valid_values_hint()}):\n" + "\n".join(lines) + more
    )
    if mode == "error":
      raise ValueError(summary + "\nFix the masks, or set data.invalid_labels='ignore' to map them to the ignore index.")
    log.warning("%s\nThese pixels were mapped to the ignore index (data.invalid_labels='ignore').", summary)
    self.label_report[split] = {"invalid_pixels": invalid_pixels, "files": len(offenders)}

  def valid_values_hint(self) -> str:
    """Extra words on which raw values are valid, for the invalid-label error."""
    return ""
