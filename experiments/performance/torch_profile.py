"""Where the torch twin's inference (or training step) time goes, by aten op (CPU).

The torch side of ``profile_step.py``: builds the twin of a jseg bench/paper preset
(``benchmarks/torch_models.py``) and sums ``torch.profiler`` self-CPU time by op name
over ``--steps`` calls, after two warm-up calls. Usage::

  python experiments/performance/torch_profile.py --model=pspnet --preset=paper --batch=1 --size=256 [--train]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="pspnet")
  p.add_argument("--preset", default="bench")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--train", action="store_true", help="profile a training step (forward+backward+SGD)")
  p.add_argument("--top", type=int, default=25)
  a = p.parse_args()
  from jseg.bench.models import bench_config
  cfg = json.loads(bench_config(a.model, a.size, a.batch, a.preset).model.to_json_best_effort())
  import torch
  import torch.nn.functional as F
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import torch_models
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  model = torch_models.build(a.model, cfg)
  x = torch.randn(a.batch, 3, a.size, a.size)
  y = torch.randint(0, cfg["num_classes"], (a.batch, a.size, a.size))
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

  def call():
    if a.train:
      opt.zero_grad(set_to_none=True)
      logits, aux = model(x)
      loss = F.cross_entropy(logits, y, ignore_index=255)
      for v in aux.values():
        loss = loss + 0.4 * F.cross_entropy(v, y, ignore_index=255)
      loss.backward()
      opt.step()
    else:
      with torch.inference_mode():
        model(x)

  model.train(a.train)
  for _ in range(2):
    call()
  wall = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    call()
    wall.append(time.perf_counter() - t0)
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    for _ in range(a.steps):
      call()
  wall.sort()
  print(f"torch {a.model} ({a.preset}) b{a.batch} s{a.size} {'train' if a.train else 'infer'}: "
        f"median wall {1e3 * wall[len(wall) // 2]:.1f} ms per call without the profiler")
  rows = prof.key_averages(group_by_input_shape=True)
  rows = sorted(rows, key=lambda r: -r.self_cpu_time_total)
  total = sum(r.self_cpu_time_total for r in rows)
  print(f"summed self CPU time {total / 1e3 / a.steps:.1f} ms per call")
  for r in rows[:a.top]:
    print(f"  {r.key:40s} {r.self_cpu_time_total / 1e3 / a.steps:8.2f} ms  n={r.count // a.steps:3d}  "
          f"{str(r.input_shapes)[:90]}")


if __name__ == "__main__":
  main()
