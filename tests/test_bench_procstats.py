"""Tests for jseg.bench.procstats (the /proc readings both benchmark runners share)."""

import sys

import numpy as np
import pytest

from jseg.bench import procstats

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux
def test_rss_parts_add_up_to_the_resident_memory():
  parts = procstats.rss_parts_mb()
  assert set(parts) >= {"anon", "file"}
  total = sum(parts.values())
  assert abs(total - procstats.cur_rss_mb()) < 8.0  # read a moment apart
  assert parts["file"] > 1.0  # the interpreter's own code is file-backed


@linux
def test_an_array_written_grows_the_anonymous_part_not_the_file_part():
  before = procstats.rss_parts_mb()
  block = np.ones(64 << 18, np.float32)  # 64 MiB, every page written
  after = procstats.rss_parts_mb()
  assert after["anon"] - before["anon"] > 56.0
  assert abs(after["file"] - before["file"]) < 8.0
  del block


@linux
def test_the_peak_is_at_least_the_current_and_resets():
  assert procstats.rss_mb() >= procstats.cur_rss_mb() - 1.0
  if procstats.reset_peak_rss():
    assert procstats.rss_mb() - procstats.cur_rss_mb() < 8.0
