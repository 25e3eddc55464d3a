"""Input pipeline throughput: ``python -m jseg.bench data [--out=bench_data.json]``.

Measures training images per second out of ``make_train_iterator`` at 512x512
crops with the full training augmentation (random scale 0.5-2.0, crop with
padding, horizontal flip, colour jitter 0.4, Gaussian blur), normalised float32
batches, for each grain worker count in ``--workers`` (default ``0,1,2``). The
first ``--warmup`` batches (default 2) are not timed (they include worker start).
The dataset comes from ``--config`` (default: the CamVid sample); any
``--config.<field>=`` override applies, e.g. ``--config.data.root=/path/to/CamVid``.
Not a test: the figure depends on the machine and its load.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

from jseg.data.cli import parse_args
from jseg.data.loader import make_train_iterator
from jseg.data.source import build

USAGE = "usage: python -m jseg.bench data [--config=...] [--batches=10] [--batch_size=8] [--workers=0,1,2] [--out=bench_data.json]"


def measure(config, batches: int, warmup: int) -> dict[str, Any]:
  it = make_train_iterator(config)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  images = batches * config.batch_size
  return {
      "worker_count": int(config.data.worker_count),
      "batches": batches,
      "batch_size": int(config.batch_size),
      "seconds": round(seconds, 3),
      "images_per_s": round(images / seconds, 2),
      "batch_shape": list(batch["image"].shape),
  }


def main(argv: list[str]) -> dict[str, Any]:
  config, opts = parse_args(
      argv, {"batches": 10, "warmup": 2, "batch_size": 8, "workers": "0,1,2", "crop": 512, "out": ""}, USAGE
  )
  config.batch_size = int(opts["batch_size"])
  config.data.crop_size = (int(opts["crop"]), int(opts["crop"]))
  config.data.scale_range = (0.5, 2.0)
  config.data.hflip = True
  config.data.color_jitter = 0.4
  config.data.blur = True
  build(config)  # the one-off build is not part of the timing
  results = []
  for workers in (int(w) for w in str(opts["workers"]).split(",")):
    config.data.worker_count = workers
    r = measure(config, int(opts["batches"]), int(opts["warmup"]))
    print(f"workers={workers}: {r['images_per_s']:.1f} images/s ({r['batches']} batches of {r['batch_size']}, {r['seconds']:.2f} s)", flush=True)
    results.append(r)
  report = {
      "suite": "data",
      "command": "python -m jseg.bench data " + " ".join(argv),
      "dataset": config.data.name,
      "root": str(config.data.root),
      "crop_size": list(config.data.crop_size),
      "augmentation": {"scale_range": [0.5, 2.0], "hflip": True, "color_jitter": 0.4, "blur": True},
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
      "results": results,
  }
  if opts["out"]:
    with open(opts["out"], "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {opts['out']}")
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
