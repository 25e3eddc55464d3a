"""Evaluate an ensemble: ``python -m jseg.ensemble --workdirs=runs/a,runs/b,runs/c`` or
``python -m jseg.ensemble --snapshots=runs/sgdr`` (the SGDR cycle-end snapshots of one run).

Every member predicts each image of ``--split`` through ``jseg.inference``
(``config.inference`` of ``--config``, default the first member's config);
the rules of ``jseg.ensembles`` (``--rules``, default
``average,weighted,majority,plurality``; add ``stacking``) combine the
probabilities, and the per-member and per-rule metric tables are printed and
written as JSON. ``weighted`` uses ``--weights`` or, when absent, weights from
each member's mIoU on ``--fit_split``; ``stacking`` fits its meta-learner on
``--fit_split``: both must be held out from training and from ``--split``.
``majority`` is scored on the pixels it accepts; its reject rate is printed.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config for data and inference settings (default: the first member's).")
_WORKDIRS = flags.DEFINE_list("workdirs", [], "Comma-separated workdirs of the member runs.")
_SNAPSHOTS = flags.DEFINE_string("snapshots", None, "A workdir whose SGDR cycle-end snapshots are the members.")
_LAST = flags.DEFINE_integer("last", 0, "With --snapshots: use only the last N snapshots (0 = all).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "Checkpoint of each --workdirs member: best, latest, STEP.")
_RULES = flags.DEFINE_list("rules", ["average", "weighted", "majority", "plurality"], "Ensemble rules.")
_WEIGHTS = flags.DEFINE_list("weights", [], "Weights for 'weighted', one per member (default: fit-split mIoU).")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: config.data.eval_split).")
_FIT_SPLIT = flags.DEFINE_string("fit_split", None, "Held-out split for stacking / mIoU weights "
                                 "(default: 'val' when --split is another split, else required).")
_STACKER = flags.DEFINE_enum("stacker", "logreg", ["logreg", "conv1x1"], "Stacking meta-learner.")
_MAX_FIT_PIXELS = flags.DEFINE_integer("max_fit_pixels", 200_000, "Pixels sampled to fit the stacker.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default: ensemble_<split>.json in the first workdir).")


def snapshot_dirs(workdir: str | Path) -> list[tuple[int, Path]]:
  """``(step, folder)`` of the SGDR cycle-end snapshots the trainer saved in
  ``<workdir>/snapshots/cycle_end_<step>``, oldest first."""
  root = Path(workdir) / "snapshots"
  found = []
  for d in root.glob("cycle_end_*"):
    m = re.fullmatch(r"cycle_end_(\d+)", d.name)
    if m and d.is_dir():
      found.append((int(m.group(1)), d))
  if not found:
    raise FileNotFoundError(
        f"No SGDR snapshots in {root}: train with schedule.name='sgdr' (the trainer saves one "
        "at the end of every cycle).")
  return sorted(found)


def load_snapshot(workdir: str | Path, snapshot: Path) -> tuple[Any, Any, dict]:
  """``(config, model, variables)`` of one SGDR cycle-end snapshot folder."""
  from jseg import checkpoint as ckpt_lib

  step = int(Path(snapshot).name.rsplit("_", 1)[1])
  run = ckpt_lib.load_run(workdir, f"snapshot:{step}")
  return run.config, run.model, run.variables


def load_members() -> tuple[list[str], list[Any], list[Any]]:
  """Names, configs and apply functions of the members named by the flags."""
  from jseg import checkpoint as ckpt_lib
  from jseg import compiling, inference

  names, configs, fns = [], [], []
  if _SNAPSHOTS.value:
    if _WORKDIRS.value:
      raise app.UsageError("Give --workdirs or --snapshots, not both.")
    snaps = snapshot_dirs(_SNAPSHOTS.value)
    if _LAST.value:
      snaps = snaps[-_LAST.value:]
    for step, d in snaps:
      config, model, variables = load_snapshot(_SNAPSHOTS.value, d)
      names.append(f"{Path(_SNAPSHOTS.value).name}@{step}")
      configs.append(config)
      fns.append(inference.make_apply_fn(
          model, variables, compiling.fusion_emitter_options(config, "eval_fusion_emitters")))
  else:
    if len(_WORKDIRS.value) < 2:
      raise app.UsageError(f"--workdirs needs at least two runs; got {_WORKDIRS.value}.")
    for w in _WORKDIRS.value:
      run = ckpt_lib.load_run(w, _CHECKPOINT.value)
      names.append(f"{Path(w).name}@{run.step}")
      configs.append(run.config)
      fns.append(inference.make_apply_fn(
          run.model, run.variables,
          compiling.fusion_emitter_options(run.config, "eval_fusion_emitters")))
  return names, configs, fns


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import numpy as np

  from jseg import data as data_lib
  from jseg import ensembles, metrics

  names, configs, fns = load_members()
  config = _CONFIG.value if _CONFIG.value is not None else configs[0]
  info = data_lib.get_info(config.data)
  for n, c in zip(names, configs):
    if c.data.name != config.data.name or c.model.num_classes != info.num_classes:
      raise ValueError(f"Member {n} was trained on '{c.data.name}' with {c.model.num_classes} classes; "
                       f"the ensemble evaluates '{config.data.name}' with {info.num_classes}.")
  split = _SPLIT.value or config.data.eval_split
  rules = list(_RULES.value)
  weights = [float(w) for w in _WEIGHTS.value] or None
  fit_split = _FIT_SPLIT.value
  if fit_split is None and ("stacking" in rules or ("weighted" in rules and weights is None)):
    if split == "val":
      raise app.UsageError("Rules 'stacking'/'weighted' need --fit_split, a held-out split other than --split.")
    fit_split = "val"
  if fit_split is not None and fit_split == split:
    warnings.warn(f"--fit_split={fit_split} equals --split: stacking/weights are fit on the evaluation "
                  "pixels, so their scores are optimistic (overfitting).", ensembles.StackingOverfitWarning)
  if fit_split is not None and fit_split == config.data.train_split:
    warnings.warn(f"--fit_split={fit_split} is the members' training split: their probabilities there are "
                  "overconfident, and the meta-learner will trust them too much.",
                  ensembles.StackingOverfitWarning)
  infer_cfg = config.get("inference", None)
  res = ensembles.evaluate_ensemble(
      fns, data_lib.make_eval_source(config, split), info.num_classes, info.ignore_index, rules,
      infer_cfg, data_lib.make_eval_source(config, fit_split) if fit_split else None, weights,
      _STACKER.value, _MAX_FIT_PIXELS.value, int(config.get("seed", 0)))
  rows = [(n, cm) for n, cm in zip(names, res["members"])] + list(res["rules"].items())
  report = {"split": split, "fit_split": fit_split, "members": names, "weights": res["weights"],
            "fit_member_miou": res.get("fit_member_miou"), "reject_rate": res.get("reject_rate"),
            "stacking": res.get("stacking"), "results": {}}
  lines = ["| model / rule | mIoU | pixel acc | mean acc |", "|---|---|---|---|"]
  for n, cm in rows:
    s = metrics.summarize(cm)
    print(f"\n== {n} on '{split}'" + (f" (reject rate {100 * res['reject_rate']:.2f}%)" if n == "majority" else ""))
    print(metrics.format_table(s, info.class_names))
    report["results"][n] = {"miou": float(s["miou"]), "pixel_accuracy": float(s["pixel_accuracy"]),
                            "mean_accuracy": float(s["mean_accuracy"]),
                            "confusion_matrix": np.asarray(cm).tolist()}
    lines.append(f"| {n} | {100 * s['miou']:.2f} | {100 * s['pixel_accuracy']:.2f} | {100 * s['mean_accuracy']:.2f} |")
  print("\n" + "\n".join(lines))
  if "stacking" in res:
    st = res["stacking"]
    print(f"stacking ({st['method']}, {st['fit_pixels']} pixels of '{fit_split}'): pixel accuracy "
          f"{100 * st['fit_accuracy']:.2f}% on its fit pixels vs {100 * st['eval_accuracy']:.2f}% on '{split}'.")
  first = Path(_SNAPSHOTS.value or _WORKDIRS.value[0])
  out = Path(_OUTPUT.value or first / f"ensemble_{split}.json")
  out.write_text(json.dumps(report, indent=2))
  print(f"Wrote {out}")


if __name__ == "__main__":
  app.run(main)
