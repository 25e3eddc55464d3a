"""PyTorch side of ``python -m jseg.bench models``: times one twin network.

  python benchmarks/torch_bench.py --spec='{"model": "unet", "model_config": {...}, "aux_weight": 0.4}' \
      --batch=4 --size=256 [--channels_last] [--threads=2]
  python benchmarks/torch_bench.py --peak [--threads=2]

Prints one line ``RESULT {json}`` with the same fields as the jseg side: step
time (median of ``--repeats`` after ``--warmup``), training images/s, eval
latency per image (``torch.inference_mode``, batch ``--infer_batch``), parameter
count, peak RSS, and ``torch_gflops_per_image`` from
``torch.utils.flop_counter`` (convolutions and matmuls of one training step
only, forward + backward) as a cross-check of the architecture's size.
The training step matches jseg's: cross-entropy with ignore index 255 plus
``aux_weight`` times each auxiliary head's, SGD with momentum 0.9 and weight
decay 1e-4 on conv kernels only (jseg's ``decay_mask``), lr 0.01.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from jseg.bench.procstats import cur_rss_mb, reset_peak_rss, rss_mb


def pin(threads: int) -> None:
  if threads and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
  import torch
  torch.set_num_threads(threads)
  a = torch.randn(n, n)
  torch.mm(a, a)
  best = min(median_time(lambda: torch.mm(a, a), 1)[0] for _ in range(repeats))
  return 2 * n**3 / best / 1e9


def run(spec: dict, batch: int, size: int, infer_batch: int, warmup: int, repeats: int,
        threads: int, channels_last: bool) -> dict:
  base = rss_mb()
  import torch
  import torch.nn.functional as F
  from torch.utils.flop_counter import FlopCounterMode

  sys.path.insert(0, str(Path(__file__).resolve().parent))
  import torch_models

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  runtime_rss = cur_rss_mb()
  name, cfg = spec["model"], spec["model_config"]
  num_classes = cfg["num_classes"]
  t0 = time.perf_counter()
  model = torch_models.build(name, cfg)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt).train()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=0.01, momentum=0.9)
  init_s = time.perf_counter() - t0
  build_rss = rss_mb()
  g = torch.Generator().manual_seed(0)
  x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=fmt)
  y = torch.randint(0, num_classes, (batch, size, size), generator=g)
  aux_weight = float(spec.get("aux_weight", 0.4))

  def step():
    opt.zero_grad(set_to_none=True)
    logits, aux = model(x)
    loss = F.cross_entropy(logits, y, ignore_index=255)
    for a in aux.values():
      loss = loss + aux_weight * F.cross_entropy(a, y, ignore_index=255)
    loss.backward()
    opt.step()
    return loss

  reset = reset_peak_rss()  # peak memory while training only
  t0 = time.perf_counter()
  for _ in range(warmup):
    loss = float(step())
  warmup_s = time.perf_counter() - t0
  step_s, times = median_time(step, repeats)
  train_rss = rss_mb() if reset else None
  with FlopCounterMode(display=False) as counter:
    step()
  counted = counter.get_total_flops()

  model.eval()
  xi = x[:1].repeat(infer_batch, 1, 1, 1).contiguous(memory_format=fmt)
  with torch.inference_mode():
    for _ in range(max(warmup, 1)):
      model(xi)
    infer_s, _ = median_time(lambda: model(xi), repeats)
  return {
      "framework": "torch", "model": name, "torch_version": torch.__version__,
      "channels_last": channels_last, "threads": torch.get_num_threads(),
      "params": int(sum(p.numel() for p in model.parameters())),
      "init_s": round(init_s, 3), "compile_s": 0.0, "warmup_s": round(warmup_s, 3),
      "step_s": round(step_s, 4), "step_times_s": [round(t, 4) for t in times],
      "train_images_per_s": round(batch / step_s, 3),
      "infer_ms_per_image": round(1e3 * infer_s / infer_batch, 3),
      "torch_gflops_per_image": round(counted / batch / 1e9, 3),
      "final_loss": round(float(loss), 4),
      "base_rss_mb": round(base, 1), "runtime_rss_mb": round(runtime_rss, 1), "peak_rss_mb": round(max(rss_mb(), build_rss), 1),
      "train_peak_rss_mb": round(train_rss, 1) if train_rss else None,
      "difference": torch_models.DIFFERENCES.get(name, ""),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--spec", default="")
  p.add_argument("--peak", action="store_true")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--infer_batch", type=int, default=1)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--channels_last", action="store_true")
  a = p.parse_args()
  pin(a.threads)
  if a.peak:
    out = {"framework": "torch", "peak_gflops": round(peak_gflops(a.threads), 2)}
  elif a.spec:
    out = run(json.loads(a.spec), a.batch, a.size, a.infer_batch, a.warmup, a.repeats, a.threads,
              a.channels_last)
  else:
    raise SystemExit("Pass --spec=JSON (a model) or --peak.")
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
