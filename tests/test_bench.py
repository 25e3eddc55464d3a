"""Smoke test of ``python -m jseg.bench models``: one tiny model, one repeat.

Checks behaviour (the suite runs the real training step in a subprocess, writes
the JSON fields, and the torch twin has jseg's parameter count), never speed.
"""

import json

import pytest

from jseg.bench import models as bench_models


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench_models.json"
  rep = bench_models.main([
      "--models=unet", "--batch=2", "--size=32", "--infer_batch=1", "--warmup=1", "--repeats=1",
      "--infer_repeats=3", "--set=depth=2", "--set=width=4", "--peak_gflops=100", f"--out={out}"])
  return rep, json.loads(out.read_text())


def test_models_suite_writes_positive_measurements(report):
  rep, written = report
  assert written["settings"]["batch"] == 2 and written["settings"]["size"] == 32
  (row,) = written["results"]
  j = row["jseg"]
  assert "error" not in j, j.get("error")
  for field in ("params", "compile_s", "step_s", "train_images_per_s", "infer_ms_per_image",
                "train_gflops_per_image", "infer_gflops_per_image", "model_gflops_per_image",
                "infer_model_gflops_per_image", "peak_rss_mb", "mfu"):
    assert j[field] > 0, field
  assert j["model_config"]["width"] == 4 and j["model_config"]["num_classes"] == 11
  assert j["step_programs"] == 2 and written["settings"]["step_programs"] == 2  # the trainer's default
  assert j["infer_calls"] == 3 and written["settings"]["infer_repeats"] == 3
  # Training does more work than inference per image.
  assert j["train_gflops_per_image"] > j["infer_gflops_per_image"]
  assert rep["results"][0]["model"] == "unet"
  parts = j["after_train_rss_mb"]  # resident memory after training, by kind
  assert parts["anon"] > 0 and parts["file"] > 0
  assert parts["anon"] + parts["file"] <= j["train_peak_rss_mb"] + 1.0


def test_torch_twin_matches_parameter_count(report):
  pytest.importorskip("torch")
  _, written = report
  row = written["results"][0]
  t = row["torch"]
  assert "error" not in t, t.get("error")
  assert t["params"] == row["jseg"]["params"]
  assert t["train_images_per_s"] > 0 and t["infer_ms_per_image"] > 0
  assert t["infer_calls"] == 3  # as many timed inference calls as jseg's
  assert t["after_train_rss_mb"]["anon"] > 0 and t["after_train_rss_mb"]["file"] > 0
  assert row["ratio"]["train"] > 0 and row["ratio"]["infer"] > 0


def test_bad_names_are_reported():
  with pytest.raises(ValueError, match="No config for model 'nope'"):
    bench_models.bench_config("nope", 32, 2)
  with pytest.raises(ValueError, match="preset"):
    bench_models.bench_config("unet", 32, 2, preset="huge")
  with pytest.raises(ValueError, match="step_programs"):
    bench_models.bench_config("unet", 32, 2, step_programs=3)
  with pytest.raises(ValueError, match="no field 'nope'"):
    bench_models.bench_config("unet", 32, 2, overrides={"config.nope": 1})


def test_set_reaches_model_and_top_level_fields():
  c = bench_models.bench_config("unet", 32, 2, overrides={"width": 8, "config.seed": 7})
  assert c.model.width == 8 and c.seed == 7
  assert bench_models.bench_config("unet", 32, 2).seed != 7


@pytest.mark.slow
def test_step_as_one_program(tmp_path):
  assert not bench_models.bench_config("unet", 32, 2, step_programs=1).split_update
  rep = bench_models.main(["--models=unet", "--batch=2", "--size=32", "--warmup=1", "--repeats=1",
                           "--set=depth=2", "--set=width=4", "--peak_gflops=100", "--torch=no",
                           "--step_programs=1", f"--out={tmp_path / 'bench.json'}"])
  j = rep["results"][0]["jseg"]
  assert "error" not in j, j.get("error")
  assert j["step_programs"] == 1 and j["train_images_per_s"] > 0 and j["train_gflops_per_image"] > 0


@pytest.fixture
def torch_models(monkeypatch):
  """benchmarks/torch_models.py, imported as torch_bench.py does (its twin families beside it)."""
  pytest.importorskip("torch")
  import importlib
  monkeypatch.syspath_prepend(str(bench_models.REPO_ROOT / "benchmarks"))
  return importlib.import_module("torch_models")


