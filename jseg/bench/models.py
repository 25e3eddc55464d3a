"""Model speed: ``python -m jseg.bench models --models=unet,pspnet --batch=4 --size=256``.

For each model, in a fresh subprocess (so that peak memory is the model's own),
builds the real training setup (``jseg.trainer.setup``: the jitted, donated
training step over the device mesh, two programs unless ``split_update`` is off:
``jseg.trainer.SplitStep``) on synthetic batches and measures:

- ``compile_s``: lowering + XLA compilation of the training step (both programs);
- ``train_images_per_s``: batch / median step time over ``--repeats`` steps,
  after ``--warmup`` steps;
- ``infer_ms_per_image``: median latency of the jitted eval forward
  (``train=False``) at ``--infer_batch`` images over ``--infer_repeats`` calls (20),
  divided by that batch;
- ``params``, ``train_gflops_per_image`` and ``infer_gflops_per_image`` (XLA's
  ``cost_analysis()`` of the compiled executables: every op on CPU, but on GPU
  the convolutions sit in cuDNN calls it does not count);
  ``model_gflops_per_image`` / ``infer_model_gflops_per_image``: convolutions and
  matmuls counted on the jaxpr (``jseg.bench.flops``; the same on every backend);
- ``mfu``: model FLOP/s (``model_gflops_per_image`` x images/s; before
  2026-11-29, XLA's count) over the machine's measured peak (the best of 5
  runs of a 2048x2048 float32 matmul, in JAX and in torch; see ``peak``);
- ``peak_rss_mb``: the process's peak resident memory (``VmHWM``, compilation
  included; the step compiles before the state is initialised, as in a fresh
  ``jseg.train`` run), ``train_peak_rss_mb``: the peak while training steps run (the
  high-water mark is reset after compilation; torch: before its first step),
  ``runtime_rss_mb``, the resident memory once the framework is imported and
  its CPU backend is up (before any model), and ``base_rss_mb`` at start.
  ``after_train_rss_mb``: the resident memory just after the timed steps, split into
  ``anon`` (heap and arrays) and ``file`` (library code paged in: a peak can differ
  between the frameworks by their libraries alone; the table's ``code MB``).
  While and after compiling, the freed compiler memory is handed back to the OS
  (``jseg.runtime.releasing_free_memory``, as the trainer does around its first
  step; ``after_release_rss_mb``). Compilation is cold unless
  ``--compilation_cache=DIR`` is given: a second run with the same folder
  measures a warm start (re-runs and resumes with ``config.compilation_cache_dir``).
  On accelerators ``device_peak_mb`` is added from ``memory_stats()``.

With ``--torch`` (default: on when ``benchmarks/torch_bench.py`` and torch are
present) the same architecture written in plain PyTorch
(``benchmarks/torch_models.py``) is timed the same way in its own subprocess,
right after the jseg one, with the same input size, batch, classes (11), loss
(cross-entropy, ignore 255, aux heads weighted as the config says), SGD with
momentum 0.9 and weight decay 1e-4 on kernels only, and the same CPU cores
(``--threads``: both processes are pinned to that many cores with
``sched_setaffinity``; torch also gets ``set_num_threads``). The table shows
jseg/torch ratios (> 1: jseg faster or smaller). ``--rounds=R`` runs the jseg and torch
processes of each model R times, alternated, and reports medians (with every round's
values under ``per_round`` and every round's ratios under ``round_ratios``): on a shared
machine one run's ratio moves by 20-35% with the load.

``--step_programs=1`` measures jseg's step as one program (``config.split_update=False``)
instead of the trainer's two (gradients, then the optimiser update; same values, lower
compile-memory peak). ``--xla_flags`` appends to ``XLA_FLAGS`` for the jseg processes (the levers
measured in ``experiments/performance/README.md``).

On an accelerator (the peak child reports JAX's backend) the torch side runs on
``cuda`` with ``--amp=bf16`` when ``--set=dtype=bfloat16`` is given (jseg: bf16
compute, float32 parameters and loss), the peak is an 8192^2 matmul in that
dtype, and ``device_peak_mb`` (XLA's ``peak_bytes_in_use``, torch's
``max_memory_allocated``) gives the ``device_memory`` ratio. ``--smp`` adds
segmentation_models.pytorch's network of the same name (default ResNet-34
encoder) as a reference row when smp imports (it needs torchvision): a different
network, so no ratio. ``--deadline_s`` skips the models not started by then
(for leased machines); the JSON is rewritten after each model.

Models are sized by ``--preset``: ``bench`` (default) shrinks each paper
config to a CPU-sized network (``BENCH_PRESETS``); ``paper`` gives the papers'
widths and depths (``PAPER_PRESETS``: U-Net width 64, UNet++ width 32,
ResNet-50 PSPNet, ResNet-101 DeepLab v3, Xception-65 DeepLab v3+), for
accelerators; ``config`` takes ``configs/<name>.py`` as it is. ``--set=field=value`` (repeatable) overrides a
``config.model`` field for every model, e.g. ``--set=width=64``, or with ``config.`` a top-level
training field, e.g. ``--set=config.seed=1``. Not a test: the
figures depend on the machine and its load (the JSON records ``loadavg``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jseg.bench.procstats import cur_rss_mb, reset_peak_rss, rss_mb, rss_parts_mb
from jseg.config import REPO_ROOT, load_config

NUM_CLASSES = 11  # the CamVid metadata the training setup checks the model against
TORCH_RUNNER = REPO_ROOT / "benchmarks" / "torch_bench.py"

# CPU-sized versions of each paper config (the families and layer types are the
# papers'; widths and depths are shrunk so a step takes seconds on 2 cores).
BENCH_PRESETS: dict[str, dict[str, Any]] = {
    # The issue's probe: plain U-Net, width 32, 4 levels, BN, same padding, 2x2 up-conv.
    "unet": {"depth": 4, "width": 32, "padding": "same", "batch_norm": True, "dropout": 0.0},
    "unetpp": {"depth": 4, "width": 16, "batch_norm": True, "deep_supervision": False},
    # configs/pspnet.py is CPU-sized already: ResNet-18 at width 16, output stride 8.
    "pspnet": {},
    "deeplabv3": {"depth": 18, "width": 32, "aspp_features": 64, "eval_output_stride": 16},
    # The CPU-sized run of configs/deeplabv3plus.py's docstring.
    "deeplabv3plus": {"width": 0.125, "middle_blocks": 2, "aspp_features": 32,
                      "decoder_features": 32, "low_level_features": 16},
    # configs/fcn*.py, segnet.py, bayesian_segnet.py and cnn_rnn.py are CPU-sized already.
    "fcn32s": {}, "fcn16s": {}, "fcn8s": {}, "segnet": {}, "bayesian_segnet": {}, "cnn_rnn": {},
    "deeplabv1": {"width": 16, "fc_features": 256},
    "deeplabv2": {"depth": 18, "width": 32},
    "refinenet": {"depth": 18, "width": 32, "features": 64},
    "fastfcn": {"depth": 18, "width": 32, "jpu_features": 64, "head_features": 64, "aux_features": 32},
}

# The papers' network sizes (for accelerators): U-Net (Ronneberger et al.) width 64 with
# BN and same padding, UNet++ (Zhou et al.) width 32, PSPNet ResNet-50 at output stride 8,
# DeepLab v3 ResNet-101 and v3+ Xception-65 at output stride 16 (eval too).
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "unet": {"depth": 5, "width": 64, "padding": "same", "batch_norm": True, "dropout": 0.0},
    "unetpp": {"depth": 4, "width": 32, "batch_norm": True, "deep_supervision": False},
    "pspnet": {"depth": 50, "width": 64, "output_stride": 8, "head_features": 512, "aux_features": 256},
    "deeplabv3": {"depth": 101, "width": 64, "output_stride": 16, "eval_output_stride": 16},
    "deeplabv3plus": {"backbone": "xception65", "width": 1.0, "middle_blocks": 16,
                      "output_stride": 16, "eval_output_stride": 16},
}
PRESETS = {"bench": BENCH_PRESETS, "paper": PAPER_PRESETS, "config": {}}


def bench_config(name: str, size: int, batch: int, preset: str = "bench",
                 overrides: dict[str, Any] | None = None, step_programs: int = 2):
  """The training config benchmarked for model ``name`` (uniform loss/optimiser, synthetic data)."""
  path = REPO_ROOT / "configs" / f"{name}.py"
  if not path.exists():
    known = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py"))
    raise ValueError(f"No config for model '{name}' ({path}). Configs: {', '.join(known)}.")
  if preset not in PRESETS:
    raise ValueError(f"--preset must be one of {', '.join(PRESETS)}; got '{preset}'.")
  c = load_config(str(path))
  for k, v in PRESETS[preset].get(name, {}).items():
    c.model[k] = v
  for k, v in (overrides or {}).items():
    if k.startswith("config."):  # a top-level training field, e.g. config.seed
      if k[len("config."):] not in c:
        raise ValueError(f"--set={k}: the config has no field '{k[len('config.'):]}'.")
      c[k[len("config."):]] = v
    else:
      c.model[k] = v
  c.model.num_classes = NUM_CLASSES
  c.data.name = "camvid"
  c.data.crop_size = (size, size)
  c.batch_size = batch
  c.loss.name = "cross_entropy"
  c.loss.class_weights = None
  c.loss.label_smoothing = 0.0
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "constant"
  c.schedule.warmup_steps = 0
  if step_programs not in (1, 2):
    raise ValueError(f"--step_programs must be 1 or 2; got {step_programs}.")
  c.split_update = step_programs == 2
  return c


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
  import jax
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def _flops(compiled) -> float:
  """XLA's FLOP count of a compiled executable (0 where the backend has none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return 0.0
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def run_jseg(name: str, size: int, batch: int, infer_batch: int, warmup: int, repeats: int,
             preset: str, overrides: dict[str, Any], step_programs: int = 2,
             infer_repeats: int = 0) -> dict[str, Any]:
  """Measures one model in this process (call in a fresh subprocess)."""
  base_rss = rss_mb()
  import jax
  import numpy as np

  from jseg import compiling, parallel, runtime, trainer
  runtime.fix_mmap_threshold()  # as jseg.train does
  runtime.install_block_cache()
  from jseg.bench.flops import jaxpr_flops

  jax.devices()
  import_rss = cur_rss_mb()
  config = bench_config(name, size, batch, preset, overrides, step_programs)
  t0 = time.perf_counter()
  run = trainer.setup(config)
  setup_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal((batch, size, size, 3), np.float32),
          "label": rng.integers(0, NUM_CLASSES, (batch, size, size)).astype(np.int32)}
  b = parallel.shard_batch(host, run.mesh)
  # As a fresh training run does: the step compiles before the state exists.
  abstract = run.abstract_state()
  t0 = time.perf_counter()
  with runtime.releasing_free_memory():
    step = run.step_fn.lower(abstract, b, run.step_rng).compile()
  compile_s = time.perf_counter() - t0
  # XLA counts custom calls as 0 FLOPs: add those of the oneDNN convolutions.
  step_jaxpr = jax.make_jaxpr(run.step_fn)(abstract, b, run.step_rng).jaxpr
  train_flops = _flops(step) + jaxpr_flops(step_jaxpr, custom_calls_only=True)
  model_flops = jaxpr_flops(step_jaxpr)
  del step_jaxpr  # not kept alive through the measured steps
  t0 = time.perf_counter()
  state = jax.block_until_ready(run.state)
  init_s = setup_s + time.perf_counter() - t0

  def one_step():
    nonlocal state
    state, metrics = step(state, b, run.step_rng)
    return metrics["loss"]

  compile_rss = rss_mb()
  runtime.release_free_memory()  # as the trainer does after its first step
  release_rss = cur_rss_mb()
  reset = reset_peak_rss()
  for _ in range(warmup):
    loss = float(one_step())
  if not np.isfinite(loss):
    raise RuntimeError(f"{name}: the training loss is not finite ({loss}).")
  step_s, step_times = _median_time(one_step, repeats)
  train_rss = rss_mb() if reset else None
  train_parts = rss_parts_mb()
  # One more step before inference, as torch_bench.py runs its FLOP-counted step there; a
  # step after inference would add the inference program's memory to the training peak.
  final_loss = float(one_step())

  model = run.model
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  variables = trainer.variables(state.params, state.batch_stats)
  x = jax.device_put(host["image"][:1].repeat(infer_batch, 0))
  t0 = time.perf_counter()
  with runtime.releasing_free_memory():  # XLA options as jseg.evaluate's forward
    infer = apply.lower(variables, x).compile(
        **compiling.compile_kwargs(trainer.eval_compiler_options(config)))
  infer_compile_s = time.perf_counter() - t0
  infer_jaxpr = jax.make_jaxpr(apply)(variables, x).jaxpr
  infer_flops = _flops(infer) + jaxpr_flops(infer_jaxpr, custom_calls_only=True)
  infer_model_flops = jaxpr_flops(infer_jaxpr)
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(infer(variables, x))
  infer_s, infer_times = _median_time(lambda: infer(variables, x), infer_repeats or repeats)
  out = {
      "framework": "jseg", "model": name,
      "model_config": json.loads(config.model.to_json_best_effort()),
      "step_programs": step_programs,
      "params": int(sum(p.size for p in jax.tree_util.tree_leaves(state.params))),
      "init_s": round(init_s, 3), "compile_s": round(compile_s, 3),
      "infer_compile_s": round(infer_compile_s, 3),
      "step_s": round(step_s, 4), "step_times_s": [round(t, 4) for t in step_times],
      "train_images_per_s": round(batch / step_s, 3),
      "infer_ms_per_image": round(1e3 * infer_s / infer_batch, 3),
      "infer_calls": len(infer_times),
      "train_gflops_per_image": round(train_flops / batch / 1e9, 3),
      "infer_gflops_per_image": round(infer_flops / infer_batch / 1e9, 3),
      "model_gflops_per_image": round(model_flops / batch / 1e9, 3),
      "infer_model_gflops_per_image": round(infer_model_flops / infer_batch / 1e9, 3),
      "final_loss": round(final_loss, 4),
      "base_rss_mb": round(base_rss, 1), "runtime_rss_mb": round(import_rss, 1),
      "compile_peak_rss_mb": round(compile_rss, 1),
      "after_release_rss_mb": round(release_rss, 1),
      "compilation_cache": jax.config.jax_compilation_cache_dir or "",
      "train_peak_rss_mb": round(train_rss, 1) if train_rss else None,
      "after_train_rss_mb": train_parts,
      "peak_rss_mb": round(max(rss_mb(), compile_rss), 1),
      "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "conv": _conv_backend(),
      "batchnorm": _bn_backend(),
      "loss_end": _loss_backend(),
      "pool_backward": _pool_backend(),
  }
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    out["device_peak_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  return out


def _conv_backend() -> str:
  """Which convolutions the measured step used: "onednn" or "xla" (``jseg.models.conv``)."""
  from jseg.models.conv import onednn_active  # noqa: PLC0415

  return "onednn" if onednn_active() else "xla"


def _bn_backend() -> str:
  """Which BatchNorm training kernels the step used: "native" or "xla" (``jseg.models.norm``)."""
  from jseg.models.norm import bn_native_active  # noqa: PLC0415

  return "native" if bn_native_active() else "xla"


def _loss_backend() -> str:
  """Where the step's class log-probabilities ran: "native" or "xla" (``jseg.losses``)."""
  from jseg.losses import loss_native_active  # noqa: PLC0415

  return "native" if loss_native_active() else "xla"


def _pool_backend() -> str:
  """Where the stride-1 max pools' backward ran: "native" or "xla" (``jseg.models.layers``)."""
  from jseg.models.layers import pool_native_active  # noqa: PLC0415

  return "native" if pool_native_active() else "xla"


def _best_time(fn, repeats: int, min_s: float) -> float:
  """Fastest of ``repeats`` calls, after calling for ``min_s`` seconds first (the cores
  clock up under load: a cold 5-run probe read 377 GFLOP/s on an EPYC whose matmul then ran
  at 480)."""
  import jax
  t_end = time.perf_counter() + min_s
  jax.block_until_ready(fn())
  while time.perf_counter() < t_end:
    jax.block_until_ready(fn())
  return min(_median_time(fn, 1)[0] for _ in range(repeats))


def measure_peak_jax(n: int = 2048, repeats: int = 5, dtype: str = "float32",
                     min_s: float = 1.0) -> float:
  """Best GFLOP/s of a jitted n x n matmul (the machine's practical peak in that dtype)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: a @ b)
  return 2 * n**3 / _best_time(lambda: f(a, a), repeats, min_s) / 1e9


def measure_peak_conv(repeats: int = 5, min_s: float = 1.0) -> float | None:
  """Best GFLOP/s of jseg's 3x3 convolution 4x64x64x256 -> 256 (forward), or None where it
  is not oneDNN's. On a CPU the networks' convolutions can run faster than XLA's matmul
  (AMD EPYC Zen 5: 508 vs 480 GFLOP/s), so the peak is the better of the two: MFU over the
  matmul alone read above 100% there."""
  import jax
  import jax.numpy as jnp

  from jseg.models import conv
  if jax.default_backend() != "cpu" or not conv.onednn_active():
    return None
  x = jax.random.normal(jax.random.key(0), (4, 64, 64, 256), jnp.float32)
  k = jax.random.normal(jax.random.key(1), (3, 3, 256, 256), jnp.float32)
  f = jax.jit(lambda x, k: conv.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return 2 * 4 * 64 * 64 * 256 * 256 * 9 / _best_time(lambda: f(x, k), repeats, min_s) / 1e9


def _pin(threads: int) -> None:
  if threads and hasattr(os, "sched_setaffinity"):
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
      raise ValueError(f"--threads={threads} but only {len(cpus)} CPUs are available to this process.")
    os.sched_setaffinity(0, cpus[:threads])


def _child(args) -> None:
  _pin(args.threads)
  if args.child == "peak":
    import jax
    backend = jax.default_backend()
    n = 2048 if backend == "cpu" else 8192
    out = {"framework": "jseg", "backend": backend, "dtype": args.peak_dtype, "n": n,
           "peak_gflops": round(measure_peak_jax(n, dtype=args.peak_dtype), 2)}
    conv_gflops = measure_peak_conv() if args.peak_dtype == "float32" else None
    if conv_gflops:
      out["conv_gflops"] = round(conv_gflops, 2)
  else:
    out = run_jseg(args.child, args.size, args.batch, args.infer_batch, args.warmup, args.repeats,
                   args.preset, _parse_sets(args.set), args.step_programs, args.infer_repeats)
  print("RESULT " + json.dumps(out), flush=True)


def _parse_sets(items: list[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set expects field=value (a config.model field, or config.<field>); "
                       f"got '{item}'.")
    k, v = item.split("=", 1)
    try:
      out[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k] = v
  return out


def _spawn(cmd: list[str], env: dict[str, str], timeout: float, cwd: str | None = None) -> dict[str, Any]:
  """Runs a benchmark subprocess (in ``cwd``, if given) and returns its RESULT (or the error)."""
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s: {' '.join(cmd)}"}
  for line in reversed(p.stdout.splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
  return {"error": f"exit {p.returncode}: " + " | ".join(tail)}


MEDIAN_KEYS = ("train_images_per_s", "infer_ms_per_image", "step_s", "compile_s", "init_s",
               "peak_rss_mb", "train_peak_rss_mb", "device_peak_mb")


def median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
  """One framework's result over ``--rounds`` processes: the first successful round's
  record with the timings and memory in ``MEDIAN_KEYS`` replaced by their medians, and
  every round's values kept under ``per_round``. One round: returned as it is."""
  ok = [r for r in results if "error" not in r]
  if len(results) == 1 or not ok:
    return results[0]
  out = dict(ok[0])
  out["per_round"] = {k: [r.get(k) for r in ok] for k in MEDIAN_KEYS if k in ok[0]}
  for k, vals in out["per_round"].items():
    nums = [v for v in vals if isinstance(v, (int, float))]
    if nums:
      out[k] = round(statistics.median(nums), 4)
  out["rounds"] = len(ok)
  if len(ok) < len(results):
    out["failed_rounds"] = [r["error"] for r in results if "error" in r]
  return out


def _ratios(j: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
  """jseg / torch ratios, each oriented so that above 1 means jseg is better."""
  return {"train": _ratio(j["train_images_per_s"], t["train_images_per_s"]),
          "infer": _ratio(j["infer_ms_per_image"], t["infer_ms_per_image"], False),
          "memory": _ratio(j["peak_rss_mb"], t["peak_rss_mb"], False),
          "train_memory": _ratio(j.get("train_peak_rss_mb"), t.get("train_peak_rss_mb"), False),
          "compile": _ratio(j["compile_s"], t.get("compile_s"), False)}


def _loadavg() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def _fmt(v: Any, spec: str) -> str:
  return format(v, spec) if isinstance(v, (int, float)) else "-"


def _ratio(a: Any, b: Any, higher_better: bool = True) -> float | None:
  if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not a or not b:
    return None
  return round(a / b if higher_better else b / a, 3)


def print_table(rows: list[dict[str, Any]]) -> None:
  head = (f"{'model':14s} {'fw':5s} {'params':>9s} {'GF/img':>7s} {'compile s':>9s} {'train img/s':>11s} "
          f"{'infer ms/img':>12s} {'MFU %':>6s} {'peak MB':>8s} {'train MB':>8s} {'code MB':>7s}")
  print(head)
  print("-" * len(head))
  for r in rows:
    if r.get("skipped"):
      print(f"{r['model']:14s} skipped ({r['skipped']})")
    for fw in ("jseg", "torch", "smp"):
      m = r.get(fw)
      if not m:
        continue
      if "error" in m:
        print(f"{r['model']:14s} {fw:5s} ERROR {m['error']}")
        continue
      gf = m.get("model_gflops_per_image", m.get("torch_gflops_per_image"))
      print(f"{r['model']:14s} {fw:5s} {m['params']:>9d} {_fmt(gf, '7.2f')} "
            f"{_fmt(m.get('compile_s'), '9.1f')} {_fmt(m['train_images_per_s'], '11.2f')} "
            f"{_fmt(m['infer_ms_per_image'], '12.1f')} "
            f"{_fmt(100 * (m.get('mfu') or m.get('mfu_own_flops') or 0), '6.1f')} "
            f"{_fmt(m.get('device_peak_mb', m['peak_rss_mb']), '8.0f')} "
            f"{_fmt(m.get('train_peak_rss_mb'), '8.0f')} "
            f"{_fmt((m.get('after_train_rss_mb') or {}).get('file'), '7.0f')}")
    if r.get("ratio"):
      q = r["ratio"]
      print(f"{r['model']:14s} {'j/t':5s} {'':>9s} {'':>7s} {'':>9s} {_fmt(q['train'], '10.2f')}x "
            f"{_fmt(q['infer'], '11.2f')}x {'':>6s} {_fmt(q.get('device_memory', q['memory']), '7.2f')}x {_fmt(q.get('train_memory'), '7.2f')}x")
    if r.get("round_ratios"):
      each = lambda k: "/".join(_fmt(x.get(k), ".2f") for x in r["round_ratios"])
      print(f"{r['model']:14s} rounds: train j/t {each('train')}, infer j/t {each('infer')}, "
            f"peak mem j/t {each('memory')}")


def main(argv: list[str]) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog="python -m jseg.bench models", description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="unet,unetpp,pspnet,deeplabv3,deeplabv3plus")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--infer_batch", type=int, default=1)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--infer_repeats", type=int, default=20,
                      help="timed inference calls per model and framework (their median; "
                           "0: --repeats). A call is 10-150 ms here, so 20 cost little and "
                           "steady the median on a shared machine")
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--preset", default="bench", choices=tuple(PRESETS))
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--torch", default="auto", choices=("auto", "yes", "no"))
  parser.add_argument("--jseg", default="yes", choices=("yes", "no"),
                      help="no: time only the torch side (and smp), e.g. a second torch setting")
  parser.add_argument("--channels_last", action="store_true", help="torch side in channels_last")
  parser.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS for the jseg processes")
  parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
  parser.add_argument("--peak_gflops", type=float, default=0.0,
                      help="the machine's peak GFLOP/s for MFU (default: measured by a matmul)")
  parser.add_argument("--compilation_cache", default="",
                      help="XLA compilation cache folder for the jseg processes (a second run "
                           "with the same folder measures a warm start); default: none")
  parser.add_argument("--torch_device", default="auto",
                      help="device of the torch side: auto (cuda when JAX's backend is gpu), cpu, cuda")
  parser.add_argument("--smp", default="no", choices=("auto", "yes", "no"),
                      help="add segmentation_models.pytorch's model of the same name (reference row)")
  parser.add_argument("--deadline_s", type=float, default=0.0,
                      help="start no model after this many seconds (0: no deadline)")
  parser.add_argument("--rounds", type=int, default=1,
                      help="run each model's jseg and torch processes this many times, alternated; "
                           "report medians and every round's ratios (this machine's load swings "
                           "single-run ratios by 20-35%%)")
  parser.add_argument("--step_programs", type=int, default=2, choices=(1, 2),
                      help="jseg's training step as 2 programs (gradients, then the update: "
                           "config.split_update, the trainer's default) or as 1")
  parser.add_argument("--out", default="")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--peak_dtype", default="float32", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    _child(args)
    return {}

  from jseg.registry import MODELS
  import jseg.models  # noqa: F401  (fills the registry)
  started = time.perf_counter()
  names = [m for m in args.models.split(",") if m]
  sets = _parse_sets(args.set)
  for m in names:
    MODELS.get(m)  # unknown names raise, listing the valid ones
    bench_config(m, args.size, args.batch, args.preset, sets)
  use_torch = args.torch == "yes" or (args.torch == "auto" and TORCH_RUNNER.exists() and _has_torch())
  use_smp = args.smp == "yes" or (args.smp == "auto" and TORCH_RUNNER.exists()
                                  and _has_module("segmentation_models_pytorch"))
  bf16 = str(sets.get("dtype", "float32")) in ("bfloat16", "bf16", "jnp.bfloat16")
  peak_dtype = "bfloat16" if bf16 else "float32"
  if args.torch == "yes" and not TORCH_RUNNER.exists():
    raise SystemExit(f"--torch=yes needs {TORCH_RUNNER} (a source checkout of jseg).")
  env = dict(os.environ)
  if args.xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # cold compiles unless asked for
  if args.compilation_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = str(Path(args.compilation_cache).expanduser())
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")  # as jseg.runtime
  common = ["--batch", str(args.batch), "--size", str(args.size), "--infer_batch", str(args.infer_batch),
            "--warmup", str(args.warmup), "--repeats", str(args.repeats),
            "--infer_repeats", str(args.infer_repeats), "--threads", str(args.threads)]
  me = [sys.executable, "-m", "jseg.bench", "models"]

  peak = {}
  backend = "cpu"
  if not args.peak_gflops:
    jp = _spawn(me + ["--child", "peak", "--threads", str(args.threads), "--peak_dtype", peak_dtype], env, 600)
    peak["jax_gflops"], backend = jp.get("peak_gflops"), jp.get("backend", "cpu")
    peak["matmul"] = f"{jp.get('n')}^2 {peak_dtype} on {backend}"
    if jp.get("conv_gflops"):
      peak["jax_conv_gflops"] = jp["conv_gflops"]
  if args.peak_gflops and args.torch_device == "auto" and (use_torch or use_smp):
    backend = _jax_backend(env)
  torch_device = args.torch_device if args.torch_device != "auto" else ("cuda" if backend == "gpu" else "cpu")
  torch_args = ["--device", torch_device] + (["--amp", "bf16"] if bf16 else [])
  if (use_torch or use_smp) and not args.peak_gflops:
    n = "2048" if torch_device == "cpu" else "8192"
    peak["torch_gflops"] = _spawn([sys.executable, str(TORCH_RUNNER), "--peak", "--threads", str(args.threads),
                                   "--device", torch_device, "--peak_n", n, "--peak_dtype", peak_dtype],
                                  env, 600).get("peak_gflops")
  best = max((v for v in peak.values() if isinstance(v, (int, float))), default=None)
  if args.peak_gflops:
    best = args.peak_gflops
  peak.update(best_gflops=best, how="best of 5 runs, after 1 s of warm-up, of an n x n matmul (2048 "
                                    "float32 on CPU, 8192 in the benchmark's dtype on accelerators; "
                                    "jax.jit and torch.mm) and, on CPU, of jseg's oneDNN 3x3 "
                                    f"convolution 4x64x64x256->256; {args.threads} threads; "
                                    "or --peak_gflops")
  print(f"peak: {peak}", flush=True)

  rows = []
  for m in names:
    row = {"model": m, "loadavg_before": _loadavg()}
    if args.deadline_s and time.perf_counter() - started > args.deadline_s:
      row["skipped"] = f"not started: past --deadline_s={args.deadline_s:g}"
      print(f"{m}: {row['skipped']}", flush=True)
      rows.append(row)
      continue
    set_args = [f"--set={s}" for s in args.set]
    per_round: dict[str, list[dict[str, Any]]] = {}
    for _ in range(max(1, args.rounds)):
      spec = None
      if args.jseg == "yes":
        res = _spawn(me + ["--child", m, "--preset", args.preset, "--step_programs", str(args.step_programs)]
                     + set_args + common, env, args.timeout)
        per_round.setdefault("jseg", []).append(res)
        model_config = res.get("model_config")
      else:  # torch side only (e.g. a second torch setting on a leased machine)
        model_config = json.loads(bench_config(m, args.size, args.batch, args.preset, sets)
                                  .model.to_json_best_effort())
      if model_config:
        spec = json.dumps({"model": m, "model_config": model_config,
                           "aux_weight": float(load_config(str(REPO_ROOT / "configs" / f"{m}.py")).loss.aux_weight)})
      if use_torch and spec:
        cmd = [sys.executable, str(TORCH_RUNNER), "--spec", spec] + common + torch_args
        per_round.setdefault("torch", []).append(
            _spawn(cmd + (["--channels_last"] if args.channels_last else []), env, args.timeout))
      if use_smp and spec:
        cmd = [sys.executable, str(TORCH_RUNNER), "--smp", "--spec", spec] + common + torch_args
        per_round.setdefault("smp", []).append(
            _spawn(cmd + (["--channels_last"] if args.channels_last else []), env, args.timeout))
    for fw, results in per_round.items():
      row[fw] = median_result(results)
    if args.rounds > 1 and "jseg" in per_round and "torch" in per_round:
      row["round_ratios"] = [_ratios(j, t) for j, t in zip(per_round["jseg"], per_round["torch"])
                             if "error" not in j and "error" not in t]
    if "smp" in row and "error" not in row["smp"]:
      row["smp"]["mfu_own_flops"] = (round(row["smp"]["torch_gflops_per_image"] * row["smp"]["train_images_per_s"]
                                           / best, 4) if best else None)
    for fw in ("jseg", "torch"):
      r = row.get(fw)
      if r and "error" not in r and best and "jseg" in row:
        gf = row["jseg"].get("model_gflops_per_image", 0.0)  # the same network: one count for both
        r["mfu"] = round(gf * r["train_images_per_s"] / best, 4)
    if ("torch" in row and "jseg" in row and "error" not in row["torch"]
        and "error" not in row["jseg"]):
      j, t = row["jseg"], row["torch"]
      row["ratio"] = _ratios(j, t)
      if j.get("device_peak_mb") and t.get("device_peak_mb"):
        row["ratio"]["device_memory"] = _ratio(j["device_peak_mb"], t["device_peak_mb"], False)
      if j["params"] != t["params"]:
        row["params_mismatch"] = f"jseg {j['params']} vs torch {t['params']}"
        print(f"WARNING {m}: parameter counts differ ({row['params_mismatch']}).", flush=True)
    row["loadavg_after"] = _loadavg()
    rows.append(row)
    print_table([row])
    if args.out:  # rewritten after each model: a run cut short keeps what it measured
      Path(args.out).write_text(json.dumps(_report(args, argv, env, peak, rows, torch_device), indent=2))
  report = _report(args, argv, env, peak, rows, torch_device)
  print()
  print_table(rows)
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
  return report


