"""Classical baselines: ``python -m jseg.baselines --config=configs/segnet.py [--method=all]``.

Fits each classical method (``jseg.classical``: ``otsu``, ``multiotsu``,
``kmeans``, ``slic``, ``watershed``, ``svm``) on ``--train_split`` of the
config's dataset, predicts ``--split`` (default ``config.data.eval_split``)
and prints the same metric table as ``jseg.evaluate`` (confusion matrix ->
``jseg.metrics.summarize`` -> ``format_table``), plus boundary F1, then one
summary row per method. Method parameters can be set with
``--params='{"kmeans": {"clusters": 64}}'`` (JSON) or in ``config.baselines``
(a dict of the same form). Results are written as JSON to ``--output``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (its data block is used).")
_METHOD = flags.DEFINE_string("method", "all", "Comma-separated classical methods, or 'all'.")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", None, "Split to fit on (default: config.data.train_split).")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: config.data.eval_split).")
_MAX_TRAIN = flags.DEFINE_integer("max_train_images", 0, "Use at most this many training images (0 = all).")
_PARAMS = flags.DEFINE_string("params", "", "JSON dict: method name -> constructor parameters.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON path for the results (default: none).")


def _raw_examples(config: Any, split: str, limit: int = 0) -> tuple[list, list, list]:
  """Raw uint8 images, int label maps (void = ignore_index) and names of ``split``."""
  from jseg import data as data_lib
  from jseg.data.transforms import to_class_label

  src = data_lib.make_eval_source(config, split)
  info = data_lib.get_info(config.data)
  n = len(src) if not limit else min(limit, len(src))
  images, labels, names = [], [], []
  for i in range(n):
    r = src.raw(i)
    images.append(r["image"])
    labels.append(to_class_label(r["label"], info.ignore_index))
    name = r["name"]
    names.append(name.decode() if isinstance(name, bytes) else str(name))
  return images, labels, names


def run_baselines(config: Any, methods: list[str], train_split: str | None = None,
                  split: str | None = None, params: dict | None = None,
                  max_train_images: int = 0, verbose: bool = True) -> dict:
  """Fits and evaluates ``methods``; returns ``{method: result}``, where
  ``result`` has ``metrics`` (scalars), ``per_class_iou``, ``mean_bf``,
  ``confusion_matrix``, ``table`` and timings."""
  import numpy as np

  from jseg import classical, metrics
  from jseg import data as data_lib

  info = data_lib.get_info(config.data)
  train_split = train_split or config.data.train_split
  split = split or config.data.eval_split
  params = {**dict(config.get("baselines", None) or {}), **(params or {})}
  unknown = set(methods) - set(classical.METHODS.names())
  if unknown:
    raise ValueError(f"Unknown classical method(s) {sorted(unknown)}; valid: {', '.join(classical.METHODS.names())}.")
  tr_images, tr_labels, _ = _raw_examples(config, train_split, max_train_images)
  ev_images, ev_labels, _ = _raw_examples(config, split)
  k = info.num_classes
  results = {}
  for name in methods:
    method = classical.build(name, k, info.ignore_index, seed=int(config.get("seed", 0)),
                             **dict(params.get(name, {})))
    t0 = time.perf_counter()
    method.fit(tr_images, tr_labels)
    t1 = time.perf_counter()
    cm = np.zeros((k, k), np.int64)
    bcounts = np.zeros((k, 4), np.int64)
    for im, y in zip(ev_images, ev_labels):
      pred = method.predict(im)
      cm += np.asarray(metrics.confusion_matrix(pred, y, k, info.ignore_index), np.int64)
      bcounts += metrics.boundary_counts(pred, y, k, info.ignore_index)
    t2 = time.perf_counter()
    summary = metrics.summarize(cm)
    bf = metrics.boundary_summary(bcounts)
    table = metrics.format_table(summary, info.class_names)
    results[name] = {
        "method": name, "params": dict(params.get(name, {})), "train_split": train_split,
        "train_images": len(tr_images), "split": split, "images": len(ev_images),
        "metrics": {key: float(summary[key]) for key in
                    ("miou", "pixel_accuracy", "mean_accuracy", "fwiou", "mean_f1")},
        "mean_bf": float(bf["mean_bf"]),
        "per_class_iou": {n: (None if not np.isfinite(v) else float(v))
                          for n, v in zip(info.class_names, summary["iou"])},
        "confusion_matrix": cm.tolist(), "table": table,
        "fit_s": t1 - t0, "predict_s_per_image": (t2 - t1) / max(len(ev_images), 1),
    }
    if verbose:
      print(f"\n== {name}: fit on {len(tr_images)} '{train_split}' images in {t1 - t0:.1f}s, "
            f"{len(ev_images)} '{split}' images in {t2 - t1:.1f}s")
      print(table)
      print(f"{'boundary F1':<16}{100 * bf['mean_bf']:6.2f}")
  return results


def summary_table(results: dict) -> str:
  """One row per method: mIoU, pixel accuracy, mean accuracy, boundary F1 (%)."""
  lines = ["| method | mIoU | pixel acc | mean acc | boundary F1 |", "|---|---|---|---|---|"]
  for name, r in results.items():
    m = r["metrics"]
    lines.append(f"| {name} | {100 * m['miou']:.2f} | {100 * m['pixel_accuracy']:.2f} | "
                 f"{100 * m['mean_accuracy']:.2f} | {100 * r['mean_bf']:.2f} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jseg import classical
  from jseg.config import base_config

  config = _CONFIG.value if _CONFIG.value is not None else base_config()
  methods = classical.METHODS.names() if _METHOD.value == "all" else [
      m.strip() for m in _METHOD.value.split(",") if m.strip()]
  try:
    params = json.loads(_PARAMS.value) if _PARAMS.value else {}
  except json.JSONDecodeError as e:
    raise app.UsageError(f"--params is not valid JSON ({e}): {_PARAMS.value}") from None
  results = run_baselines(config, methods, _TRAIN_SPLIT.value, _SPLIT.value, params, _MAX_TRAIN.value)
  print("\n" + summary_table(results))
  if _OUTPUT.value:
    out = Path(_OUTPUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "table"}
                               for k, v in results.items()}, indent=2))
    print(f"Wrote {out}")


if __name__ == "__main__":
  app.run(main)
