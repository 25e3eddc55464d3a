"""ISBI 2012 EM segmentation challenge: neuronal membranes, binary (Cardona et al. 2010).

Reads ``data/membrane/`` of the zhixuhao/unet repository: ``image/<i>.png``
(grayscale 512x512 serial-section TEM slices of the Drosophila ventral nerve
cord, i = 0..29, the challenge's training volume) and ``label/<i>.png`` with
0 = membrane and 255 = cell interior. The challenge test labels are not
public, so jseg holds out slices: ``train`` = slices 0-23, ``val`` = slices
24-29 (a contiguous block, so neighbouring near-identical slices do not leak
across the split).

Classes: 0 = ``cell`` (raw 255), 1 = ``membrane`` (raw 0): membrane, the rare
(about 22% of pixels) and interesting class, is the positive class for
Dice/focal losses and binary metrics. Any other raw value is invalid.

Mean/std: slices 0-23 in 0-255 units, from ``python -m jseg.data.stats
--config.data.name=isbi2012 --config.data.root=<unet>/data/membrane`` (membrane
is 22.5% of those pixels; median-frequency weights 0.6455 cell, 2.2180 membrane).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from jseg.data.builders.base import DatasetSpec, Pair
from jseg.data.info import STORED_VOID, DatasetInfo
from jseg.registry import DATASETS

CLASS_NAMES = ("cell", "membrane")
PALETTE = np.array([(255, 255, 255), (0, 0, 0)], np.uint8)  # as the raw masks draw them
RAW_VALUES = (255, 0)  # raw mask value of class 0, class 1
VAL_START = 24  # slices >= this index form the validation split
MEAN = (125.1509,)
STD = (43.5605,)


@DATASETS.register("isbi2012")
class Isbi2012(DatasetSpec):
  """ISBI 2012 membranes: 2 classes, 1 channel, train 0-23 / val 24-29."""

  name = "jseg_isbi2012"
  ROOT_HINT = (
      "Point --config.data.root at a folder with image/ and label/ (e.g. data/membrane/ of "
      "github.com/zhixuhao/unet). The sample shipped with jseg is samples/isbi2012_membranes."
  )

  @classmethod
  def dataset_info(cls, data_cfg: ml_collections.ConfigDict, root: Path | None = None) -> DatasetInfo:
    return DatasetInfo(
        name="isbi2012",
        num_classes=2,
        class_names=CLASS_NAMES,
        palette=PALETTE,
        ignore_index=int(data_cfg.ignore_index),
        mean=np.array(MEAN, np.float32),
        std=np.array(STD, np.float32),
        channels=1,
    )

  @classmethod
  def split_names(cls, root: Path, data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    return ("train", "val") if (root / "image").is_dir() else ()

  @classmethod
  def split_location(cls, root: Path, split: str, data_cfg: ml_collections.ConfigDict) -> str:
    which = f"< {VAL_START}" if split == "train" else f">= {VAL_START}"
    return f"{root / 'image'} (slices {which})"

  @classmethod
  def list_pairs(cls, root: Path, split: str, data_cfg: ml_collections.ConfigDict) -> list[Pair]:
    if split not in ("train", "val"):
      raise ValueError(f"ISBI 2012 has splits 'train' and 'val' (the test labels are not public); got '{split}'.")
    slices = sorted((int(p.stem), p) for p in (root / "image").glob("*.png") if p.stem.isdigit())
    pairs = [
        Pair(str(i), path, root / "label" / path.name)
        for i, path in slices
        if (i < VAL_START) == (split == "train")
    ]
    for pair in pairs:
      if not pair.mask.is_file():
        raise FileNotFoundError(f"Label file '{pair.mask}' for image '{pair.image}' does not exist.")
    return pairs

  @classmethod
  def map_label(cls, mask: np.ndarray, data_cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    if mask.ndim != 2:
      raise ValueError(f"ISBI 2012 labels are single-channel; got shape {mask.shape}.")
    label = np.full(mask.shape, STORED_VOID, np.uint8)
    for k, raw in enumerate(RAW_VALUES):
      label[mask == raw] = k
    return label, label == STORED_VOID

  def valid_values_hint(self) -> str:
    return "; raw values 255 = cell, 0 = membrane"
