"""Markdown table of the accelerator runs in this folder, with model FLOPs recounted.

  python experiments/performance/gpu/tables.py gpu_paper_b8_s512_bf16*.json

The runs of 2026-11-29 recorded XLA's ``cost_analysis()`` as the FLOP count,
which on GPU leaves out the cuDNN convolutions (5.7 GFLOP per PSPNet image).
This recounts each network's training step on the jaxpr (``jseg.bench.flops``,
convolutions and matmuls; tracing only, on the CPU) at the run's batch and
size, and gives MFU = model FLOPs x images/s / the run's measured bf16 peak.
The torch twin is the same network, so it gets the same count; smp's rows keep
``torch.utils.flop_counter``'s count of smp's own network (which counts a
depthwise convolution's backward as a dense one: DeepLab v3+ is overcounted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def model_gflops(name: str, preset: str, batch: int, size: int, overrides: list[str]) -> float:
  from jseg import parallel, trainer
  from jseg.bench import models as bm
  from jseg.bench.flops import count_flops
  c = bm.bench_config(name, size, batch, preset, bm._parse_sets(overrides))
  run = trainer.setup(c)
  host = {"image": np.zeros((batch, size, size, 3), np.float32),
          "label": np.zeros((batch, size, size), np.int32)}
  b = parallel.shard_batch(host, run.mesh)
  return count_flops(run.step_fn, run.state, b, run.step_rng) / batch / 1e9


def main(paths: list[str]) -> None:
  rows = []
  for path in paths:
    rep = json.loads(Path(path).read_text())
    s = rep["settings"]
    peak = rep["peak"]["best_gflops"]
    for r in rep["results"]:
      j = r.get("jseg")
      if not j or "error" in j:
        rows.append(f"| {r['model']} | {(j or {}).get('error') or r.get('skipped', '')} |")
        continue
      gf = j.get("model_gflops_per_image") or model_gflops(r["model"], s["preset"], s["batch"], s["size"], s["set"])
      t, m = r.get("torch", {}), r.get("smp", {})
      mfu = lambda x: f"{100 * gf * x['train_images_per_s'] / peak:.1f}" if x.get("train_images_per_s") else "-"
      rows.append(
          f"| {r['model']} | {j['params'] / 1e6:.1f} M | {gf:.0f} | {j['train_images_per_s']:.0f} | "
          f"{t.get('train_images_per_s', 0):.0f} | **{j['train_images_per_s'] / t['train_images_per_s']:.2f}x** | "
          f"{mfu(j)} / {mfu(t)} | {j['infer_ms_per_image']:.1f} / {t.get('infer_ms_per_image', 0):.1f} | "
          f"{j.get('device_peak_mb', 0):.0f} / {t.get('device_peak_mb', 0):.0f} | {j['compile_s']:.0f} | "
          + (f"{m['train_images_per_s']:.0f} img/s, {m['params'] / 1e6:.1f} M, {m['torch_gflops_per_image']:.0f} GF |"
             if m.get("train_images_per_s") else "- |"))
  print("| model | params | train GFLOP/img | jseg img/s | torch img/s | jseg/torch | MFU % jseg / torch "
        "| infer ms/img jseg / torch | device peak MB jseg / torch | jseg compile s | smp (ResNet-34) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main(sys.argv[1:] or sorted(str(p) for p in Path(__file__).parent.glob("gpu_*.json")))
