"""Resident memory while the gradient program is traced/lowered and while it compiles.

  python experiments/performance/lower_memory.py none                # no persistent cache
  python experiments/performance/lower_memory.py cache /tmp/cache_dir  # with it (run twice: cold, warm)

Builds a bench-preset DeepLab v3 (batch 4, 256²), then samples RSS every 10 ms around
``jax.jit(trainer.grad_step).lower(...)`` and ``.compile()`` (with
``runtime.releasing_free_memory``, as the trainer does). Measured 2026-11-30 (eighth pass):
271 MB before, peak 406-450 MB while lowering, 347 MB after it, 440-453 MB while compiling;
with the cache 440 MB cold, 421 MB warm.
"""
import ctypes
import functools
import gc
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def rss() -> float:
  return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


def main() -> None:
  mode = sys.argv[1] if len(sys.argv) > 1 else "none"
  import jax

  import checks
  from jseg import losses, parallel, runtime, trainer
  from jseg.bench.models import bench_config

  if mode != "none":
    runtime.enable_compilation_cache(sys.argv[2])
  run, host_batch = checks._setup("deeplabv3", 4, 256)
  loss_fn = losses.build_loss(bench_config("deeplabv3", 256, 4))
  b = parallel.shard_batch(host_batch(), run.mesh)
  libc = ctypes.CDLL("libc.so.6")
  libc.malloc_trim(0)
  base = rss()
  peak, stop = [base], []

  def sample():
    while not stop:
      peak[0] = max(peak[0], rss())
      time.sleep(0.01)

  t = threading.Thread(target=sample)
  t.start()
  t0 = time.time()
  with runtime.releasing_free_memory():
    lowered = jax.jit(functools.partial(trainer.grad_step, loss_fn=loss_fn)).lower(
        run.state, b, run.step_rng)
    t1, p_lower, r_lower = time.time(), peak[0], rss()
    gc.collect()
    libc.malloc_trim(0)
    r_gc = rss()
    lowered.compile()
  stop.append(1)
  t.join()
  print(f"{mode}: before {base:.0f} MB, peak while lowering {p_lower:.0f}, after lowering "
        f"{r_lower:.0f} (after gc + trim {r_gc:.0f}), peak while compiling {peak[0]:.0f}; "
        f"lower {t1 - t0:.1f} s, compile {time.time() - t1:.1f} s")


if __name__ == "__main__":
  main()
