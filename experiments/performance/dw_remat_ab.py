"""A/B: DepthwiseConv with and without nn.remat (DeepLab v3+). python experiments/performance/dw_remat_ab.py base|remat SIZE BATCH [preset]"""
import json
import sys
import time

import numpy as np
variant = sys.argv[1]
import jax
from flax import linen as nn
if variant == "remat":  # every SeparableConv (Xception, ASPP, decoder) resolves it here
  import jseg.models.backbones.xception as xc
  xc.DepthwiseConv = nn.remat(xc.DepthwiseConv)  # same parameters, recomputed in backward
from jseg.bench import models as bm
from jseg.bench.procstats import rss_mb, reset_peak_rss
from jseg import trainer, parallel, runtime
size, batch = int(sys.argv[2]), int(sys.argv[3])
c = bm.bench_config("deeplabv3plus", size, batch, sys.argv[4] if len(sys.argv) > 4 else "bench")
run = trainer.setup(c)
host = {"image": np.random.default_rng(0).standard_normal((batch,size,size,3),np.float32),
        "label": np.random.default_rng(0).integers(0,11,(batch,size,size)).astype(np.int32)}
b = parallel.shard_batch(host, run.mesh)
step = run.step_fn.lower(run.state, b, run.step_rng).compile()
mem = step.memory_analysis()
state = run.state
runtime.release_free_memory()
reset_peak_rss()
times = []
for i in range(7):
  t = time.perf_counter(); state, m = step(state, b, run.step_rng); l = float(m["loss"]); times.append(time.perf_counter()-t)
print(json.dumps({"variant": variant, "temp_mb": round(mem.temp_size_in_bytes/2**20,1), "train_peak_rss_mb": round(rss_mb(),1),
                  "step_s": round(float(np.median(times[2:])),4), "loss": round(l,4)}))
