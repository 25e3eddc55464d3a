"""Page faults per training step or inference call, and what glibc settings do to them.

XLA:CPU allocates each execution's temporaries as one block; above glibc's mmap threshold
(jseg fixes it at 1 MiB, ``runtime.fix_mmap_threshold``; glibc's own rises to at most
32 MiB) every block is a fresh mapping, so each call first-touches (page-faults and zeroes)
all of its temporaries again. This measures, per call, the wall time and the minor page
faults (``getrusage``), in fresh processes under environment variants, alternated::

  python experiments/performance/page_faults.py --model=pspnet --preset=paper --batch=1 --size=512 \
      [--train] [--calls=6] [--rounds=2] [--variants=default,heap,thp]

Variants: ``default`` (jseg's 1 MiB threshold), ``glibc`` (``JSEG_MMAP_THRESHOLD=0``:
glibc's dynamic threshold), ``heap`` (``MALLOC_MMAP_THRESHOLD_`` 4 GiB and
``MALLOC_TRIM_THRESHOLD_`` 4 GiB: every block from the heap, kept), ``thp``
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: transparent huge pages for malloc's memory,
the kernel's THP mode being ``madvise`` here), ``heap_thp`` (both), ``heap1`` (``heap`` with
one malloc arena, ``MALLOC_ARENA_MAX=1``: a thread's own arena maps any block above its
64 MiB heap size afresh whatever the threshold, so ``heap`` alone still faults there),
``heap1trim`` (``heap1`` with ``malloc_trim(0)`` after each call, inside the timing).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GIB4 = str(4 << 30)
VARIANTS = {
    "default": {},
    "glibc": {"JSEG_MMAP_THRESHOLD": "0"},
    "heap": {"MALLOC_MMAP_THRESHOLD_": GIB4, "MALLOC_TRIM_THRESHOLD_": GIB4},
    "thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "heap_thp": {"MALLOC_MMAP_THRESHOLD_": GIB4, "MALLOC_TRIM_THRESHOLD_": GIB4,
                 "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "heap1": {"MALLOC_MMAP_THRESHOLD_": GIB4, "MALLOC_TRIM_THRESHOLD_": GIB4,
              "MALLOC_ARENA_MAX": "1"},
    "heap1trim": {"MALLOC_MMAP_THRESHOLD_": GIB4, "MALLOC_TRIM_THRESHOLD_": GIB4,
                  "MALLOC_ARENA_MAX": "1", "PAGE_FAULTS_TRIM": "1"},
    "nocache": {"JSEG_BLOCK_CACHE": "0"},
}


def child(a) -> dict:
  from jseg import runtime
  runtime.fix_mmap_threshold()  # as jseg.train / the bench do (a no-op under some variants)
  runtime.install_block_cache()  # likewise (off under ``nocache``)
  sys.path.insert(0, HERE)
  import jax
  import checks
  from jseg import parallel, trainer
  from jseg.bench.procstats import cur_rss_mb, reset_peak_rss, rss_mb
  run, host_batch = checks._setup(a.model, a.batch, a.size, preset=a.preset)
  if a.train:
    state = run.state
    b = parallel.shard_batch(host_batch(), run.mesh)

    def call():
      nonlocal state
      state, m = run.step_fn(state, b, run.step_rng)
      return m["loss"]
  else:
    model = run.model
    v = trainer.variables(run.state.params, run.state.batch_stats)
    x = jax.device_put(host_batch()["image"])
    f = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    call = lambda: f(v, x)  # noqa: E731
  jax.block_until_ready(call())
  setup_peak = rss_mb()  # compilation and the first call
  reset = reset_peak_rss()
  jax.block_until_ready(call())
  times, faults, rss = [], [], []
  for _ in range(a.calls):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    if os.environ.get("PAGE_FAULTS_TRIM"):
      runtime.release_free_memory()  # malloc_trim(0): the heap's free pages back to the OS
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    rss.append(round(cur_rss_mb()))
  return {"ms": round(1e3 * statistics.median(times), 1), "faults": int(statistics.median(faults)),
          "times_ms": [round(1e3 * t, 1) for t in times], "peak_rss_mb": round(rss_mb(), 1),
          "setup_peak_rss_mb": round(setup_peak, 1),
          "calls_peak_rss_mb": round(rss_mb(), 1) if reset else None, "rss_after_calls_mb": rss,
          "block_cache": runtime.block_cache_stats()}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="pspnet")
  p.add_argument("--preset", default="paper")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--train", action="store_true")
  p.add_argument("--calls", type=int, default=6)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--variants", default="default,heap,thp")
  p.add_argument("--child", action="store_true")
  a = p.parse_args()
  if a.child:
    print("RESULT " + json.dumps(child(a)), flush=True)
    return
  what = "train step" if a.train else "inference"
  print(f"{a.model} ({a.preset}) {what} b{a.batch} {a.size}^2, {a.calls} calls per process:")
  args = [sys.executable, __file__, "--child", f"--model={a.model}", f"--preset={a.preset}",
          f"--batch={a.batch}", f"--size={a.size}", f"--calls={a.calls}"] + (["--train"] if a.train else [])
  for r in range(a.rounds):
    for name in a.variants.split(","):
      env = {k: v for k, v in os.environ.items()
             if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES",
                          "MALLOC_ARENA_MAX", "PAGE_FAULTS_TRIM", "JSEG_BLOCK_CACHE")}
      env.update(VARIANTS[name])
      out = subprocess.run(args, env=env, capture_output=True, text=True)
      line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
      if not line:
        print(out.stderr[-2000:])
        raise SystemExit(f"variant {name} failed")
      res = json.loads(line[0][7:])
      print(f"  round {r} {name:9s} median {res['ms']:8.1f} ms/call, {res['faults']:7d} minor faults/call, "
            f"peak RSS {res['peak_rss_mb']:7.1f} MB  ({res['times_ms']})", flush=True)
      print(f"           peak RSS through compilation and the first call {res['setup_peak_rss_mb']} MB, "
            f"during the calls {res['calls_peak_rss_mb']} MB; RSS after each call "
            f"{res['rss_after_calls_mb']}; block cache {res['block_cache']}", flush=True)


if __name__ == "__main__":
  main()