def _param_counts(torch_models, name: str, preset: str, size: int = 64) -> tuple[int, int]:
  import jax
  import jax.numpy as jnp
  from jseg.models import build_model
  c = bench_models.bench_config(name, size, 1, preset=preset)
  model = build_model(c.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  jseg_params = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
  twin = torch_models.build(name, json.loads(c.model.to_json_best_effort()))
  return jseg_params, sum(p.numel() for p in twin.parameters())


@pytest.mark.parametrize("name", sorted(bench_models.PAPER_PRESETS))
def test_paper_preset_twins_match_parameter_count(name, torch_models):
  """The accelerator-sized networks (``--preset=paper``) have torch twins of the same size."""
  jseg_params, twin_params = _param_counts(torch_models, name, "paper")
  assert twin_params == jseg_params
  assert jseg_params > 5_000_000  # paper-sized, not the CPU preset


@pytest.mark.parametrize("name", sorted(bench_models.BENCH_PRESETS))
def test_every_bench_model_has_a_twin_of_its_size(name, torch_models):
  """Every network the CPU benchmark knows has a torch twin with jseg's parameter count."""
  assert name in torch_models.available()
  jseg_params, twin_params = _param_counts(torch_models, name, "bench", size=96)
  assert twin_params == jseg_params > 0
  assert torch_models.difference(name)


def test_unknown_twin_names_the_available_ones(torch_models):
  with pytest.raises(KeyError, match="No torch twin for model 'nope'. Available: unet, unetpp"):
    torch_models.build("nope", {"num_classes": 3})


def test_deadline_skips_the_models_not_started(tmp_path):
  out = tmp_path / "bench.json"
  bench_models.main(["--models=unet,pspnet", "--deadline_s=1e-9", "--peak_gflops=100", "--torch=no",
                     f"--out={out}"])
  written = json.loads(out.read_text())
  assert [r["model"] for r in written["results"]] == ["unet", "pspnet"]
  assert all("past --deadline_s" in r["skipped"] and "jseg" not in r for r in written["results"])


def test_median_result_over_rounds():
  rounds = [{"train_images_per_s": 10.0, "infer_ms_per_image": 5.0, "peak_rss_mb": 500.0, "params": 7},
            {"error": "exit 1: killed"},
            {"train_images_per_s": 14.0, "infer_ms_per_image": 3.0, "peak_rss_mb": 520.0, "params": 7},
            {"train_images_per_s": 12.0, "infer_ms_per_image": 9.0, "peak_rss_mb": 510.0, "params": 7}]
  m = bench_models.median_result(rounds)
  assert (m["train_images_per_s"], m["infer_ms_per_image"], m["peak_rss_mb"]) == (12.0, 5.0, 510.0)
  assert m["per_round"]["infer_ms_per_image"] == [5.0, 3.0, 9.0]
  assert m["rounds"] == 3 and m["failed_rounds"] == ["exit 1: killed"] and m["params"] == 7
  assert bench_models.median_result(rounds[:1]) == rounds[0]  # one round: as measured
  assert bench_models.median_result([{"error": "x"}, {"error": "y"}]) == {"error": "x"}


@pytest.mark.slow
def test_rounds_alternate_processes_and_keep_each_round(tmp_path):
  out = tmp_path / "bench.json"
  rep = bench_models.main(["--models=unet", "--batch=2", "--size=32", "--warmup=1", "--repeats=1",
                           "--set=depth=2", "--set=width=4", "--peak_gflops=100", "--torch=no",
                           "--rounds=2", f"--out={out}"])
  j = rep["results"][0]["jseg"]
  assert j["rounds"] == 2 and len(j["per_round"]["train_images_per_s"]) == 2
  assert json.loads(out.read_text())["settings"]["rounds"] == 2


def test_peak_probes_report_positive_rates(monkeypatch):
  """The matmul probe always measures; the convolution probe only where jseg's
  convolutions are oneDNN's (None under ``JSEG_CONV=xla``)."""
  from jseg.models import conv
  assert bench_models.measure_peak_jax(128, repeats=2, min_s=0.0) > 0
  rate = bench_models.measure_peak_conv(repeats=1, min_s=0.0)
  assert (rate is not None and rate > 0) == conv.onednn_active()
  monkeypatch.setenv("JSEG_CONV", "xla")
  assert bench_models.measure_peak_conv(repeats=1, min_s=0.0) is None


def test_isa_caps_are_recorded_only_when_set():
  """A run capped to AVX2 on an AVX-512 machine says so in its JSON; an uncapped run
  records nothing."""
  assert bench_models._isa_caps({"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true"}) == {}
  caps = bench_models._isa_caps({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                 "XLA_FLAGS": "--foo=1 --xla_cpu_max_isa=AVX2", "HOME": "/x"})
  assert caps == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                  "xla_cpu_max_isa": "AVX2"}


def test_table_shows_the_file_backed_memory_after_training(capsys):
  base = {"params": 10, "model_gflops_per_image": 1.0, "compile_s": 2.0, "train_images_per_s": 3.0,
          "infer_ms_per_image": 4.0, "mfu": 0.1, "peak_rss_mb": 500.0, "train_peak_rss_mb": 490.0}
  rows = [{"model": "refinenet",
           "jseg": dict(base, after_train_rss_mb={"anon": 356.2, "file": 162.7, "shmem": 0.0}),
           "torch": dict(base)}]  # a result from before the field: shown as "-"
  bench_models.print_table(rows)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split()[-2:] == ["code", "MB"]
  jseg_line = next(x for x in lines if x.split()[:2] == ["refinenet", "jseg"])
  torch_line = next(x for x in lines if x.split()[:2] == ["refinenet", "torch"])
  assert jseg_line.split()[-3:] == ["500", "490", "163"]
  assert torch_line.split()[-1] == "-"
