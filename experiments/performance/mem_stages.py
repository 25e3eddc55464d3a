"""Where jseg's resident memory goes, stage by stage, for one bench model (CPU).

  python experiments/performance/mem_stages.py --model=pspnet [--batch=4 --size=256] [--out=F.json]

Prints (and writes) ``VmRSS``/``VmHWM``/``RssAnon``/``RssFile`` in MiB after: importing
JAX, building the train state (init compiled and run), ``malloc_trim``, lowering the
step, compiling it, ``malloc_trim`` again, three steps, a last trim, compiling and
running the batch-1 inference forward (as ``jseg.bench``); plus XLA's
own buffer sizes for the step (``memory_analysis``: temporaries = the activations
kept for the backward and scratch). Run with ``XLA_FLAGS``/``JSEG_CONV`` set to
compare settings; ``--cache=DIR`` turns on the persistent compilation cache (run twice:
the second run loads every executable instead of compiling it). Anonymous memory is the heap; file memory is library code paged in.
Each stage also reads glibc's heap (``mallinfo2``): in use, free, and mapped apart. The gap
between ``RssAnon`` and in-use + mapped holds Python's own arenas, compiled code and freed
heap pages still resident (``malloc_trim`` returns the last; twenty-sixth pass).
The block cache is on, as in ``jseg.train`` and ``jseg.bench`` (``JSEG_BLOCK_CACHE=0``: off).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os


class _MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                              "usmblks", "fsmblks", "uordblks", "fordblks",
                                              "keepcost")]


def _heap() -> dict[str, int]:
  """glibc's heap (``mallinfo2``, MiB): in use, free (resident or not), and blocks mapped
  apart (1 MiB and more under jseg's mmap threshold); empty where there is no glibc."""
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
  except (OSError, AttributeError):
    return {}
  m = libc.mallinfo2()
  return {"heap_in_use": m.uordblks >> 20, "heap_free": m.fordblks >> 20, "mapped": m.hblkhd >> 20}


def status() -> dict[str, int]:
  d = {}
  with open("/proc/self/status") as f:
    for line in f:
      k, v = line.split(":", 1)
      if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        d[k] = int(v.split()[0]) // 1024
  d.update(_heap())
  return d


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="pspnet")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--out", default="")
  p.add_argument("--preset", default="bench", help="jseg.bench's network sizes: bench | paper")
  p.add_argument("--steps", type=int, default=3, help="training steps to run and report")
  p.add_argument("--sync_state", action="store_true",
                 help="wait for each step's new state, not only its loss, before the next")
  p.add_argument("--cache", default="", help="persistent compilation cache folder (warm runs)")
  a = p.parse_args()
  import jax
  import numpy as np

  from jseg import parallel, runtime, trainer
  from jseg.bench.models import bench_config
  from jseg.bench.procstats import reset_peak_rss

  out = {"model": a.model, "batch": a.batch, "size": a.size,
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "jseg_conv": os.environ.get("JSEG_CONV", "auto")}
  if a.cache:
    runtime.enable_compilation_cache(a.cache)
  out["mmap_threshold_fixed"] = runtime.fix_mmap_threshold()  # as jseg.train and jseg.bench
  out["block_cache"] = runtime.install_block_cache() > 0  # as they do too (JSEG_BLOCK_CACHE=0: off)
  jax.devices()
  out["import"] = status()
  run = trainer.setup(bench_config(a.model, a.size, a.batch, a.preset))
  jax.block_until_ready(run.state)
  out["setup"] = status()
  runtime.release_free_memory()
  out["setup_trim"] = status()
  reset_peak_rss()
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal((a.batch, a.size, a.size, 3), np.float32),
          "label": rng.integers(0, 11, (a.batch, a.size, a.size)).astype(np.int32)}
  b = parallel.shard_batch(host, run.mesh)
  lowered = run.step_fn.lower(run.state, b, run.step_rng)
  out["lower"] = status()
  step = lowered.compile()
  out["compile"] = status()
  # A SplitStep (the default): the gradient program holds the activations.
  ma = getattr(step, "grads_fn", step).memory_analysis()
  out["xla_buffers_mb"] = {k.replace("_size_in_bytes", ""): round(getattr(ma, k) / 2**20, 1)
                           for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                     "output_size_in_bytes", "alias_size_in_bytes")
                           if hasattr(ma, k)}
  runtime.release_free_memory()
  out["compile_trim"] = status()
  reset_peak_rss()
  state = run.state
  for i in range(a.steps):
    state, m = step(state, b, run.step_rng)
    float(m["loss"])
    if a.sync_state:
      jax.block_until_ready(state)
    out[f"step{i}"] = status()
  runtime.release_free_memory()
  out["steps_trim"] = status()
  reset_peak_rss()
  model = run.model
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  variables = trainer.variables(state.params, state.batch_stats)
  x = jax.device_put(host["image"][:1])
  infer = apply.lower(variables, x).compile()
  out["infer_compile"] = status()
  for _ in range(3):
    jax.block_until_ready(infer(variables, x))
  out["infer_run"] = status()
  for k, v in out.items():
    print(f"{k:16s} {v}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
