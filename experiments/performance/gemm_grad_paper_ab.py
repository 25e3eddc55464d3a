"""One network's training step (the bench's paper preset) compiled twice, kernel gradients
on oneDNN's GEMM (``JSEG_CONV_GEMM_GRAD=onednn``) and on XLA's convolution (the default),
timed alternately one step each per round; prints (median, min) ms and XLA temporaries.

  python experiments/performance/gemm_grad_paper_ab.py pspnet 256 4 9   # model size batch rounds
"""
import os, sys, time, statistics, functools
import jax, numpy as np
from jseg.bench.models import bench_config
from jseg import trainer, parallel, losses
name, size, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = bench_config(name, size, batch, preset="paper")
run = trainer.setup(c)
loss_fn = losses.build_loss(c)
rs = np.random.RandomState(0)
b = parallel.shard_batch({"image": rs.randn(batch, size, size, 3).astype(np.float32), "label": rs.randint(0, 11, (batch, size, size)).astype(np.int32)}, run.mesh)
args = (run.state, b, run.step_rng)
fns = {}
for mode in ("onednn", "xla"):
  os.environ["JSEG_CONV_GEMM_GRAD"] = mode
  t = time.time()
  fns[mode] = jax.jit(functools.partial(trainer.train_step, loss_fn=loss_fn)).lower(*args).compile()
  print(mode, "compile", round(time.time() - t, 1), "temps MB", round(fns[mode].memory_analysis().temp_size_in_bytes / 2**20, 1), flush=True)
times = {k: [] for k in fns}
for r in range(rounds):
  for k, f in fns.items():
    for _ in range(1):
      t = time.perf_counter(); jax.block_until_ready(f(*args)); times[k].append(time.perf_counter() - t)
print(name, size, batch, {k: (round(1e3 * statistics.median(v)), round(1e3 * min(v))) for k, v in times.items()}, "(median, min ms)")
