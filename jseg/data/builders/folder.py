"""Any folder of images and masks with matching file names (``data.name = 'folder'``).

Bring your own data with one config change. Fields read from ``config.data``
(all optional except the classes):

=====================  ======================================================
``root``               the dataset folder; relative paths below are inside it
``image_dir``          images of a split, ``{split}`` is replaced by the split
                       name (default ``"{split}/images"``)
``mask_dir``           masks of a split (default ``"{split}/masks"``)
``mask_suffix``        mask stem = image stem + suffix, e.g. ``"_mask"``
                       (default ``""``); any supported extension matches
``class_names``        tuple of class names (or ``num_classes``, which names
                       them ``class_0 ...``)
``palette_file``       masks are RGB colour maps: a text file, one line per
                       class in index order, ``R G B name``; a line named
                       ``ignore`` gives a colour that maps to the ignore index
                       (default ``""``: masks hold class indices)
``label_values``       index masks whose raw values are not 0..K-1: the raw
                       value of class 0, 1, ..., e.g. ``(255, 0)`` (default:
                       identity)
``void_values``        raw values that mean "not labelled" and become the
                       ignore index (default ``(255,)``)
``mean``, ``std``      per-channel statistics in raw units; compute them with
                       ``python -m jseg.data.stats`` (default: mid-range of the
                       dtype, with a warning)
``max_value``          min-max normalisation divisor (default: 255 for uint8,
                       65535 for uint16, 1 for float32)
``splits``             split names to look for (default train, val, test);
                       splits whose image folder is missing are skipped
=====================  ======================================================

Images: any file ``jseg.data.io.read_image`` reads: 8-bit or 16-bit, 1 channel,
RGB, or any band count (``.npy`` arrays, or ``.tif`` with ``tifffile``). All
images of a dataset must share band count and dtype (checked at build time);
channels and dtype are taken from the first image of the first split.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jseg.config import resolve_path
from jseg.data.builders.base import DatasetSpec, Pair, invalid_label_mode
from jseg.data.info import STORED_VOID, DatasetInfo, default_palette
from jseg.data.io import IMAGE_EXTENSIONS, read_image
from jseg.registry import DATASETS

log = logging.getLogger("jseg.data")

DEFAULT_SPLITS = ("train", "val", "test")
IGNORE_NAME = "ignore"
_WARNED_STATS: set[str] = set()  # roots already warned about missing mean/std


def _field(data_cfg: ml_collections.ConfigDict, name: str, default: Any) -> Any:
  value = data_cfg.get(name, None)
  return default if value is None else value


def _in_root(root: Path, path: str) -> Path:
  p = Path(path).expanduser()
  return p if p.is_absolute() else root / p


@functools.lru_cache(maxsize=16)
def read_palette_file(path: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
  """Palette text file -> (class names, class colours (K, 3), ignore colours (M, 3))."""
  file = Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"Palette file data.palette_file='{path}' does not exist.")
  names, colours, ignore = [], [], []
  for n, line in enumerate(file.read_text().splitlines(), 1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    parts = line.split(maxsplit=3)
    try:
      rgb = tuple(int(v) for v in parts[:3])
      if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError
    except ValueError:
      raise ValueError(f"{file}, line {n}: expected 'R G B name' with 0-255 values, got '{line}'.") from None
    name = parts[3].strip() if len(parts) > 3 else f"class_{len(names)}"
    (ignore if name.lower() == IGNORE_NAME else colours).append(rgb)
    if name.lower() != IGNORE_NAME:
      names.append(name)
  if not names:
    raise ValueError(f"Palette file '{file}' lists no classes.")
  return tuple(names), np.array(colours, np.uint8), np.array(ignore, np.uint8).reshape(-1, 3)


def _rgb_key(colours: np.ndarray) -> np.ndarray:
  c = colours.astype(np.int64)
  return (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]


@DATASETS.register("folder")
class Folder(DatasetSpec):
  """A user's folder of images and masks; see the module docstring for the fields."""

  name = "jseg_folder"
  ROOT_HINT = "Set --config.data.root to the folder holding your images and masks (see jseg/data/builders/folder.py)."

  @classmethod
  def _palette(cls, data_cfg: ml_collections.ConfigDict, root: Path | None):
    path = _field(data_cfg, "palette_file", "")
    if not path:
      return None
    base = root if root is not None else Path(".")
    return read_palette_file(str(_in_root(base, path)))

  @classmethod
  def _first_image(cls, root: Path, data_cfg: ml_collections.ConfigDict) -> np.ndarray:
    for split in cls.split_names(root, data_cfg):
      pairs = cls.list_pairs(root, split, data_cfg)
      if pairs:
        return read_image(pairs[0].image)
    raise ValueError(
        f"No images found under {root} with data.image_dir='{_field(data_cfg, 'image_dir', '{split}/images')}' "
        f"for splits {_field(data_cfg, 'splits', DEFAULT_SPLITS)}."
    )

  @classmethod
  def dataset_info(cls, data_cfg: ml_collections.ConfigDict, root: Path | None = None) -> DatasetInfo:
    palette_file = cls._palette(data_cfg, root)
    if palette_file is not None:
      names, colours, _ = palette_file
      palette = colours
    else:
      names = _field(data_cfg, "class_names", None)
      if names is None:
        k = data_cfg.get("num_classes", None)
        if k is None:
          raise ValueError("The folder dataset needs data.class_names (or data.num_classes, or data.palette_file).")
        names = tuple(f"class_{i}" for i in range(int(k)))
      names = tuple(names)
      palette = default_palette(len(names))
    if root is None or not root.is_dir():
      raise FileNotFoundError(f"Folder dataset root data.root='{data_cfg.get('root')}' ({root}) does not exist. {cls.ROOT_HINT}")
    first = cls._first_image(root, data_cfg)
    channels, dtype = first.shape[2], first.dtype
    max_value = float(_field(data_cfg, "max_value", {np.uint8: 255.0, np.uint16: 65535.0}.get(dtype.type, 1.0)))
    mean, std = _field(data_cfg, "mean", None), _field(data_cfg, "std", None)
    if (mean is None or std is None) and str(root) not in _WARNED_STATS:
      _WARNED_STATS.add(str(root))
      log.warning(
          "Folder dataset at %s: data.mean/data.std not set; using mid-range values. Compute them with "
          "`python -m jseg.data.stats --config=...` and put them in the config.", root,
      )
    if mean is None or std is None:
      mean = (max_value / 2,) * channels if mean is None else mean
      std = (max_value / 4,) * channels if std is None else std
    return DatasetInfo(
        name="folder",
        num_classes=len(names),
        class_names=names,
        palette=palette,
        ignore_index=int(data_cfg.ignore_index),
        mean=np.array(mean, np.float32).reshape(-1),
        std=np.array(std, np.float32).reshape(-1),
        channels=channels,
        max_value=max_value,
        image_dtype=str(dtype),
    )

  @classmethod
  def _split_dirs(cls, root: Path, split: str, data_cfg: ml_collections.ConfigDict) -> tuple[Path, Path]:
    image_dir = _field(data_cfg, "image_dir", "{split}/images").format(split=split)
    mask_dir = _field(data_cfg, "mask_dir", "{split}/masks").format(split=split)
    return _in_root(root, image_dir), _in_root(root, mask_dir)

  @classmethod
  def split_names(cls, root: Path, data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(s for s in _field(data_cfg, "splits", DEFAULT_SPLITS) if cls._split_dirs(root, s, data_cfg)[0].is_dir())

  @classmethod
  def split_location(cls, root: Path, split: str, data_cfg: ml_collections.ConfigDict) -> str:
    images, masks = cls._split_dirs(root, split, data_cfg)
    return f"{images} and {masks}"

  @classmethod
  def list_pairs(cls, root: Path, split: str, data_cfg: ml_collections.ConfigDict) -> list[Pair]:
    image_dir, mask_dir = cls._split_dirs(root, split, data_cfg)
    if not image_dir.is_dir():
      return []
    suffix = _field(data_cfg, "mask_suffix", "")
    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
      for p in sorted(mask_dir.iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
          masks.setdefault(p.stem, p)
    pairs, missing = [], []
    for image in sorted(image_dir.iterdir()):
      if image.suffix.lower() not in IMAGE_EXTENSIONS:
        continue
      mask = masks.get(image.stem + suffix)
      if mask is None:
        missing.append(image.name)
      else:
        pairs.append(Pair(image.stem, image, mask))
    if missing:
      raise FileNotFoundError(
          f"{len(missing)} image(s) of split '{split}' in {image_dir} have no mask '<stem>{suffix}.<ext>' in "
          f"{mask_dir}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}."
      )
    return pairs

  def map_label(self, mask: np.ndarray, data_cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    palette_file = self._palette(data_cfg, self.root)
    if palette_file is not None:
      return self._map_colours(mask, palette_file)
    if mask.ndim == 3:
      raise ValueError(
          f"Mask has shape {mask.shape} (RGB colours) but data.palette_file is not set; give a palette file "
          "'R G B name' per class, or store masks as class-index images."
      )
    k = self.info.num_classes
    values = _field(data_cfg, "label_values", None)
    void = np.isin(mask, np.array(_field(data_cfg, "void_values", (STORED_VOID,)), np.int64))
    if values is None:
      valid = mask < k
      label = np.where(valid, mask, STORED_VOID).astype(np.uint8)
    else:
      if len(values) != k:
        raise ValueError(f"data.label_values={tuple(values)} has {len(values)} entries for {k} classes.")
      label = np.full(mask.shape, STORED_VOID, np.uint8)
      for i, raw in enumerate(values):
        label[mask == raw] = i
      valid = label != STORED_VOID
    return label, ~valid & ~void

  @classmethod
  def _map_colours(cls, mask: np.ndarray, palette_file) -> tuple[np.ndarray, np.ndarray]:
    _, colours, ignore = palette_file
    if mask.ndim != 3:
      raise ValueError(f"data.palette_file is set, so masks must be RGB colour images; got shape {mask.shape}.")
    keys = _rgb_key(mask.astype(np.int64))
    class_keys = _rgb_key(colours)
    order = np.argsort(class_keys)
    pos = np.clip(np.searchsorted(class_keys[order], keys), 0, len(order) - 1)
    hit = class_keys[order][pos] == keys
    label = np.where(hit, order[pos], STORED_VOID).astype(np.uint8)
    void = np.isin(keys, _rgb_key(ignore))
    return label, ~hit & ~void

  @classmethod
  def build_fields(cls, data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    fields = {"invalid_labels": invalid_label_mode(data_cfg)}
    for name in ("image_dir", "mask_dir", "mask_suffix", "class_names", "num_classes", "palette_file",
                 "label_values", "void_values", "splits"):  # fmt: skip
      value = data_cfg.get(name, None)
      fields[name] = list(value) if isinstance(value, (tuple, list)) else value
    palette = data_cfg.get("palette_file", None)
    if palette:
      file = _in_root(resolve_path(str(data_cfg.get("root", "."))), palette)
      fields["palette_content"] = file.read_text() if file.is_file() else None
    return fields
