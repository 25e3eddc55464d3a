"""Checkpoints: everything that defines a run, saved with orbax.

A checkpoint at step ``s`` holds three items:
  - ``state``: the ``TrainState`` (params, batch_stats, optimiser state, step);
  - ``data``: the data iterator's position (JSON), so a resumed run sees the
    batch it would have seen;
  - ``meta``: the run's base RNG key, the model config and the step (JSON), used
    to refuse resuming with an incompatible config.
The manager keeps the newest ``keep`` checkpoints plus the best one by
validation mIoU. An unreadable checkpoint is reported and moved aside to
``<workdir>/corrupt/`` (never deleted); the previous one is used instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

ITEMS = ("state", "data", "meta")


def _ocp() -> Any:
  """orbax.checkpoint, imported when a checkpoint is first opened: with tensorstore it
  adds ~20-30 MB to a process, which one that never saves (the model benchmark,
  prediction from a loaded model) should not carry."""
  import orbax.checkpoint as ocp

  return ocp


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data: dict
  meta: dict


class Checkpointer:
  """Saves and restores run checkpoints under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.workdir = Path(workdir).absolute()  # orbax needs absolute paths
    self.directory = self.workdir / "checkpoints"
    self.keep = keep
    self._async = async_save
    self._read_only = read_only
    self._open()

  def _open(self) -> None:
    from orbax.checkpoint import checkpoint_managers as cm

    ocp = _ocp()
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=self.keep),
        cm.BestN(get_metric_fn=lambda m: m["miou"], n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=self._async,
        create=not self._read_only,
        read_only=self._read_only,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state: Any, data: dict, meta: dict, metrics: dict | None = None) -> None:
    """Saves asynchronously; ``metrics`` (with ``miou``) ranks it for best-keeping."""
    ocp = _ocp()
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        meta=ocp.args.JsonSave(meta),
    )
    self.manager.save(step, args=args, metrics=metrics, force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def restore(self, step: int, abstract_state: Any) -> Restored:
    """Restores ``step`` into the structure, shapes and shardings of ``abstract_state``."""
    ocp = _ocp()
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    )
    out = self.manager.restore(step, args=args)
    return Restored(step=step, state=out["state"], data=dict(out["data"]), meta=dict(out["meta"]))

  def read_meta(self, step: int) -> dict:
    """Reads only the ``meta`` item of a checkpoint (cheap; used before restoring)."""
    ocp = _ocp()
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """Restores the newest readable checkpoint; unreadable ones are moved aside.

    Returns None when the workdir holds no checkpoint.
    """
    for step in reversed(self.steps()):
      try:
        return self.restore(step, abstract_state)
      except Exception as e:  # orbax raises many types for damaged files.
        moved = self._move_aside(step)
        logging.warning(
            "Checkpoint at step %d could not be read (%s: %s). Moved it to %s and "
            "trying the previous one.", step, type(e).__name__, str(e)[:300], moved,
        )
        print(f"WARNING: checkpoint step {step} is unreadable ({type(e).__name__}); "
              f"moved to {moved}; using the previous checkpoint.", flush=True)
    return None

  def _move_aside(self, step: int) -> Path:
    src = self.directory / str(step)
    dst = self.workdir / "corrupt" / f"step_{step}_{int(time.time())}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.exists():
      shutil.move(str(src), str(dst))
    # Re-open so the manager forgets the moved step.
    self.manager.close()
    self._open()
    return dst


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def config_from_workdir(workdir: str | Path) -> ml_collections.ConfigDict:
  """Reads the resolved ``config.json`` a training run wrote into its workdir."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"No config.json in workdir '{workdir}'. Is it the --workdir of a jseg.train run?"
    )
  return ml_collections.ConfigDict(_lists_to_tuples(json.loads(path.read_text())))


def _lists_to_tuples(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _lists_to_tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_lists_to_tuples(v) for v in x)
  return x


def incompatibilities(saved_model: dict, model: dict, path: str = "model") -> list[str]:
  """Lists the fields where two model configs differ, as ``path: saved -> new``."""
  out = []
  for key in sorted(set(saved_model) | set(model)):
    a, b = saved_model.get(key, "<missing>"), model.get(key, "<missing>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += incompatibilities(a, b, f"{path}.{key}")
    elif _lists_to_tuples(a) != _lists_to_tuples(b):
      out.append(f"{path}.{key}: checkpoint has {a!r}, config has {b!r}")
  return out


@dataclasses.dataclass
class LoadedRun:
  config: ml_collections.ConfigDict
  model: Any
  variables: dict
  step: int


def load_for_inference(workdir: str | Path, which: str | int = "best") -> tuple[
    ml_collections.ConfigDict, Any, dict]:
  """Loads a trained run for prediction: ``(config, model, variables)``; see ``load_run``."""
  run = load_run(workdir, which)
  return run.config, run.model, run.variables


def load_run(workdir: str | Path, which: str | int = "best",
             config: ml_collections.ConfigDict | None = None) -> LoadedRun:
  """Loads a trained run's model and evaluation weights from its workdir.

  ``which`` is ``"best"`` (highest validation mIoU; the latest when no
  evaluation was saved), ``"latest"``, a step number, or ``"snapshot:<step>"``
  (an SGDR cycle-end snapshot in ``<workdir>/snapshots/``). ``config`` replaces the
  run's own ``config.json`` (e.g. other data or inference settings) and must
  have the same model block. Evaluation weights are the Lookahead slow weights
  or the EMA when the optimiser kept them.
  """
  from jseg import optim, trainer  # trainer imports this module

  workdir = Path(workdir)
  saved = config_from_workdir(workdir)
  if config is not None:
    problems = incompatibilities(json.loads(saved.model.to_json_best_effort()),
                                 json.loads(config.model.to_json_best_effort()))
    if problems:
      raise ValueError(f"--config does not match the run in '{workdir}': " + "; ".join(problems))
  else:
    config = saved
  ck_root = workdir
  if isinstance(which, str) and which.startswith("snapshot:"):
    ck_root = workdir / "snapshots" / f"cycle_end_{which.split(':', 1)[1]}"
    which = "latest"
  if not (ck_root / "checkpoints").is_dir():
    raise FileNotFoundError(f"'{ck_root}' has no checkpoints/ folder: train first.")
  ck = Checkpointer(ck_root, keep=config.get("keep_checkpoints", 3), read_only=True)
  try:
    steps = ck.steps()
    if not steps:
      raise FileNotFoundError(f"'{ck_root}' holds no checkpoints: train first.")
    if which == "best":
      step = ck.best_step() or ck.latest_step()
    elif which == "latest":
      step = ck.latest_step()
    else:
      try:
        step = int(which)
      except ValueError:
        raise ValueError(f"Checkpoint must be 'best', 'latest' or a step number; got {which!r}.") from None
      if step not in steps:
        raise ValueError(f"No checkpoint at step {step} in '{workdir}'; available: {steps}.")
    run = trainer.setup(config)
    try:
      state = ck.restore(step, run.abstract_state()).state
    except Exception as e:
      raise RuntimeError(
          f"Checkpoint step {step} in {ck.directory} could not be read: {e}") from e
  finally:
    ck.close()
  params = optim.eval_params(state.params, state.opt_state, config)
  return LoadedRun(config, run.model, trainer.variables(params, state.batch_stats), step)
