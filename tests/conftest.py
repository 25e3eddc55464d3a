"""Shared test fixtures: tiny configs on the shipped CamVid sample."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


@pytest.fixture(scope="session")
def tfds_cache(tmp_path_factory) -> str:
  """One tfds build cache for the whole test session."""
  return str(tmp_path_factory.mktemp("tfds_cache"))
