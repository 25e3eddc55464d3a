"""Evaluating a saved run on a split: the library side of ``jseg.evaluate``."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np

from jseg import checkpoint as ckpt_lib
from jseg import data as data_lib
from jseg import metrics, parallel
from jseg.trainer import Evaluator, summary_for_log


def evaluate_run(workdir: str | Path, split: str | None = None, which: str | int = "best",
                 config: ml_collections.ConfigDict | None = None) -> dict:
  """Evaluates checkpoint ``which`` of ``workdir`` on ``split``.

  Returns ``{"split", "step", "metrics" (scalars and per-class IoU by name),
  "per_class" (every per-class array by class name), "confusion_matrix", "table"}``.
  """
  run = ckpt_lib.load_run(workdir, which, config)
  config = run.config
  split = split or config.data.eval_split
  info = data_lib.get_info(config.data)
  mesh = parallel.create_mesh()
  evaluator = Evaluator(config, run.model, mesh, info)
  source = data_lib.make_eval_source(config, split)
  cm = evaluator.confusion(run.variables, source)
  summary = metrics.summarize(cm)
  per_class = {}
  for key, value in summary.items():
    arr = np.asarray(value)
    if arr.ndim == 1 and len(arr) == info.num_classes:
      per_class[key] = {n: (None if not np.isfinite(v) else float(v))
                        for n, v in zip(info.class_names, arr)}
  return {
      "workdir": str(workdir),
      "split": split,
      "step": run.step,
      "num_images": len(source),
      "metrics": summary_for_log(summary, info.class_names),
      "per_class": per_class,
      "confusion_matrix": np.asarray(cm).tolist(),
      "table": metrics.format_table(summary, info.class_names),
      "process_count": jax.process_count(),
  }
