"""RefineNet's training peak with and without the block cache, outside the bench's
torch-alternating run: the bench's jseg measurement (`jseg.bench.models.run_jseg`, batch 4,
256², 5 timed steps, no inference) in this process, then VmHWM / VmRSS and the resident
anonymous memory by kind of mapping, and glibc's `malloc_stats()` on stderr.

  for c in 0 1 0 1; do JSEG_BLOCK_CACHE=$c python experiments/performance/cache_peak_probe.py; done

Twenty-fifth pass: train peaks 651.1 / 667.2 MB without the cache, 664.6 / 665.8 MB with it.
"""
import ctypes, os, sys, time
import numpy as np
from jseg.bench import models as bm
libc = ctypes.CDLL("libc.so.6")
def status():
  d = {}
  for line in open("/proc/self/status"):
    k, v = line.split(":", 1)
    if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
      d[k] = int(v.split()[0]) // 1024
  return d
def smaps_summary():
  """Anonymous RSS in mappings >= 1 MiB vs heap/arena-like regions."""
  big = small = heap = 0
  cur = None
  for line in open("/proc/self/smaps"):
    parts = line.split()
    if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
      a, b = (int(x, 16) for x in parts[0].split("-"))
      cur = (b - a, parts[5] if len(parts) > 5 else "")
    elif parts[0] == "Rss:" and cur:
      kb = int(parts[1])
      if cur[1] == "[heap]": heap += kb
      elif cur[1] == "": 
        if cur[0] >= (64 << 20): small += kb  # arena-sized reservations (64 MiB heaps)
        else: big += kb
  return {"heap_mb": heap // 1024, "anon_64M_regions_mb": small // 1024, "other_anon_mb": big // 1024}
r = bm.run_jseg("refinenet", 256, 4, 1, 1, 5, "bench", {}, 2, 0)
print("cache", os.environ.get("JSEG_BLOCK_CACHE", "1"), "train_peak", r["train_peak_rss_mb"], "peak", r["peak_rss_mb"], status(), smaps_summary(), flush=True)
libc.malloc_stats()
