"""Evaluate a trained run: ``python -m jseg.evaluate --workdir=runs/pspnet``.

Loads the best checkpoint (or ``--checkpoint=latest|STEP``), evaluates a split,
prints the per-class table and summary, and writes them as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional config file; default: the run's own config.json. Its model "
    "block must match the checkpoint's.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: config.data.eval_split).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default: <workdir>/eval_<split>_step<N>.json).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jseg import evaluation
  from jseg import runtime
  from jseg.writers import quiet_library_logs

  quiet_library_logs()
  runtime.enable_compilation_cache()  # re-evaluating a run skips compilation
  runtime.fix_mmap_threshold()
  runtime.install_block_cache()

  result = evaluation.evaluate_run(
      _WORKDIR.value, split=_SPLIT.value, which=_CHECKPOINT.value, config=_CONFIG.value)
  print(result["table"])
  out = Path(_OUTPUT.value or Path(_WORKDIR.value) / f"eval_{result['split']}_step{result['step']}.json")
  out.write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
  print(f"Wrote {out}")


if __name__ == "__main__":
  app.run(main)
