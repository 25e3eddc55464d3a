"""Shared test fixtures: tiny configs on the shipped CamVid sample."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# One fresh XLA compilation cache per test session (shared with the CLI subprocesses
# the tests start), so tests never read or fill the user's ~/.cache/jseg/xla.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _XLA_CACHE = tempfile.mkdtemp(prefix="jseg_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tfds_cache(tmp_path_factory) -> str:
  """One tfds build cache for the whole test session."""
  return str(tmp_path_factory.mktemp("tfds_cache"))
