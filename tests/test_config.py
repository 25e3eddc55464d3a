"""Config helpers: base fields, loading by path, clear errors."""

import pytest

from jseg.config import base_config, load_config, resolve_path


def test_base_config_has_the_shared_fields():
  c = base_config()
  for field in ("seed", "batch_size", "total_steps", "eval_every", "checkpoint_every", "log_every"):
    assert field in c
  assert c.data.ignore_index == 255 and c.inference.mode == "whole"


def test_load_config_by_relative_path_and_errors(tmp_path):
  assert load_config("configs/pspnet.py").model.name == "pspnet"
  with pytest.raises(FileNotFoundError, match="nope.py"):
    load_config(str(tmp_path / "nope.py"))
  bad = tmp_path / "bad.py"
  bad.write_text("x = 1\n")
  with pytest.raises(AttributeError, match="no get_config"):
    load_config(str(bad))


def test_resolve_path_falls_back_to_the_repo_root():
  assert resolve_path("samples/camvid").is_dir()
