"""Shared test fixtures: tiny configs on the shipped CamVid sample."""

from __future__ import annotations

import atexit
import collections
import gc
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

# Tests compile with XLA's backend (LLVM) optimisation level 0 and its classic (non-MLIR)
# fusion emitters: the same HLO programs, ops and custom calls, cheaper-to-make machine code.
# Compilation is most of a test's time here. Level 0 cut the suite's CPU time by ~15-20%
# (2-core CPU, 2026-11-30: 7:38 -> 6:19 wall); the classic emitters cut a tiny DeepLab v3+
# training step's compile 7.3 -> 4.8 s (AVX2 EPYC, 2026-12-01). The suite also passes with
# XLA's defaults: run it with JSEG_TEST_XLA_OPT=default. Benchmarks and users' runs never see
# this (it is set for the test processes and the CLIs they start).
if os.environ.get("JSEG_TEST_XLA_OPT", "0") != "default":
  _flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
  if "xla_cpu_use_fusion_emitters" not in _flags:
    _flags += " --xla_cpu_use_fusion_emitters=false"
  os.environ["XLA_FLAGS"] = _flags.strip()

# Tracing makes many short-lived objects over a large, long-lived heap (jax, flax, torch):
# Python's default collector thresholds spent ~6% of the suite's CPU in gc (perf, 2026-12-01).
# Modules loaded so far are frozen out of collection and full collections made rarer.
gc.freeze()
gc.set_threshold(100_000, 50, 1000)


def pytest_configure(config):
  """Under xdist (``-n``) with no ``--dist`` given, tests go to the workers a whole module at a
  time (``loadscope``), in the order made below: a module-scoped fixture (a trained run, a
  compiled benchmark) is then built once, where plain ``load`` built it on each worker, and
  again whenever a worker came back to its module (the trained PSPNet run: ~20 s each time).
  (``loadgroup`` cannot do it here: xdist 3.8 names a group's tests through a node attribute
  pytest 9 no longer reads.)"""
  if any(a in ("-d", "--dist") or a.startswith("--dist=")
         for a in config.invocation_params.args):
    return
  if getattr(config.option, "dist", "no") == "load":
    config.option.dist = "loadscope"
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """Modules with the most slow tests first (each module's tests stay together and in
  order), so the two workers end together rather than one finishing a long module alone."""
  slow = collections.Counter(item.module.__name__ for item in items
                             if item.get_closest_marker("slow"))
  items.sort(key=lambda item: -slow[item.module.__name__])  # stable


@pytest.fixture(scope="session")
def tfds_cache(tmp_path_factory) -> str:
  """One tfds build cache for the whole test session."""
  return str(tmp_path_factory.mktemp("tfds_cache"))


@pytest.fixture
def compile_options_seen(monkeypatch) -> list:
  """The ``compiler_options`` of every ``jax.stages.Lowered.compile`` call while the test
  runs, in order (the tests compile with the older emitters anyway, so options are read
  where JAX's compile receives them)."""
  import jax  # noqa: PLC0415

  calls = []
  compile_ = jax.stages.Lowered.compile

  def spy(self, compiler_options=None, **kw):
    calls.append(compiler_options)
    return compile_(self, compiler_options, **kw)

  monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
  return calls
