"""Predict masks: ``python -m jseg.predict --workdir=runs/pspnet --input=IMG_OR_DIR --output=DIR``.

Writes ``NAME.png`` (indexed PNG with the dataset palette) and
``NAME_overlay.png`` (image, overlay and mask side by side) per image.
"""

from __future__ import annotations

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_INPUT = flags.DEFINE_string("input", None, "An image file or a folder of images.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Folder for masks and overlays.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
_MC = flags.DEFINE_integer(
    "mc_samples", None, "Monte-Carlo dropout passes (writes entropy/variance maps); "
    "default 20 for bayesian_segnet runs, 0 otherwise.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jseg import prediction
  from jseg import runtime
  from jseg.writers import quiet_library_logs

  quiet_library_logs()
  runtime.enable_compilation_cache()  # re-running a prediction skips compilation
  runtime.fix_mmap_threshold()
  runtime.install_block_cache()

  written = prediction.predict_files(
      _WORKDIR.value, _INPUT.value, _OUTPUT.value, _CHECKPOINT.value, _OVERWRITE.value, _MC.value)
  print(f"Wrote {len(written)} mask(s) and overlay(s) to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
