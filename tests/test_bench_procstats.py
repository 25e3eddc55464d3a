"""Tests for jseg.bench.procstats (the /proc readings both benchmark runners share)."""

import json
import subprocess
import sys

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


_WRITE_64_MIB = """
import json
import numpy as np
from jseg.bench import procstats
before = procstats.rss_parts_mb()
block = np.ones(64 << 18, np.float32)  # 64 MiB, every page written
print(json.dumps([before, procstats.rss_parts_mb()]))
"""


@linux
def test_an_array_written_grows_the_anonymous_part_not_the_file_part():
  # A fresh interpreter: in this one, earlier tests may leave freed heap pages resident
  # that the array would reuse.
  out = subprocess.run([sys.executable, "-c", _WRITE_64_MIB], capture_output=True, text=True,
                       check=True)
  before, after = json.loads(out.stdout.strip().splitlines()[-1])
  assert after["anon"] - before["anon"] > 56.0
  assert abs(after["file"] - before["file"]) < 8.0


@linux
def test_the_peak_is_at_least_the_current_and_resets():
  assert procstats.rss_mb() >= procstats.cur_rss_mb() - 1.0
  if procstats.reset_peak_rss():
    assert procstats.rss_mb() - procstats.cur_rss_mb() < 8.0
