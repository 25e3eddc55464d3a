"""End-to-end training on the shipped CamVid sample: logs, checkpoints, resume,
determinism, bad configs, evaluation and prediction."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jseg import checkpoint as ckpt_lib
from jseg import data, evaluation, prediction, trainer
from jseg.writers import read_metrics
from tiny import tiny_pspnet_config

REPO = Path(__file__).resolve().parent.parent
TOTAL = 12


def _config(cache: str, **kw):
  """The reference run: SGDR with 6-step cycles, so it also leaves two snapshots."""
  return tiny_pspnet_config(cache, total_steps=TOTAL, eval_every=6, checkpoint_every=2,
                            **{"schedule.name": "sgdr", "schedule.cycle_steps": 6}, **kw)


def _final_params(workdir: Path) -> list[np.ndarray]:
  run = ckpt_lib.load_run(workdir, "latest")
  assert run.step == TOTAL
  return [np.asarray(x) for x in jax.tree.leaves(run.variables)]


RELEASES: list[bool] = []  # the reference run's SplitStep.release calls: was a buffer kept?
PRECOMPILED: list[tuple[trainer.SplitStep, bool]] = []  # (step, was its state abstract?)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_cache):
  workdir = tmp_path_factory.mktemp("runs") / "reference"
  release, precompile = trainer.SplitStep.release, trainer.SplitStep.precompile

  def spy(self):
    if not self._compiled:  # the object that holds the buffers (a precompiled step's executable)
      RELEASES.append(self._spare is not None)
    release(self)

  def precompile_spy(self, state, batch, rng):
    PRECOMPILED.append((self, all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))))
    precompile(self, state, batch, rng)

  trainer.SplitStep.release, trainer.SplitStep.precompile = spy, precompile_spy
  try:
    summary = trainer.train_and_evaluate(_config(tfds_cache), workdir)
  finally:
    trainer.SplitStep.release, trainer.SplitStep.precompile = release, precompile
  return workdir, summary, _final_params(workdir)


def test_a_fresh_run_compiles_its_step_before_the_state_exists(trained):
  # once, from the abstract state; every step then ran that executable (the jitted
  # gradient program never compiled on a call)
  assert [abstract for _, abstract in PRECOMPILED] == [True]
  step = PRECOMPILED[0][0]
  assert len(step._compiled) == 1 and step.grads_fn._cache_size() == 0


def test_kept_gradients_are_dropped_before_each_evaluation_and_save(trained):
  # checkpoints every 2 steps (evaluations at 6 and 12 among them): steps 2, 4, ..., 12
  assert RELEASES == [True] * (TOTAL // 2)


def test_run_writes_config_logs_checkpoints(trained):
  workdir, summary, _ = trained
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["name"] == "pspnet" and saved["total_steps"] == TOTAL
  events = read_metrics(workdir)
  train_steps = [e["step"] for e in events if e["split"] == "train"]
  eval_events = [e for e in events if e["split"] == "eval"]
  assert train_steps == list(range(1, TOTAL + 1))
  assert [e["step"] for e in eval_events] == [6, 12]
  for key in ("pixel_accuracy", "mean_accuracy", "miou", "fwiou", "iou/Sky"):
    assert key in eval_events[-1]
  assert all(np.isfinite(e["loss"]) and e["learning_rate"] > 0 for e in events if e["split"] == "train")
  steps = ckpt_lib.Checkpointer(workdir, read_only=True).steps()
  assert steps[-1] == TOTAL and len(steps) >= 3  # keep 3 latest (+ best)
  assert 0.0 <= summary["miou"] <= 1.0
  # SGDR cycle ends (steps 6 and 12) are kept as snapshots outside the rotation.
  assert sorted(p.name for p in (workdir / "snapshots").iterdir()) == ["cycle_end_12", "cycle_end_6"]
  snap = ckpt_lib.load_run(workdir, "snapshot:6")
  assert snap.step == 6


def _config_file(tmp_path: Path, cache: str) -> Path:
  f = tmp_path / "tiny_config.py"
  f.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
      "from test_train import _config\n\n"
      "def get_config():\n"
      f"  return _config({cache!r})\n")
  return f


@pytest.mark.slow
def test_killed_run_resumes_to_identical_parameters(trained, tmp_path, tfds_cache):
  """Kill -9 mid-run, rerun the same command: the final parameters are bitwise those
  of the uninterrupted in-process reference run (also shows same seed -> same run
  across processes)."""
  _, _, reference = trained
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "jseg.train", f"--config={_config_file(tmp_path, tfds_cache)}",
         f"--workdir={workdir}"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while not (workdir / "checkpoints" / "4").is_dir():
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.time() < deadline, "no checkpoint at step 4 within 240 s"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = ckpt_lib.Checkpointer(workdir, read_only=True).latest_step()
  assert killed_at < TOTAL, "the run finished before it could be interrupted"

  resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from step {killed_at}" in resumed.stdout
  assert "mIoU" in resumed.stdout  # the evaluation table is printed at the end
  final = _final_params(workdir)
  for a, b in zip(final, reference):
    np.testing.assert_array_equal(a, b)


def test_incompatible_config_is_refused(trained, tmp_path, tfds_cache):
  workdir, _, _ = trained
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  with pytest.raises(ValueError, match=r"model\.width: checkpoint has 8, config has 16"):
    trainer.train_and_evaluate(_config(tfds_cache, **{"model.width": 16}), copy)
  # Nothing was moved or deleted.
  assert sorted(os.listdir(copy / "checkpoints")) == sorted(os.listdir(workdir / "checkpoints"))


def test_corrupt_latest_checkpoint_falls_back(trained, tmp_path, tfds_cache):
  workdir, _, reference = trained
  copy = tmp_path / "corrupt"
  shutil.copytree(workdir, copy)
  state_dir = copy / "checkpoints" / str(TOTAL) / "state"
  for f in state_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"\0garbage" * 8)
  trainer.train_and_evaluate(_config(tfds_cache), copy)
  moved = list((copy / "corrupt").iterdir())
  assert len(moved) == 1 and moved[0].name.startswith(f"step_{TOTAL}_")
  for a, b in zip(_final_params(copy), reference):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step(tmp_path, tfds_cache):
  config = _config(tfds_cache, **{"optimizer.learning_rate": 1e12, "loss.aux_weight": 0.0})
  with pytest.raises(FloatingPointError, match=r"Non-finite loss .* at step \d+"):
    trainer.train_and_evaluate(config, tmp_path / "nan")


def test_evaluate_run_reports_metrics(trained):
  workdir, summary, _ = trained
  result = evaluation.evaluate_run(workdir, which="latest")
  assert result["step"] == TOTAL and result["split"] == "val"
  assert result["metrics"]["miou"] == pytest.approx(float(summary["miou"]), abs=1e-6)
  assert "Sky" in result["per_class"]["iou"]
  assert "mIoU" in result["table"] or "miou" in result["table"].lower()


def test_predict_writes_palette_masks_and_overlays(trained, tmp_path):
  workdir, _, _ = trained
  inputs = REPO / "samples" / "camvid" / "test"
  written = prediction.predict_files(workdir, inputs, tmp_path / "pred")
  assert len(written) == len(list(inputs.glob("*.png"))) > 0
  mask = Image.open(written[0])
  assert mask.mode == "P" and mask.size == (480, 360)
  assert np.asarray(mask).max() < 11
  overlay = Image.open(tmp_path / "pred" / f"{written[0].stem}_overlay.png")
  assert overlay.size[1] == 360 and overlay.size[0] > 3 * 480
  with pytest.raises(FileExistsError, match="already exist"):
    prediction.predict_files(workdir, inputs, tmp_path / "pred")


def test_predict_bad_inputs(trained, tmp_path):
  workdir, _, _ = trained
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prediction.predict_files(workdir, tmp_path / "nope", tmp_path / "out")
  empty = tmp_path / "empty_run"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    prediction.predict_files(empty, REPO / "samples" / "camvid" / "test", tmp_path / "out2")


def test_evaluate_with_sliding_window_inference(trained):
  workdir, _, _ = trained
  config = ckpt_lib.config_from_workdir(workdir)
  config.inference.mode = "slide"
  config.inference.crop_size = (128, 128)
  config.inference.stride = (96, 96)
  config.inference.batch_size = 4
  result = evaluation.evaluate_run(workdir, split="test", which="latest", config=config)
  assert 0.0 <= result["metrics"]["miou"] <= 1.0
  source = data.make_eval_source(config, "test")
  labelled = sum(int((source[i]["label"] != 255).sum()) for i in range(len(source)))
  assert np.asarray(result["confusion_matrix"]).sum() == labelled > 0


def test_pretrained_backbone_is_loaded_before_training(tmp_path, tfds_cache):
  from safetensors.numpy import save_file

  from test_pretrained import _fake_resnet_sd

  sd = _fake_resnet_sd((2, 2, 2, 2), False, width=8)
  save_file(sd, str(tmp_path / "r18.safetensors"))
  config = tiny_pspnet_config(tfds_cache, **{"model.pretrained": str(tmp_path / "r18.safetensors")})
  run = trainer.setup(config)
  state = trainer.with_pretrained(run.state, config, run.mesh)
  np.testing.assert_array_equal(
      np.asarray(state.params["backbone"]["layer2_0"]["conv1"]["kernel"]),
      sd["layer2.0.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      np.asarray(state.batch_stats["backbone"]["bn1"]["var"]), sd["bn1.running_var"])
  momentum = jax.tree.leaves(state.opt_state)
  assert all(np.all(np.asarray(m) == 0) for m in momentum if np.ndim(m) > 0)
  with pytest.raises(FileNotFoundError, match="model.pretrained"):
    trainer.with_pretrained(run.state, tiny_pspnet_config(
        tfds_cache, **{"model.pretrained": str(tmp_path / "missing.pth")}), run.mesh)


@pytest.mark.slow
def test_predict_bayesian_segnet_writes_uncertainty_maps(tmp_path, tfds_cache):
  from jseg.config import load_config

  config = load_config("configs/bayesian_segnet.py")
  config.model.width = 2
  config.data.cache_dir, config.data.crop_size, config.batch_size = tfds_cache, (64, 64), 2
  config.total_steps = config.eval_every = config.checkpoint_every = config.log_every = 1
  config.inference.mc_samples = 4
  trainer.train_and_evaluate(config, tmp_path / "bayes")
  image = REPO / "samples" / "camvid" / "test" / "Seq05VD_f00000.png"
  prediction.predict_files(tmp_path / "bayes", image, tmp_path / "pred")
  entropy = np.asarray(Image.open(tmp_path / "pred" / "Seq05VD_f00000_entropy.png"))
  assert entropy.shape == (360, 480) and entropy.max() > 0
  maps = np.load(tmp_path / "pred" / "Seq05VD_f00000_uncertainty.npz")
  assert maps["variance"].shape == (360, 480, 11)
  assert float(maps["variance"].astype(np.float32).max()) > 0  # dropout makes passes differ


def test_mc_dropout_refused_for_networks_without_it(trained, tmp_path):
  workdir, _, _ = trained
  image = REPO / "samples" / "camvid" / "test" / "Seq05VD_f00000.png"
  with pytest.raises(ValueError, match="SegNet-family"):
    prediction.predict_files(workdir, image, tmp_path / "pred", mc_samples=2)
