"""Process memory from /proc, shared by the jseg and torch benchmark runners.

Imports nothing heavy, so the torch runner can use it without loading JAX.
"""

from __future__ import annotations

import resource


def _status_mb(*fields: str) -> dict[str, float]:
  """``fields`` of ``/proc/self/status`` (kB lines such as ``VmRSS``) in MiB; those
  missing, or all where /proc cannot be read, are left out."""
  out: dict[str, float] = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        name, _, rest = line.partition(":")
        if name in fields:
          out[name] = int(rest.split()[0]) / 1024.0
  except OSError:
    return {}
  return out


def rss_mb() -> float:
  """Peak resident memory of this process in MiB: ``VmHWM`` (reset at exec, unlike
  ``ru_maxrss``, which a child inherits from the process that forked it)."""
  peak = _status_mb("VmHWM").get("VmHWM")
  return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cur_rss_mb() -> float:
  """Current resident memory (``VmRSS``) in MiB, 0 where /proc is missing."""
  return _status_mb("VmRSS").get("VmRSS", 0.0)


def rss_parts_mb() -> dict[str, float]:
  """Current resident memory split by kind, MiB (``/proc/self/status``): ``anon``
  (heap, arrays, compiled code), ``file`` (library code and data mapped from files,
  which the kernel can drop and re-read under memory pressure) and ``shmem``. Peaks
  are not kept per kind; this is a snapshot. Empty where /proc is missing."""
  names = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
  return {names[k]: round(v, 1) for k, v in _status_mb(*names).items()}


def reset_peak_rss() -> bool:
  """Resets this process's ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False
