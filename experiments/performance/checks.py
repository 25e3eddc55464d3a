"""Checks of the training loop's own levers on the U-Net benchmark model.

  python experiments/performance/checks.py recompile   # does the jitted step recompile across steps?
  python experiments/performance/checks.py transfer    # host->device cost of one batch (what prefetching could hide)
  python experiments/performance/checks.py remat       # jax.checkpoint on every U-Net level: time and peak memory
  python experiments/performance/checks.py donate      # the step with and without donated state: time and peak memory
  python experiments/performance/checks.py bn --model=pspnet   # flax BatchNorm vs a closed-form-VJP BatchNorm
  python experiments/performance/checks.py conv --model=pspnet     # jseg.models.conv.Conv (row-stacked kernel grad) for every nn.Conv
  python experiments/performance/checks.py release --model=pspnet  # malloc_trim after compiling: resident memory
  python experiments/performance/checks.py cache --model=pspnet    # persistent compilation cache: cold vs warm start

Each prints one ``RESULT {json}`` line. ``remat``, ``donate`` and ``bn`` run each variant in
its own subprocess (peak memory is per process) and alternate them ``--rounds`` times.
Settings are the benchmark's (``jseg.bench.models.bench_config``: batch 4, 256x256,
SGD momentum); XLA_FLAGS from the environment apply.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time


def closed_form_batch_norm():
  """A drop-in ``flax.linen.BatchNorm`` whose training-mode VJP is written out.

  Same parameters (``scale``, ``bias``) and statistics (``mean``, ``var``) as flax's;
  the backward pass is the closed form torch uses,
  ``dx = scale/sigma * (g - mean(g) - xhat * mean(g * xhat))``, two reductions and
  one elementwise pass, instead of the autodiff of flax's statistics.
  """
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  @jax.custom_vjp
  def bn_train(x, scale, bias, eps):
    return _fwd(x, scale, bias, eps)[0]

  def _fwd(x, scale, bias, eps):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = jnp.square(x - mean).mean(axes)
    inv = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * inv
    return (xhat * scale + bias, mean, var), (xhat, inv, scale)

  def _bwd(res, cts):
    xhat, inv, scale = res
    g = cts[0]  # the statistics feed only batch_stats, never the loss
    axes = tuple(range(g.ndim - 1))
    dbias = g.sum(axes)
    dscale = (g * xhat).sum(axes)
    m = g.size // g.shape[-1]
    dx = (scale * inv) * (g - (dbias + xhat * dscale) / m)
    return dx, dscale, dbias, None

  bn_train.defvjp(_fwd, _bwd)

  from jseg.models import norm

  class BatchNorm(norm.BatchNorm):  # the same fields (flax's BatchNorm API); only the maths differ
    @nn.compact
    def __call__(self, x, use_running_average=None):
      use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
      c = x.shape[-1]
      scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
      bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
      ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
      ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
      if use_ra:
        return (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon) * scale + bias
      y, mean, var = bn_train(x, scale, bias, self.epsilon)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jax.lax.stop_gradient(mean)
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jax.lax.stop_gradient(var)
      return y

  return BatchNorm


def _setup(model: str, batch: int, size: int, remat: bool = False, donate: bool = True,
           bn_closed_form: bool = False, stacked_conv: bool = False, preset: str = "bench"):
  import jax
  import numpy as np
  from flax import linen as nn

  if stacked_conv:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import stacked_conv as conv_lib
    nn.Conv = conv_lib.Conv  # every jseg model looks it up as nn.Conv at call time
  if bn_closed_form:
    from jseg.models import fastfcn, layers, segnet, unet
    from jseg.models.backbones import mobilenet, resnet, vgg, xception
    bn = closed_form_batch_norm()
    for m in (fastfcn, layers, segnet, unet, mobilenet, resnet, vgg, xception):
      m.BatchNorm = bn  # every module that builds BatchNorm layers looks the name up at call time

  from jseg import parallel, trainer
  from jseg.bench.models import bench_config
  if remat:
    import jseg.models.unet as unet_mod
    unet_mod.DoubleConv = nn.remat(unet_mod.DoubleConv, static_argnums=(2,))
  config = bench_config(model, size, batch, preset)
  run = trainer.setup(config)
  if not donate:
    from jseg import losses
    repl = parallel.replicated(run.mesh)
    run.step_fn = jax.jit(functools.partial(trainer.train_step, loss_fn=losses.build_loss(config)),
                          in_shardings=(repl, parallel.batch_sharded(run.mesh), repl),
                          out_shardings=(repl, repl))
  rng = np.random.default_rng(0)

  def host_batch():
    return {"image": rng.standard_normal((batch, size, size, 3), np.float32),
            "label": rng.integers(0, 11, (batch, size, size)).astype(np.int32)}
  return run, host_batch


def recompile(a):
  import jax
  from jseg import parallel
  run, host_batch = _setup(a.model, a.batch, a.size)
  state = run.state
  sizes = []
  for _ in range(3):
    b = parallel.shard_batch(host_batch(), run.mesh)
    state, m = run.step_fn(state, b, run.step_rng)
    jax.block_until_ready(m["loss"])
    sizes.append(run.step_fn._cache_size())
  return {"jit_cache_size_after_each_step": sizes}


def transfer(a):
  import jax
  from jseg import parallel
  run, host_batch = _setup(a.model, a.batch, a.size)
  hb = host_batch()
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(parallel.shard_batch(hb, run.mesh))
    times.append(time.perf_counter() - t0)
  mb = sum(v.nbytes for v in hb.values()) / 2**20
  return {"batch_mb": round(mb, 1), "shard_batch_ms_median": round(1e3 * statistics.median(times), 2)}


def one_variant(a):
  """Time and peak memory of the step in this process (remat/donate switches)."""
  import jax
  from jseg import parallel
  from jseg.bench.procstats import rss_mb
  run, host_batch = _setup(a.model, a.batch, a.size, remat=a.remat, donate=not a.no_donate,
                           bn_closed_form=a.bn_closed_form, stacked_conv=a.stacked_conv)
  b = parallel.shard_batch(host_batch(), run.mesh)
  state = run.state
  for _ in range(2):
    state, m = run.step_fn(state, b, run.step_rng)
    jax.block_until_ready(m["loss"])
  times = []
  for _ in range(a.repeats):
    t0 = time.perf_counter()
    state, m = run.step_fn(state, b, run.step_rng)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  return {"step_s": round(statistics.median(times), 4), "peak_rss_mb": round(rss_mb(), 1)}


def startup(a):
  """One process: init, compile, (release,) train; time and resident memory at each stage."""
  import jax
  if a.cache_dir:
    jax.config.update("jax_compilation_cache_dir", a.cache_dir)
  from jseg import parallel, runtime
  from jseg.bench.procstats import cur_rss_mb, reset_peak_rss, rss_mb
  jax.devices()
  out = {"runtime_rss_mb": round(cur_rss_mb(), 1)}
  t0 = time.perf_counter()
  run, host_batch = _setup(a.model, a.batch, a.size)
  jax.block_until_ready(run.state)
  out["init_s"] = round(time.perf_counter() - t0, 3)
  out["after_init_rss_mb"] = round(cur_rss_mb(), 1)
  b = parallel.shard_batch(host_batch(), run.mesh)
  t0 = time.perf_counter()
  step = run.step_fn.lower(run.state, b, run.step_rng).compile()
  out["compile_s"] = round(time.perf_counter() - t0, 3)
  out["after_compile_rss_mb"] = round(cur_rss_mb(), 1)
  out["peak_through_compile_mb"] = round(rss_mb(), 1)
  if a.release:
    runtime.release_free_memory()
    out["after_release_rss_mb"] = round(cur_rss_mb(), 1)
  reset_peak_rss()
  state, times = run.state, []
  for _ in range(2 + a.repeats):
    t0 = time.perf_counter()
    state, m = step(state, b, run.step_rng)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  out["step_s"] = round(statistics.median(times[2:]), 4)
  out["train_peak_rss_mb"] = round(rss_mb(), 1)
  out["loss_after_steps"] = float(m["loss"])
  return out


def ab(a, variants, child="one"):
  out = {v: [] for v in variants}
  for _ in range(a.rounds):
    for v, extra in variants.items():
      cmd = [sys.executable, __file__, child, "--model", a.model, "--batch", str(a.batch),
             "--size", str(a.size), "--repeats", str(a.repeats)] + extra
      r = subprocess.run(cmd, capture_output=True, text=True)
      line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
      res = json.loads(line[-1][7:]) if line else {"error": r.stderr.strip().splitlines()[-3:]}
      res["loadavg"] = [round(x, 2) for x in os.getloadavg()]
      out[v].append(res)
      print(v, res, flush=True)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=("recompile", "transfer", "remat", "donate", "bn", "conv", "release",
                                   "cache", "one", "startup"))
  p.add_argument("--model", default="unet")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--no_donate", action="store_true")
  p.add_argument("--bn_closed_form", action="store_true")
  p.add_argument("--release", action="store_true")
  p.add_argument("--stacked_conv", action="store_true")
  p.add_argument("--cache_dir", default="")
  a = p.parse_args()
  if a.what == "recompile":
    out = recompile(a)
  elif a.what == "transfer":
    out = transfer(a)
  elif a.what == "one":
    out = one_variant(a)
  elif a.what == "startup":
    out = startup(a)
  elif a.what == "release":
    out = ab(a, {"kept": [], "released": ["--release"]}, child="startup")
  elif a.what == "cache":
    import tempfile
    cache = tempfile.mkdtemp(prefix="jseg_cache_check_")
    a.rounds = 1  # cold (fills the empty cache), then warm (reads it)
    out = ab(a, {"cold": ["--cache_dir", cache, "--release"], "warm": ["--cache_dir", cache, "--release"]},
             child="startup")
  elif a.what == "remat":
    out = ab(a, {"plain": [], "remat": ["--remat"]})
  elif a.what == "bn":
    out = ab(a, {"flax_bn": [], "closed_form_bn": ["--bn_closed_form"]})
  elif a.what == "conv":
    out = ab(a, {"xla_conv": [], "stacked_conv": ["--stacked_conv"]})
  else:
    out = ab(a, {"donated": [], "not_donated": ["--no_donate"]})
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
