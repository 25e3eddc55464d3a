"""Look at what the network sees: ``python -m jseg.data.show --config=... --out=grid.png``.

Writes a grid of augmented training crops (``--n``, default 8), each shown as the
image next to the same image with its mask overlaid in the dataset palette
(ignored pixels are left uncoloured). ``--split=val`` shows unaugmented
evaluation examples instead. Multi-band images show their first three bands,
single-band images in grey, each rescaled to its own range for display.
"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from jseg.data.cli import parse_args
from jseg.data.info import DatasetInfo
from jseg.data.loader import make_eval_source, make_train_iterator
from jseg.data.source import get_info

USAGE = "usage: python -m jseg.data.show --config=configs/x.py --out=grid.png [--n=8] [--split=train|val] [--alpha=0.5]"


def to_display(image: np.ndarray, info: DatasetInfo, normalize: str) -> np.ndarray:
  """Normalised (H, W, C) float -> (H, W, 3) uint8 for viewing."""
  raw = image * info.max_value if normalize == "minmax" else image * info.std + info.mean
  rgb = raw[..., :3] if raw.shape[-1] >= 3 else np.repeat(raw[..., :1], 3, axis=-1)
  if info.max_value == 255 and info.image_dtype == "uint8":
    return np.clip(rgb, 0, 255).astype(np.uint8)
  lo, hi = np.percentile(rgb, 1), np.percentile(rgb, 99)
  return np.clip((rgb - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)


def overlay(rgb: np.ndarray, label: np.ndarray, info: DatasetInfo, alpha: float = 0.5) -> np.ndarray:
  """Blends class colours over ``rgb``; pixels outside 0..K-1 (ignored, padding) keep the image."""
  valid = (label >= 0) & (label < info.num_classes)
  colours = info.palette[np.where(valid, label, 0)].astype(np.float32)
  out = rgb.astype(np.float32)
  out[valid] = (1 - alpha) * out[valid] + alpha * colours[valid]
  return out.astype(np.uint8)


def make_grid(tiles: list[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
  h = max(t.shape[0] for t in tiles)
  w = max(t.shape[1] for t in tiles)
  rows = -(-len(tiles) // columns)
  grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
  for i, t in enumerate(tiles):
    r, c = divmod(i, columns)
    grid[r * (h + gap) : r * (h + gap) + t.shape[0], c * (w + gap) : c * (w + gap) + t.shape[1]] = t
  return grid


def main(argv: list[str]) -> np.ndarray:
  config, opts = parse_args(argv, {"out": "grid.png", "n": 8, "split": "", "alpha": 0.5}, USAGE)
  info = get_info(config.data)
  n, mode = int(opts["n"]), config.data.normalize
  if n < 1:
    raise SystemExit(f"--n={n}: show at least one example.")
  split = opts["split"] or config.data.train_split
  if split == config.data.train_split:
    config.batch_size = n
    batch = next(make_train_iterator(config))
    examples = [(batch["image"][i], batch["label"][i]) for i in range(n)]
  else:
    source = make_eval_source(config, split)
    examples = [(source[i]["image"], source[i]["label"]) for i in range(min(n, len(source)))]
  tiles = []
  for image, label in examples:
    rgb = to_display(image, info, mode)
    tiles.append(np.concatenate([rgb, np.full((rgb.shape[0], 2, 3), 255, np.uint8), overlay(rgb, label, info, opts["alpha"])], 1))
  grid = make_grid(tiles, columns=2 if len(tiles) > 1 else 1)
  Image.fromarray(grid).save(opts["out"])
  print(f"wrote {opts['out']}: {len(tiles)} {split} examples of '{info.name}', image | mask overlay")
  return grid


if __name__ == "__main__":
  main(sys.argv[1:])
