"""Page faults of the gradients: jseg's ``SplitStep``, whose gradient program writes into the
previous step's gradient buffers of 1 MiB and more (donated), vs the same step given fresh
buffers every step (``SplitStep.release`` before each call).

  python experiments/performance/recycle_grads.py --model=deeplabv3 --preset=paper --batch=2 \
      --size=256 [--steps=8] [--rounds=3]

Each array of 1 MiB and more is a fresh mapping (``runtime.fix_mmap_threshold``), so fresh
gradient buffers are page-faulted and zeroed every step. Both forms in one process,
alternated; per form, the median step (ms) and the minor page faults per step
(``getrusage``), and the values of the two forms' states after the same steps.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="deeplabv3")
  p.add_argument("--preset", default="paper")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--rounds", type=int, default=3)
  a = p.parse_args()
  import jax
  import numpy as np
  import checks
  from jseg import parallel, runtime

  runtime.fix_mmap_threshold()
  run, host_batch = checks._setup(a.model, a.batch, a.size, preset=a.preset)
  step = run.step_fn  # the trainer's SplitStep: keeps the gradients of 1 MiB and more

  def fresh(state, batch, rng):
    step.release()  # fresh gradient buffers, as before the recycling
    return step(state, batch, rng)

  recycled = step
  batches = [parallel.shard_batch(host_batch(), run.mesh) for _ in range(a.steps)]
  states = {}
  times = {"fresh": [], "recycled": []}
  faults = {"fresh": [], "recycled": []}
  for r in range(a.rounds):
    for name, fn in (("fresh", fresh), ("recycled", recycled)):
      state = jax.tree.map(lambda x: x.copy(), run.state)
      for i, b in enumerate(batches):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        state, out = fn(state, b, run.step_rng)
        jax.block_until_ready((state, out))
        if r > 0 or i > 1:  # the first round's first steps compile
          times[name].append((time.perf_counter() - t0) * 1e3)
          faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
      states[name] = state
  diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(states["fresh"].params),
                             jax.tree.leaves(states["recycled"].params)))
  n = sum(x.size for x in jax.tree.leaves(run.state.params))
  print(f"{a.model} {a.preset} b{a.batch} {a.size}^2: {n * 4 / 2**20:.0f} MB of parameters; "
        f"max param diff after {a.steps} steps {diff:.1e}")
  for name in times:
    print(f"  {name}: median step {statistics.median(times[name]):.1f} ms, "
          f"faults/step {statistics.median(faults[name]):.0f}")


if __name__ == "__main__":
  main()
