"""Where one training step's time goes, by XLA op kind (CPU).

Runs jseg's real step for a bench-preset model under ``jax.profiler``, reads the
perfetto trace and sums the thunk durations by HLO op-name prefix (``convolution``,
``fusion`` kinds, ``transpose`` ...). Usage::

  python experiments/performance/profile_step.py --model=pspnet --batch=4 --size=256 [--steps=3]
      [--preset=paper] [--infer]
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="pspnet")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--preset", default="bench", help="jseg.bench's model sizes: bench or paper")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--top_ops", type=int, default=30)
  p.add_argument("--kind", default="", help="list the largest ops of this kind only")
  p.add_argument("--infer", action="store_true", help="profile the eval forward (train=False) instead")
  p.add_argument("--overlap", default="", help="list the ops that ran at the same time as this op")
  a = p.parse_args()
  import jax
  import checks
  from jseg import parallel
  run, host_batch = checks._setup(a.model, a.batch, a.size, preset=a.preset)
  state = run.state
  if a.infer:  # the bench's eval forward: jitted apply with running statistics
    from jseg import trainer
    model = run.model
    variables = trainer.variables(state.params, state.batch_stats)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    x = jax.device_put(host_batch()["image"])
    fn, args = apply, (variables, x)
  else:
    fn, args = None, None
  for _ in range(2):
    if a.infer:
      m = fn(*args)
    else:
      state, m = run.step_fn(state, parallel.shard_batch(host_batch(), run.mesh), run.step_rng)
  jax.block_until_ready(m)
  if a.infer:
    hlo = fn.lower(*args).compile().as_text()
  else:
    hlo = run.step_fn.lower(state, parallel.shard_batch(host_batch(), run.mesh), run.step_rng).compile().as_text()
  import time
  wall = []
  for _ in range(a.steps):
    b = parallel.shard_batch(host_batch(), run.mesh)
    t0 = time.perf_counter()
    if a.infer:
      m = fn(*args)
    else:
      state, m = run.step_fn(state, b, run.step_rng)
    jax.block_until_ready(m)
    wall.append(time.perf_counter() - t0)
  d = tempfile.mkdtemp()
  batches = [parallel.shard_batch(host_batch(), run.mesh) for _ in range(a.steps)]
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for b in batches:
      if a.infer:
        m = fn(*args)
      else:
        state, m = run.step_fn(state, b, run.step_rng)
    jax.block_until_ready(m)
  path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  by_kind = collections.Counter()
  by_op = collections.Counter()
  count = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    name = e.get("name", "")
    op = (e.get("args") or {}).get("hlo_op") or name
    if "hlo_module" not in (e.get("args") or {}) and not re.match(r"^[a-z_\-]+(\.\d+)?$", name):
      continue
    kind = re.sub(r"(\.\d+)+$", "", op)
    by_kind[kind] += e["dur"]
    count[kind] += 1
    by_op[op] += e["dur"]
  total = sum(by_kind.values())
  if a.overlap:
    ops_ev = [e for e in events if e.get("ph") == "X" and "dur" in e
              and re.match(r"^[a-z_\-]+(\.\d+)*$", (e.get("args") or {}).get("hlo_op") or e.get("name", ""))]
    for t in [e for e in ops_ev if ((e.get("args") or {}).get("hlo_op") or e["name"]) == a.overlap]:
      t0, t1 = t["ts"], t["ts"] + t["dur"]
      print(f"{a.overlap}: {t['dur']/1e3:.2f} ms on thread {t.get('tid')}; overlapping:")
      for e in ops_ev:
        if e is not t and e["ts"] < t1 and e["ts"] + e["dur"] > t0:
          ov = min(t1, e["ts"] + e["dur"]) - max(t0, e["ts"])
          print(f"    {((e.get('args') or {}).get('hlo_op') or e['name']):34s} tid {e.get('tid')} "
                f"overlap {ov/1e3:.2f} ms of {e['dur']/1e3:.2f}")
  print(f"{a.model} b{a.batch} s{a.size}: {a.steps} steps, summed op time {total/1e3/a.steps:.1f} ms/step "
        f"(ops on both threads summed); step wall time without the profiler: median "
        f"{1e3 * sorted(wall)[len(wall) // 2]:.1f} ms")
  for k, v in by_kind.most_common(a.top):
    print(f"  {k:40s} {v/1e3/a.steps:9.1f} ms/step  {100*v/total:5.1f}%  n={count[k]//a.steps}")
  print("largest single ops (HLO root shape, source op_name):")
  ops = [(k, v) for k, v in by_op.most_common() if not a.kind or re.sub(r"(\.\d+)+$", "", k) == a.kind]
  for k, v in ops[:a.top_ops]:
    m = re.search(r"^\s*(?:ROOT )?%?" + re.escape(k) + r" = ([^ ]+) .*$", hlo, re.M)
    line = m.group(0) if m else ""
    shape = m.group(1) if m else "?"
    src = re.search(r'op_name="([^"]+)"', line)
    print(f"  {k:34s} {v/1e3/a.steps:7.2f} ms  {shape:40s} {src.group(1)[-110:] if src else ''}")


if __name__ == "__main__":
  main()
