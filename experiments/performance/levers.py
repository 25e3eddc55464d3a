"""A/B runs of jseg's real training step under different XLA flags or env settings.

  python experiments/performance/levers.py --models=unet,pspnet --variants=default,ynn_off \
      [--rounds=2] [--batch=4] [--size=256] [--out=experiments/performance/levers_ynn.json]

For each model and each round, runs ``python -m jseg.bench models --child=<model>``
(the same measurement as the suite: compile, median step, eval latency, peak
memory) once per variant, alternating variants so that a change in machine load
hits them alike. Reports per variant the best-of-rounds median step time and
images/s, and the ratio to the first variant. Variants are named in ``VARIANTS``
(an XLA_FLAGS string and/or extra environment variables). The variant ``base``
runs the code of another checkout (``--base_tree``, e.g. a ``git worktree`` of the
previous commit; its process starts in that folder) with default settings, to A/B a
code change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jseg.bench.models import _loadavg, _spawn

VARIANTS = {
    "default": {},
    # YNNPACK off: XLA:CPU's default hands dots (and the kernel-gradient convs that
    # become dots) to YNNPACK; the empty list gives them back to Eigen.
    "ynn_off": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="},
    # YNNPACK for dots only: convolutions (the kernel gradients above all) go to Eigen.
    "ynn_dot_only": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"},
    "ynn_dot_reduce": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"},
    "ynn_dot_eltwise_reduce": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce"},
    "ynn_dot_conv_reduce": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,reduce"},
    "ynn_reduce_only": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=reduce"},
    "ynn_dot_fusion_reduce": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot,reduce"},
    "ynn_conv": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"},
    "onednn": {"XLA_FLAGS": "--xla_cpu_use_onednn=true"},
    "fast_math": {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"},
    "concurrency_sched": {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"},
    "ynn_off_concurrency": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type= "
                                         "--xla_cpu_enable_concurrency_optimized_scheduler=true"},
    "single_thread_eigen": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
    # XLA:CPU's legacy (LLVM IR) fusion emitters instead of the MLIR ones: less compile memory.
    "fusion_emitters_off": {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false"},
    # glibc's mmap threshold at 128 KiB instead of jseg's 1 MiB (runtime.fix_mmap_threshold).
    "mmap_128k": {"JSEG_MMAP_THRESHOLD": "131072"},
    # Convolutions by XLA or by oneDNN through jseg's custom call (jseg.models.conv).
    "conv_xla": {"JSEG_CONV": "xla"},
    "conv_onednn": {"JSEG_CONV": "onednn"},
    # oneDNN's OpenMP threads: sleep instead of spinning when idle / one thread per call.
    "omp_passive": {"JSEG_CONV": "onednn", "OMP_WAIT_POLICY": "passive"},
    "omp1": {"JSEG_CONV": "onednn", "OMP_NUM_THREADS": "1"},
    # How long GNU OpenMP's idle threads spin before sleeping (default 300000 spins).
    "gomp_spin_10k": {"GOMP_SPINCOUNT": "10000"},
    "gomp_spin_100k": {"GOMP_SPINCOUNT": "100000"},
}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="unet")
  p.add_argument("--variants", default="default,ynn_off")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--set", action="append", default=[])
  p.add_argument("--out", default="")
  p.add_argument("--base_tree", default="", help="checkout run by the variant 'base' (PYTHONPATH)")
  a = p.parse_args()
  variants = a.variants.split(",")
  if "base" in variants:
    if not a.base_tree or not os.path.isdir(os.path.join(a.base_tree, "jseg")):
      raise SystemExit("The variant 'base' needs --base_tree=<a checkout with jseg/ in it>.")
    VARIANTS["base"] = {}
  for v in variants:
    if v not in VARIANTS:
      raise SystemExit(f"Unknown variant '{v}'. Variants: {', '.join(VARIANTS)}.")
  report = {"command": " ".join(sys.argv), "variants": {v: VARIANTS[v] for v in variants}, "models": {}}
  for m in a.models.split(","):
    runs = {v: [] for v in variants}
    for r in range(a.rounds):
      for v in variants:
        env = dict(os.environ)
        for k, val in VARIANTS[v].items():
          env[k] = (env.get(k, "") + " " + val).strip() if k == "XLA_FLAGS" else val
        cmd = [sys.executable, "-m", "jseg.bench", "models", "--child", m, "--batch", str(a.batch),
               "--size", str(a.size), "--warmup", "2", "--repeats", str(a.repeats),
               "--threads", str(a.threads)] + [f"--set={s}" for s in a.set]
        # `python -m` puts the working directory first on sys.path: run 'base' inside its tree.
        res = _spawn(cmd, env, 1800, cwd=os.path.abspath(a.base_tree) if v == "base" else None)
        res["loadavg"] = _loadavg()
        runs[v].append(res)
        print(m, v, r, {k: res.get(k) for k in ("step_s", "compile_s", "infer_ms_per_image",
                                                "peak_rss_mb", "error")}, res["loadavg"], flush=True)
    summary = {}
    for v in variants:
      ok = [x for x in runs[v] if "error" not in x]
      if ok:
        summary[v] = {"step_s": min(x["step_s"] for x in ok),
                      "train_images_per_s": round(a.batch / min(x["step_s"] for x in ok), 3),
                      "infer_ms_per_image": min(x["infer_ms_per_image"] for x in ok),
                      "compile_s": min(x["compile_s"] for x in ok),
                      "peak_rss_mb": max(x["peak_rss_mb"] for x in ok)}
    base = summary.get(variants[0])
    for v, s in summary.items():
      if base:
        s["train_speedup"] = round(base["step_s"] / s["step_s"], 3)
        s["infer_speedup"] = round(base["infer_ms_per_image"] / s["infer_ms_per_image"], 3)
      print(f"{m:14s} {v:22s} step {s['step_s']:.3f} s ({s['train_images_per_s']:.2f} img/s, "
            f"x{s.get('train_speedup', 1):.2f}), infer {s['infer_ms_per_image']:.1f} ms "
            f"(x{s.get('infer_speedup', 1):.2f}), compile {s['compile_s']:.1f} s, peak {s['peak_rss_mb']:.0f} MB",
            flush=True)
    report["models"][m] = {"summary": summary, "runs": runs}
  if a.out:
    with open(a.out, "w") as f:
      json.dump(report, f, indent=2)
    print("wrote", a.out)


if __name__ == "__main__":
  main()
