"""Compile peak and call of one inference forward (bench preset, batch 1, SIZE²), with
XLA:CPU's MLIR fusion emitters or the older ones (``config.eval_fusion_emitters``).

  python experiments/performance/eval_compile_probe.py MODEL SIZE on|off
"""
import sys, time
import jax, numpy as np
from jseg import compiling, runtime, trainer
from jseg.bench.models import bench_config
from jseg.bench.procstats import reset_peak_rss, rss_mb, cur_rss_mb
runtime.fix_mmap_threshold(); runtime.install_block_cache()
model_name, size, off = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "off"
run = trainer.setup(bench_config(model_name, 256, 1, "bench"))
v = trainer.variables(run.state.params, run.state.batch_stats)
runtime.release_free_memory()
x = jax.device_put(np.zeros((1, size, size, 3), np.float32))
apply = jax.jit(lambda v, x: run.model.apply(v, x, train=False)[0])
before = cur_rss_mb(); reset_peak_rss(); t = time.perf_counter()
with runtime.releasing_free_memory():
  f = apply.lower(v, x).compile(**compiling.compile_kwargs(compiling.FUSION_EMITTERS_OFF if off else None))
cs = time.perf_counter() - t; peak_c = rss_mb()
jax.block_until_ready(f(v, x)); t = time.perf_counter()
for _ in range(3): jax.block_until_ready(f(v, x))
print(f"{model_name} {size} emitters_off={off} before={before:.0f} compile_peak={peak_c:.0f} run_peak={rss_mb():.0f} compile_s={cs:.1f} call_ms={(time.perf_counter()-t)/3*1e3:.0f}")
