"""Where a warm start's setup peaks: wraps JAX's persistent-cache read and reports VmHWM around it.

  python experiments/performance/warm_init_probe.py MODEL CACHE_DIR BATCH   # twice: cold, then warm
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax
from mem_stages import status
from jax._src import compilation_cache as cc
from jseg import runtime, trainer
from jseg.bench.models import bench_config
from jseg.bench.procstats import reset_peak_rss
runtime.fix_mmap_threshold(); runtime.install_block_cache()
runtime.enable_compilation_cache(sys.argv[2])
orig = cc.get_executable_and_time
def wrapped(key, *a, **k):
  reset_peak_rss(); before = status(); t = time.perf_counter()
  out = orig(key, *a, **k)
  after = status()
  print(f"cache read {key[:40]} hit={out[0] is not None} {time.perf_counter()-t:.2f}s before={before} after={after}", flush=True)
  return out
cc.get_executable_and_time = wrapped
jax.devices()
run = trainer.setup(bench_config(sys.argv[1], 256, int(sys.argv[3]), "bench"))
t0 = time.perf_counter()
reset_peak_rss()
s = run.state
print("after state", round(time.perf_counter() - t0, 2), "s", status())
