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

# Tests compile with XLA's backend (LLVM) optimisation level 0: the same HLO programs, ops and
# custom calls, unoptimised machine code. Compilation is most of a test's time here; this cut
# the suite's CPU time by ~15-20% (2-core CPU, 2026-11-30: 7:38 -> 6:19 wall). The suite also
# passes at the default level: run it with JSEG_TEST_XLA_OPT=default. Benchmarks and users'
# runs never see this (it is set for the test processes and the CLIs they start).
if os.environ.get("JSEG_TEST_XLA_OPT", "0") != "default":
  _flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()


@pytest.fixture(scope="session")
def tfds_cache(tmp_path_factory) -> str:
  """One tfds build cache for the whole test session."""
  return str(tmp_path_factory.mktemp("tfds_cache"))
