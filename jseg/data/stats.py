"""Dataset statistics: ``python -m jseg.data.stats --config=configs/pspnet.py [--split=train] [--out=stats.json]``.

Reports, over every pixel of the split's stored images and masks:

* per-channel mean and std in raw units (what ``DatasetInfo.mean/std`` and the
  folder dataset's ``data.mean/std`` hold);
* per-class pixel counts and frequencies, and the ignored pixel count;
* median-frequency class weights (Eigen & Fergus, ICCV 2015, used by SegNet):
  ``freq(c) = pixels of c / pixels of the images where c appears`` and
  ``weight(c) = median(freq) / freq(c)``; classes that never appear get 0;
* the invalid-label report of the build, when ``data.invalid_labels='ignore'``.

It prints a table and config lines to paste, and writes JSON with ``--out``.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import numpy as np

from jseg.data.cli import parse_args
from jseg.data.info import STORED_VOID
from jseg.data.source import build, get_info, get_source

USAGE = "usage: python -m jseg.data.stats --config=configs/x.py [--config.data.root=...] [--split=train] [--out=stats.json]"


def compute_stats(records: Sequence[dict[str, Any]], num_classes: int) -> dict[str, Any]:
  """Statistics of stored records (``image`` (H, W, C), ``label`` (H, W) with 255 = void)."""
  if len(records) == 0:
    raise ValueError("No records to compute statistics on.")
  total = sq = None
  pixels = 0
  counts = np.zeros(num_classes, np.int64)
  image_pixels = np.zeros(num_classes, np.int64)  # pixels of the images where each class appears
  void = 0
  for i in range(len(records)):
    record = records[i]
    image = record["image"].astype(np.float64)
    flat = image.reshape(-1, image.shape[-1])
    total = flat.sum(0) if total is None else total + flat.sum(0)
    sq = (flat**2).sum(0) if sq is None else sq + (flat**2).sum(0)
    pixels += flat.shape[0]
    label = record["label"].ravel()
    c = np.bincount(label[label != STORED_VOID], minlength=num_classes)[:num_classes]
    counts += c
    image_pixels += np.where(c > 0, label.size, 0)
    void += int((label == STORED_VOID).sum())
  mean = total / pixels
  std = np.sqrt(np.maximum(sq / pixels - mean**2, 0))
  freq = np.divide(counts, image_pixels, out=np.zeros(num_classes), where=image_pixels > 0)
  present = freq > 0
  median = np.median(freq[present]) if present.any() else 0.0
  weights = np.divide(median, freq, out=np.zeros(num_classes), where=present)
  return {
      "num_images": len(records),
      "num_pixels": int(pixels),
      "mean": mean.tolist(),
      "std": std.tolist(),
      "class_pixels": counts.tolist(),
      "class_frequency": (counts / max(counts.sum(), 1)).tolist(),
      "ignored_pixels": void,
      "median_frequency_weights": weights.tolist(),
  }


def format_stats(stats: dict[str, Any], class_names: Sequence[str]) -> str:
  lines = [
      f"{stats['num_images']} images, {stats['num_pixels']} pixels, {stats['ignored_pixels']} ignored",
      "mean: " + ", ".join(f"{v:.4f}" for v in stats["mean"]),
      "std:  " + ", ".join(f"{v:.4f}" for v in stats["std"]),
      f"{'class':<16}{'pixels':>12}{'share':>9}{'mf weight':>11}",
  ]
  for name, n, f, w in zip(class_names, stats["class_pixels"], stats["class_frequency"], stats["median_frequency_weights"]):
    lines.append(f"{name:<16}{n:>12}{f:>9.4f}{w:>11.4f}")
  lines.append("config lines:")
  lines.append("  config.data.mean = (" + ", ".join(f"{v:.4f}" for v in stats["mean"]) + ",)")
  lines.append("  config.data.std = (" + ", ".join(f"{v:.4f}" for v in stats["std"]) + ",)")
  lines.append("  config.loss.class_weights = (" + ", ".join(f"{v:.4f}" for v in stats["median_frequency_weights"]) + ",)")
  return "\n".join(lines)


def main(argv: list[str]) -> dict[str, Any]:
  config, opts = parse_args(argv, {"split": "", "out": ""}, USAGE)
  split = opts["split"] or config.data.train_split
  info = get_info(config.data)
  stats = compute_stats(get_source(config, split), info.num_classes)
  stats.update(dataset=info.name, split=split, root=str(config.data.root), class_names=list(info.class_names))
  report = build(config).label_report
  if report:
    stats["invalid_labels"] = report
  print(format_stats(stats, info.class_names))
  if report:
    print(f"invalid mask values mapped to ignore at build time: {report}")
  if opts["out"]:
    with open(opts["out"], "w") as f:
      json.dump(stats, f, indent=2)
    print(f"wrote {opts['out']}")
  return stats


if __name__ == "__main__":
  main(sys.argv[1:])
