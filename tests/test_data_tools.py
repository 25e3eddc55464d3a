"""Dataset tools: statistics (hand-computed reference), show grid, bench data, CLI parsing."""

import json

import numpy as np
import pytest
from PIL import Image

from jseg.bench import data as bench_data
from jseg.config import REPO_ROOT
from jseg.data import cli, show, stats


def test_compute_stats_by_hand():
  records = [
      {"image": np.array([[[0, 10], [2, 10]], [[4, 10], [6, 10]]], np.uint8), "label": np.array([[0, 0], [1, 255]], np.uint8)},
      {"image": np.full((2, 2, 2), 8, np.uint8), "label": np.array([[1, 1], [1, 1]], np.uint8)},
  ]
  s = stats.compute_stats(records, num_classes=3)
  ch0 = np.array([0, 2, 4, 6, 8, 8, 8, 8], np.float64)
  np.testing.assert_allclose(s["mean"], [ch0.mean(), 9.0])
  np.testing.assert_allclose(s["std"], [ch0.std(), 1.0])
  assert s["class_pixels"] == [2, 5, 0] and s["ignored_pixels"] == 1
  # freq(0) = 2 / 4 (class 0 only in image 1), freq(1) = 5 / 8; median 0.5625; absent class -> 0
  np.testing.assert_allclose(s["median_frequency_weights"], [0.5625 / 0.5, 0.5625 / 0.625, 0.0])


def _isbi_args(tfds_cache):
  return ["--config.data.name=isbi2012", "--config.data.root=samples/isbi2012_membranes", f"--config.data.cache_dir={tfds_cache}"]


def test_stats_main_on_isbi_sample(tfds_cache, tmp_path):
  out = tmp_path / "stats.json"
  s = stats.main(_isbi_args(tfds_cache) + [f"--out={out}"])
  assert json.loads(out.read_text())["class_names"] == ["cell", "membrane"]
  pixels = np.concatenate([np.asarray(Image.open(REPO_ROOT / f"samples/isbi2012_membranes/image/{i}.png")).ravel() for i in (0, 8, 16)])
  np.testing.assert_allclose(s["mean"], [pixels.mean()], rtol=1e-9)
  labels = np.concatenate([np.asarray(Image.open(REPO_ROOT / f"samples/isbi2012_membranes/label/{i}.png")).ravel() for i in (0, 8, 16)])
  assert s["class_pixels"] == [int((labels == 255).sum()), int((labels == 0).sum())]


def test_show_writes_grid(tfds_cache, tmp_path):
  out = tmp_path / "grid.png"
  grid = show.main(_isbi_args(tfds_cache) + ["--config.data.crop_size=(32, 40)", "--n=3", f"--out={out}"])
  # 3 tiles of (image | 2 px gap | overlay) in 2 columns with 4 px gaps
  assert grid.shape == (2 * 32 + 4, 2 * 82 + 4, 3)
  assert np.asarray(Image.open(out)).shape == grid.shape


def test_bench_data_reports(tfds_cache, tmp_path):
  out = tmp_path / "bench.json"
  report = bench_data.main(_isbi_args(tfds_cache) + ["--batches=1", "--warmup=0", "--workers=0", "--batch_size=2", "--crop=64", f"--out={out}"])
  saved = json.loads(out.read_text())
  assert saved["results"][0]["images_per_s"] > 0 and saved["results"][0]["batch_shape"] == [2, 64, 64, 1]
  assert report["augmentation"]["blur"] is True


def test_cli_overrides_and_errors(tmp_path):
  file = tmp_path / "cfg.py"
  file.write_text("from jseg.config import base_config\n\ndef get_config():\n  c = base_config()\n  c.batch_size = 3\n  return c\n")
  config, opts = cli.parse_args(
      [f"--config={file}", "--config.data.crop_size=(64, 80)", "--config.data.root=elsewhere", "--n=3"], {"n": 8}, "usage"
  )
  assert config.batch_size == 3 and config.data.crop_size == (64, 80) and config.data.root == "elsewhere" and opts["n"] == 3
  with pytest.raises(SystemExit, match="Unknown option '--m'"):
    cli.parse_args(["--m=1"], {"n": 8}, "usage")
  with pytest.raises(SystemExit, match="no field 'dat'"):
    cli.parse_args(["--config.dat.root=x"], {}, "usage")
