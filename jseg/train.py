"""Train a segmentation network: ``python -m jseg.train --config=configs/pspnet.py``.

Any config field can be overridden (``--config.batch_size=4``). Re-running the
same command with the same ``--workdir`` resumes from its latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs and the resolved config go "
    "(default: runs/<config file name>).")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jseg import trainer  # after flag parsing, so --help is fast
  from jseg.models.conv import conv_backend_summary
  from jseg.losses import loss_backend_summary
  from jseg.models.norm import bn_backend_summary
  from jseg.writers import quiet_library_logs

  quiet_library_logs()

  workdir = _WORKDIR.value or str(Path("runs") / Path(flags.FLAGS["config"].config_filename).stem)
  print(f"workdir: {workdir}", flush=True)
  print(f"convolutions: {conv_backend_summary()}", flush=True)
  print(f"BatchNorm (training): {bn_backend_summary()}", flush=True)
  print(f"loss end (training): {loss_backend_summary()}", flush=True)
  trainer.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == "__main__":
  app.run(main)