def _report(args, argv, env, peak, rows, torch_device) -> dict[str, Any]:
  return {
      "suite": "models",
      "command": "python -m jseg.bench models " + " ".join(argv),
      "settings": {"batch": args.batch, "size": args.size, "infer_batch": args.infer_batch,
                   "rounds": args.rounds, "step_programs": args.step_programs,
                   "warmup": args.warmup, "repeats": args.repeats,
                   "infer_repeats": args.infer_repeats or args.repeats, "threads": args.threads,
                   "preset": args.preset, "set": args.set, "num_classes": NUM_CLASSES,
                   "optimizer": "sgd momentum 0.9, weight decay 1e-4 on kernels, lr 0.01",
                   "loss": "cross-entropy (ignore 255) + aux_weight * aux heads",
                   "torch_channels_last": args.channels_last, "torch_device": torch_device,
                   "xla_flags": env.get("XLA_FLAGS", "")},
      "peak": peak,
      "results": rows,
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": _cpu_name(),
                  "python": platform.python_version(), "isa_caps": _isa_caps(env)},
  }


# Variables that cap the instruction set oneDNN, ATen, MKL or XLA use (an AVX-512 machine
# can run as an AVX2 one with them); recorded so a capped run is never read as uncapped.
ISA_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                "MKL_ENABLE_INSTRUCTIONS")


def _isa_caps(env: dict[str, str]) -> dict[str, str]:
  """The instruction-set caps in ``env`` (and XLA's ``--xla_cpu_max_isa``), if any."""
  caps = {k: env[k] for k in ISA_CAP_VARS if env.get(k)}
  for flag in env.get("XLA_FLAGS", "").split():
    if flag.startswith("--xla_cpu_max_isa="):
      caps["xla_cpu_max_isa"] = flag.split("=", 1)[1]
  return caps


def _jax_backend(env: dict[str, str]) -> str:
  """JAX's default backend, asked of a child process (the parent keeps no backend)."""
  p = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                     capture_output=True, text=True, env=env)
  return p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else "cpu"


def _has_torch() -> bool:
  return _has_module("torch")


def _has_module(name: str) -> bool:
  """Whether ``name`` imports (smp needs torchvision at import time, so a spec is not enough)."""
  import importlib.util
  if importlib.util.find_spec(name) is None:
    return False
  if name == "torch":
    return True
  p = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True)
  return p.returncode == 0


def _cpu_name() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()
