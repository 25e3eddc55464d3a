"""Metric cost: ``python -m jseg.bench metrics [--out=bench_metrics.json]``.

Times the jitted ``jseg.metrics.confusion_matrix`` on one evaluation batch
(default 8x512x512 labels with 21 classes, ~5% ignore pixels), for each method
(``bincount`` scatter-add, ``onehot`` matmul) and for predictions given as class
maps or as float32 logits (the argmax included), then ``summarize`` of the matrix
on the host. Each figure is the median of ``--repeats`` timed runs after one
compiling run. Results are checked against each other before timing. Not a test:
the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jseg import metrics


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """(first call incl. compile, median of ``repeats`` later calls) in seconds."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main(argv: list[str]) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog="python -m jseg.bench metrics", description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--classes", type=int, default=21)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--methods", default="bincount,onehot")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  k, shape = args.classes, (args.batch, args.size, args.size)

  rng = np.random.default_rng(0)
  label = rng.integers(0, k, size=shape).astype(np.int32)
  label[rng.random(shape) < 0.05] = 255
  pred = np.where(rng.random(shape) < 0.7, label % k, rng.integers(0, k, size=shape)).astype(np.int32)
  logits = jax.nn.one_hot(jnp.asarray(pred), k, dtype=jnp.float32) + 0.01 * jax.random.normal(
      jax.random.key(0), shape + (k,))
  label_d, pred_d = jax.device_put(label), jax.device_put(pred)

  results, reference = [], None
  for method in args.methods.split(","):
    fn = jax.jit(lambda p, y, m=method: metrics.confusion_matrix(p, y, k, 255, method=m))
    cm = np.asarray(fn(pred_d, label_d))
    reference = cm if reference is None else reference
    if not np.array_equal(cm, reference):
      raise RuntimeError(f"confusion_matrix method '{method}' disagrees with '{args.methods.split(',')[0]}'.")
    for kind, p in (("class_map", pred_d), ("logits", logits)):
      first, median = _time(lambda: fn(p, label_d), args.repeats)
      r = {"method": method, "pred": kind, "first_call_s": round(first, 4), "median_s": round(median, 5),
           "megapixels_per_s": round(label.size / median / 1e6, 1)}
      print(f"confusion_matrix {method:9s} pred={kind:9s}: {1e3 * median:8.2f} ms "
            f"({r['megapixels_per_s']} Mpx/s; first call {first:.2f} s)", flush=True)
      results.append(r)
  first, median = _time(lambda: metrics.summarize(reference), args.repeats)
  print(f"summarize (host, NumPy): {1e3 * median:.3f} ms", flush=True)
  report = {
      "suite": "metrics",
      "command": "python -m jseg.bench metrics " + " ".join(argv),
      "shape": list(shape),
      "num_classes": k,
      "confusion_matrix": results,
      "summarize_median_s": round(median, 6),
      "backend": jax.default_backend(),
      "devices": [d.device_kind for d in jax.devices()],
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                  "jax": jax.__version__},
  }
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
  return report
