"""PyTorch side of ``python -m jseg.bench models``: times one twin network.

  python benchmarks/torch_bench.py --spec='{"model": "unet", "model_config": {...}, "aux_weight": 0.4}' \
      --batch=4 --size=256 [--channels_last] [--threads=2]
  python benchmarks/torch_bench.py --peak [--threads=2]
  python benchmarks/torch_bench.py --smp --spec='{"model": "unet", "model_config": {"num_classes": 11}}' ...

On a CUDA device (``--device=cuda``) each timed call ends with
``torch.cuda.synchronize()``, ``torch.backends.cudnn.benchmark`` is on (what
torch users run with), ``--amp=bf16`` wraps forward and loss in
``torch.autocast(dtype=torch.bfloat16)`` (jseg's ``model.dtype=bfloat16``:
bf16 compute, float32 parameters and loss), and ``device_peak_mb`` is
``torch.cuda.max_memory_allocated`` (jseg's is XLA's ``peak_bytes_in_use``).
``--smp`` builds segmentation_models.pytorch's network of that name
(``SMP_ARCHS``: its default ResNet-34 encoder, no pretrained weights) instead of
the twin: a reference row, not the same architecture as jseg's.

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

from jseg.bench.procstats import cur_rss_mb, reset_peak_rss, rss_mb, rss_parts_mb


def pin(threads: int) -> None:
  if threads and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


# smp's class for each jseg model name (smp's defaults otherwise: ResNet-34 encoder).
SMP_ARCHS = {"unet": "Unet", "unetpp": "UnetPlusPlus", "pspnet": "PSPNet", "deeplabv3": "DeepLabV3",
             "deeplabv3plus": "DeepLabV3Plus", "fpn": "FPN"}


def median_time(fn, repeats: int, sync=None) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    if sync:
      sync()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def _sync(device: str):
  import torch
  return torch.cuda.synchronize if device.startswith("cuda") else None


def peak_gflops(threads: int, n: int = 2048, repeats: int = 5, device: str = "cpu",
                dtype: str = "float32") -> float:
  """Best GFLOP/s of an n x n matmul (fp32 on CUDA may use TF32, as jax's default precision does),
  after 1 s of warm-up, as jseg's probe (the cores clock up under load)."""
  import torch
  torch.set_num_threads(threads)
  torch.backends.cuda.matmul.allow_tf32 = True
  a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
  sync = _sync(device)
  t_end = time.perf_counter() + 1.0
  while True:
    torch.mm(a, a)
    if sync:
      sync()
    if time.perf_counter() >= t_end:
      break
  best = min(median_time(lambda: torch.mm(a, a), 1, sync)[0] for _ in range(repeats))
  return 2 * n**3 / best / 1e9


def build_smp(name: str, num_classes: int):
  """segmentation_models.pytorch's network of that name, with its default encoder and no weights."""
  import segmentation_models_pytorch as smp
  if name not in SMP_ARCHS:
    raise KeyError(f"smp has no model for '{name}'. Available: {', '.join(SMP_ARCHS)}.")
  return smp.create_model(SMP_ARCHS[name], encoder_weights=None, classes=num_classes)


def run(spec: dict, batch: int, size: int, infer_batch: int, warmup: int, repeats: int,
        threads: int, channels_last: bool, device: str = "cpu", amp: str = "", use_smp: bool = False,
        infer_repeats: int = 0) -> dict:
  base = rss_mb()
  import torch
  import torch.nn.functional as F
  from torch.utils.flop_counter import FlopCounterMode

  sys.path.insert(0, str(Path(__file__).resolve().parent))
  import torch_models

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  cuda = device.startswith("cuda")
  if cuda:
    torch.backends.cudnn.benchmark = True
    torch.zeros(1, device=device)  # CUDA context up before the runtime figure
  sync = _sync(device)
  runtime_rss = cur_rss_mb()
  name, cfg = spec["model"], spec["model_config"]
  num_classes = cfg["num_classes"]
  t0 = time.perf_counter()
  model = build_smp(name, num_classes) if use_smp else torch_models.build(name, cfg)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(device=device, memory_format=fmt).train()
  autocast = lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp == "bf16")
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=0.01, momentum=0.9)
  init_s = time.perf_counter() - t0
  build_rss = rss_mb()
  g = torch.Generator().manual_seed(0)
  x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=fmt).to(device)
  y = torch.randint(0, num_classes, (batch, size, size), generator=g).to(device)
  aux_weight = float(spec.get("aux_weight", 0.4))

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      out = model(x)
    logits, aux = (out, {}) if use_smp else out
    loss = F.cross_entropy(logits.float(), y, ignore_index=255)  # float32 loss, as jseg's
    for a in aux.values():
      loss = loss + aux_weight * F.cross_entropy(a.float(), y, ignore_index=255)
    loss.backward()
    opt.step()
    return loss

  reset = reset_peak_rss()  # peak memory while training only
  t0 = time.perf_counter()
  for _ in range(warmup):
    loss = float(step())
  warmup_s = time.perf_counter() - t0
  step_s, times = median_time(step, repeats, sync)
  train_rss = rss_mb() if reset else None
  train_parts = rss_parts_mb()
  with FlopCounterMode(display=False) as counter:
    step()
  counted = counter.get_total_flops()

  model.eval()
  xi = x[:1].repeat(infer_batch, 1, 1, 1).contiguous(memory_format=fmt)
  with torch.inference_mode(), autocast():
    for _ in range(max(warmup, 1)):
      model(xi)
    if sync:
      sync()
    infer_s, infer_times = median_time(lambda: model(xi), infer_repeats or repeats, sync)
  out = {
      "framework": "smp" if use_smp else "torch", "model": name, "torch_version": torch.__version__,
      "device": device, "amp": amp or "none",
      "channels_last": channels_last, "threads": torch.get_num_threads(),
      "params": int(sum(p.numel() for p in model.parameters())),
      "init_s": round(init_s, 3), "compile_s": 0.0, "warmup_s": round(warmup_s, 3),
      "step_s": round(step_s, 4), "step_times_s": [round(t, 4) for t in times],
      "train_images_per_s": round(batch / step_s, 3),
      "infer_ms_per_image": round(1e3 * infer_s / infer_batch, 3),
      "infer_calls": len(infer_times),
      "torch_gflops_per_image": round(counted / batch / 1e9, 3),
      "final_loss": round(float(loss), 4),
      "base_rss_mb": round(base, 1), "runtime_rss_mb": round(runtime_rss, 1), "peak_rss_mb": round(max(rss_mb(), build_rss), 1),
      "train_peak_rss_mb": round(train_rss, 1) if train_rss else None,
      "after_train_rss_mb": train_parts,
      "difference": (f"smp.{SMP_ARCHS[name]} (ResNet-34 encoder): a different network from jseg's"
                     if use_smp else torch_models.difference(name)),
  }
  if cuda:
    out["device_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out["device_name"] = torch.cuda.get_device_name()
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--spec", default="")
  p.add_argument("--peak", action="store_true")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--infer_batch", type=int, default=1)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--infer_repeats", type=int, default=0, help="timed inference calls (0: --repeats)")
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--channels_last", action="store_true")
  p.add_argument("--device", default="cpu", help="cpu or cuda")
  p.add_argument("--amp", default="", choices=("", "bf16"), help="bf16 autocast of forward + loss input")
  p.add_argument("--peak_n", type=int, default=2048)
  p.add_argument("--peak_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--smp", action="store_true", help="time smp's model of that name instead of the twin")
  a = p.parse_args()
  pin(a.threads)
  if a.peak:
    out = {"framework": "torch", "device": a.device, "dtype": a.peak_dtype, "n": a.peak_n,
           "peak_gflops": round(peak_gflops(a.threads, a.peak_n, device=a.device, dtype=a.peak_dtype), 2)}
  elif a.spec:
    out = run(json.loads(a.spec), a.batch, a.size, a.infer_batch, a.warmup, a.repeats, a.threads,
              a.channels_last, a.device, a.amp, a.smp, a.infer_repeats)
  else:
    raise SystemExit("Pass --spec=JSON (a model) or --peak.")
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
