"""Process memory from /proc, shared by the jseg and torch benchmark runners.

Imports nothing heavy, so the torch runner can use it without loading JAX.
"""

from __future__ import annotations

import resource


def rss_mb() -> float:
  """Peak resident memory of this process in MiB: ``VmHWM`` (reset at exec, unlike
  ``ru_maxrss``, which a child inherits from the process that forked it)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cur_rss_mb() -> float:
  """Current resident memory (``VmRSS``) in MiB, 0 where /proc is missing."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return 0.0


def rss_parts_mb() -> dict[str, float]:
  """Current resident memory split by kind, MiB (``/proc/self/status``): ``anon``
  (heap, arrays, compiled code), ``file`` (library code and data mapped from files,
  which the kernel can drop and re-read under memory pressure) and ``shmem``. Peaks
  are not kept per kind; this is a snapshot. Empty where /proc is missing."""
  keys = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
  out: dict[str, float] = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        name = line.split(None, 1)[0] if line.strip() else ""
        if name in keys:
          out[keys[name]] = round(int(line.split()[1]) / 1024.0, 1)
  except OSError:
    return {}
  return out


def reset_peak_rss() -> bool:
  """Resets this process's ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False
