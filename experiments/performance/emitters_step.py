"""XLA:CPU's fusion emitters (MLIR, the default) vs its legacy LLVM-IR emitters for the
training step's programs, in one process, alternated: step time, fusions, temporaries.

  python experiments/performance/emitters_step.py --model=refinenet --batch=1 --size=256 [--rounds=10]

The step (``trainer.SplitStep``: gradient program, then update program) is compiled twice
from the same lowering, once with ``compiler_options={"xla_cpu_use_fusion_emitters": False}``
for both programs; both forms then run on copies of the same state and batch, alternated
each round (which form goes first alternates too), and the loss of each is checked equal.
``--options='{"xla_cpu_use_multi_output_fusion": true}'`` A/Bs another option the same way
(the variant keeps the name ``emitters_off`` in the output). Compile memory is per process: ``levers.py --variants=default,fusion_emitters_off`` measures it.
"""
from __future__ import annotations

import argparse
import json
import re
import time

import jax
import numpy as np

from jseg import parallel, runtime, trainer
from jseg.bench.models import bench_config

OFF = {"xla_cpu_use_fusion_emitters": False}


def compiled(lowered: trainer.SplitStep, options: dict) -> trainer.SplitStep:
  return trainer.SplitStep(lowered.grads_fn.compile(compiler_options=options),
                           lowered.update_fn.compile(compiler_options=options), lowered.zeros_fn)


def stats(step: trainer.SplitStep) -> dict:
  text = step.grads_fn.as_text()
  mem = step.grads_fn.memory_analysis()
  return {"grad_fusions": len(re.findall(r"^\s*\S+ = \S+ fusion\(", text, re.M)),
          "grad_temp_mb": round(mem.temp_size_in_bytes / 2**20, 1)}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="refinenet")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3, help="steps per form per round")
  p.add_argument("--infer", action="store_true", help="also the batch-1 inference forward")
  p.add_argument("--options", default=json.dumps(OFF),
                 help="the variant's XLA compiler options (JSON); default: fusion emitters off")
  a = p.parse_args()
  variant = json.loads(a.options)
  runtime.fix_mmap_threshold()
  runtime.install_block_cache()
  config = bench_config(a.model, a.size, a.batch)
  run = trainer.setup(config)
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal((a.batch, a.size, a.size, 3), np.float32),
          "label": rng.integers(0, 11, (a.batch, a.size, a.size)).astype(np.int32)}
  b = parallel.shard_batch(host, run.mesh)
  lowered = run.step_fn.lower(run.state, b, run.step_rng)
  forms = {}
  for name, opts in (("default", {}), ("emitters_off", variant)):
    t0 = time.perf_counter()
    with runtime.releasing_free_memory():
      forms[name] = compiled(lowered, opts)
    print(name, "compile_s", round(time.perf_counter() - t0, 2), stats(forms[name]), flush=True)
  states = {k: jax.tree.map(lambda x: x.copy(), run.state) for k in forms}
  times: dict[str, list[float]] = {k: [] for k in forms}
  losses: dict[str, list[float]] = {k: [] for k in forms}
  for r in range(a.rounds):
    order = list(forms) if r % 2 == 0 else list(forms)[::-1]
    for k in order:
      for _ in range(a.repeats):
        t0 = time.perf_counter()
        states[k], m = forms[k](states[k], b, run.step_rng)
        losses[k].append(float(m["loss"]))
        times[k].append(time.perf_counter() - t0)
  for k in forms:
    print(k, "median_ms", round(1e3 * float(np.median(times[k][a.repeats:])), 1),
          "min_ms", round(1e3 * min(times[k]), 1), "last_loss", losses[k][-1])
  diffs = [abs(x - y) for x, y in zip(losses["default"], losses["emitters_off"])]
  print("max_loss_diff", max(diffs), "load", open("/proc/loadavg").read().split()[:3])
  if a.infer:  # the batch-1 inference forward, as jseg.bench times it
    model = run.model
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    st = states["default"]
    v = trainer.variables(st.params, st.batch_stats)
    x = jax.device_put(host["image"][:1])
    low = apply.lower(v, x)
    inf = {"default": low.compile(), "emitters_off": low.compile(compiler_options=variant)}
    outs = {k: np.asarray(f(v, x)) for k, f in inf.items()}
    t: dict[str, list[float]] = {k: [] for k in inf}
    for r in range(a.rounds):
      for k in (list(inf) if r % 2 == 0 else list(inf)[::-1]):
        for _ in range(5):
          t0 = time.perf_counter()
          jax.block_until_ready(inf[k](v, x))
          t[k].append(time.perf_counter() - t0)
    for k in inf:
      print("infer", k, "median_ms", round(1e3 * float(np.median(t[k])), 2))
    print("infer_max_diff", float(np.abs(outs["default"] - outs["emitters_off"]).max()))


if __name__ == "__main__":
  main()
