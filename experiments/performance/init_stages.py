"""Where the state initialiser's memory goes (``trainer.Setup.state``), stage by stage.

  python experiments/performance/init_stages.py --model=refinenet [--batch=1 --size=256]

Prints VmRSS / VmHWM / RssAnon / RssFile and glibc's heap in MiB (the high-water mark reset before each
stage through ``/proc/self/clear_refs``) after: importing jseg; ``trainer.setup``;
tracing + lowering the initialiser; compiling it (as ``Setup.state``: no fusion emitters,
inside ``runtime.releasing_free_memory``); running it; dropping its executable;\n``jax.clear_caches()`` (every tracing and compilation cache of the process). Also the
state's bytes and the initialiser's fusion count.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mem_stages import status  # noqa: E402  (resident MiB and glibc's heap)


def reset_hwm() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="refinenet")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--size", type=int, default=256)
  a = p.parse_args()
  import jax

  from jseg import runtime, trainer
  from jseg.bench.models import bench_config
  runtime.fix_mmap_threshold()
  runtime.install_block_cache()
  jax.devices()
  print("import", status(), flush=True)
  reset_hwm()
  run = trainer.setup(bench_config(a.model, a.size, a.batch))
  print("setup()", status(), flush=True)
  reset_hwm()
  lowered = run.init_fn.lower(run.init_rng)
  print("lower", status(), flush=True)
  reset_hwm()
  with runtime.releasing_free_memory():
    init = lowered.compile(compiler_options=trainer._INIT_COMPILER_OPTIONS.get(
        jax.default_backend(), {}))
  fusions = len(re.findall(r"^\s*\S+ = \S+ fusion\(", init.as_text(), re.M))
  print("compile", status(), "fusions", fusions, flush=True)
  reset_hwm()
  state = jax.block_until_ready(init(run.init_rng))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
  print("run", status(), "state_mb", round(nbytes / 2**20, 1), flush=True)
  reset_hwm()
  del init, lowered
  run.init_fn.clear_cache()
  gc.collect()
  runtime.release_free_memory()
  print("dropped", status(), flush=True)
  jax.clear_caches()
  gc.collect()
  runtime.release_free_memory()
  print("clear_caches", status(), flush=True)


if __name__ == "__main__":
  main()
