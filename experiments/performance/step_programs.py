"""Whole-process peak memory of compiling and running the training step as one program or as
two (``trainer.SplitStep``), with and without ``runtime.releasing_free_memory``.

  python experiments/performance/step_programs.py --mode=split_trim --model=pspnet [--batch=4 --size=256]

Modes: ``fused`` (one program, freed memory returned after compiling: the trainer before
2026-11-30's seventh pass), ``fused_trim`` (one program, freed memory returned every 50 ms
while compiling), ``split`` (two programs, returned after each), ``split_trim`` (two programs,
every 50 ms: the trainer now). One mode per process (the peak is the process's high-water
mark); alternate the modes over processes to see the machine's spread. Prints resident MB
after the state is built, after compiling, the peak, and the median step time.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--mode", default="split_trim", choices=["fused", "fused_trim", "split", "split_trim"])
  p.add_argument("--model", default="pspnet")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  a = p.parse_args()

  import jax
  import numpy as np

  from jseg import parallel, runtime, trainer
  from jseg.bench.models import bench_config
  from jseg.bench.procstats import cur_rss_mb, rss_mb

  cfg = bench_config(a.model, a.size, a.batch)
  cfg.split_update = a.mode.startswith("split")
  run = trainer.setup(cfg)
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal((a.batch, a.size, a.size, 3), np.float32),
          "label": rng.integers(0, 11, (a.batch, a.size, a.size)).astype(np.int32)}
  batch = parallel.shard_batch(host, run.mesh)
  state = jax.block_until_ready(run.state)
  built, built_peak = cur_rss_mb(), rss_mb()
  trim = runtime.releasing_free_memory if a.mode.endswith("trim") else contextlib.nullcontext
  t0 = time.perf_counter()
  lowered = run.step_fn.lower(state, batch, run.step_rng)
  if cfg.split_update:  # compile the two programs one after the other, as SplitStep.compile does
    parts = []
    for part in (lowered.grads_fn, lowered.update_fn):
      with trim():
        parts.append(part.compile())
      runtime.release_free_memory()
    step = trainer.SplitStep(*parts, lowered.zeros_fn)
  else:
    with trim():
      step = lowered.compile()
  compile_s = time.perf_counter() - t0
  compiled_rss = cur_rss_mb()
  runtime.release_free_memory()
  times = []
  for _ in range(8):
    t1 = time.perf_counter()
    state, m = step(state, batch, run.step_rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t1)
  print(f"{a.mode:10s} {a.model} b{a.batch} {a.size}^2: state built {built:.0f} MB (peak {built_peak:.0f}), compiled "
        f"{compiled_rss:.0f} MB ({compile_s:.1f} s), after steps {cur_rss_mb():.0f} MB, "
        f"peak {rss_mb():.0f} MB; step {1e3 * statistics.median(times[2:]):.1f} ms, "
        f"loss {float(m['loss']):.6f}", flush=True)


if __name__ == "__main__":
  main()
