"""Prototype: the initialiser as two programs (model.init, then tx.init) vs one; peaks cold/warm.

  python experiments/performance/split_init_probe.py one|two MODEL CACHE_DIR   # twice: cold, then warm
"""
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mem_stages import status
import jax, jax.numpy as jnp
from jseg import runtime, trainer
from jseg.bench.models import bench_config
from jseg.bench.procstats import reset_peak_rss
runtime.fix_mmap_threshold(); runtime.install_block_cache()
mode, model_name, cache = sys.argv[1], sys.argv[2], sys.argv[3]
runtime.enable_compilation_cache(cache)
jax.devices()
run = trainer.setup(bench_config(model_name, 256, 1, "bench"))
opts = trainer._INIT_COMPILER_OPTIONS.get("cpu", {})
reset_peak_rss(); t0 = time.perf_counter()
if mode == "one":
  with runtime.releasing_free_memory():
    init = run.init_fn.lower(run.init_rng).compile(compiler_options=opts)
  state = jax.block_until_ready(init(run.init_rng)); del init
  params = state.params
else:
  config, model = run.config, run.model
  h, w = config.data.crop_size
  def vinit(rng):
    dummy = jnp.zeros((1, h, w, run.info.channels), jnp.float32)
    p_rng, d_rng = jax.random.split(rng)
    return model.init({"params": p_rng, "dropout": d_rng}, dummy, train=False)
  with runtime.releasing_free_memory():
    f = jax.jit(vinit).lower(run.init_rng).compile(compiler_options=opts)
  variables = jax.block_until_ready(f(run.init_rng)); del f; gc.collect()
  mid = status()
  from jseg import optim
  tx, _ = optim.build_optimizer(config)
  with runtime.releasing_free_memory():
    g = jax.jit(tx.init).lower(variables["params"]).compile(compiler_options=opts)
  opt = jax.block_until_ready(g(variables["params"])); del g; gc.collect()
  params = variables["params"]
  print("after params program", mid)
print(mode, "state", round(time.perf_counter() - t0, 2), "s", status())
import hashlib, numpy as np
hsh = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(params))).hexdigest()[:16]
print("params sha", hsh)
