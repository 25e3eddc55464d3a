"""Reading image and mask files into NumPy arrays, with errors that name the file.

Supported files:

* ``.png .jpg .jpeg .bmp .gif .webp``: read with Pillow. 8-bit (L, RGB, RGBA) and
  16-bit single-channel (``I;16``) images keep their dtype; palette images are
  expanded to RGB when read as images and kept as indices when read as masks.
* ``.tif .tiff``: read with ``tifffile`` when it is installed (any number of bands,
  8/16-bit), else with Pillow (1, 3 or 4 bands).
* ``.npy``: a NumPy array ``(H, W)`` or ``(H, W, C)`` of uint8, uint16 or float32;
  the way to bring any band count without extra packages.

Images come back ``(H, W, C)``; masks come back as stored: ``(H, W)`` class
indices or ``(H, W, 3)`` RGB colours.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".npy")
IMAGE_DTYPES = (np.uint8, np.uint16, np.float32)


def _check_exists(path: Path) -> None:
  if not path.is_file():
    raise FileNotFoundError(f"File '{path}' does not exist or is not a file.")


def _read_tiff(path: Path) -> np.ndarray:
  try:
    import tifffile
  except ImportError:
    return None
  return np.asarray(tifffile.imread(path))


def _read_raw(path: Path, as_mask: bool) -> np.ndarray:
  """Decodes ``path`` into an array; any decoder failure is re-raised naming the file."""
  _check_exists(path)
  suffix = path.suffix.lower()
  if suffix not in IMAGE_EXTENSIONS:
    raise ValueError(
        f"Cannot read '{path}': unsupported extension '{suffix}'. Supported: {', '.join(IMAGE_EXTENSIONS)}."
    )
  try:
    if suffix == ".npy":
      return np.load(path, allow_pickle=False)
    if suffix in (".tif", ".tiff"):
      array = _read_tiff(path)
      if array is not None:
        return array
    with Image.open(path) as img:
      img.load()
      if img.mode == "P" and not as_mask:
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
      elif img.mode == "1":
        img = img.convert("L")
      elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
      array = np.asarray(img)
      if img.mode == "I" and array.size and array.min() >= 0 and array.max() < 2**16:
        array = array.astype(np.uint16)  # 16-bit PNGs often decode as 32-bit 'I'
      return array
  except Exception as e:  # noqa: BLE001 - every decoder error becomes one that names the file
    raise ValueError(f"Cannot read image file '{path}' (corrupt or unreadable): {type(e).__name__}: {e}") from e


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as ``(H, W, C)`` uint8, uint16 or float32 (see the module docstring)."""
  path = Path(path)
  array = _read_raw(path, as_mask=False)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3:
    raise ValueError(f"Image file '{path}' has shape {array.shape}; expected (H, W) or (H, W, C).")
  if array.dtype == np.float64:
    array = array.astype(np.float32)
  if array.dtype == np.bool_:
    array = array.astype(np.uint8)
  if array.dtype not in IMAGE_DTYPES:
    raise ValueError(
        f"Image file '{path}' has dtype {array.dtype}; supported: uint8, uint16, float32."
    )
  return np.ascontiguousarray(array)


def read_mask(path: str | os.PathLike) -> np.ndarray:
  """Reads a mask file: ``(H, W)`` integer class values or ``(H, W, 3)`` RGB colours."""
  path = Path(path)
  array = _read_raw(path, as_mask=True)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 3 and array.shape[-1] == 4:
    array = array[..., :3]  # RGBA colour maps: alpha carries no class
  if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
    raise ValueError(f"Mask file '{path}' has shape {array.shape}; expected (H, W) indices or (H, W, 3) colours.")
  if array.dtype == np.bool_:
    array = array.astype(np.uint8)
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"Mask file '{path}' has dtype {array.dtype}; masks must hold integers.")
  return np.ascontiguousarray(array)
