"""Peak memory of compiling and running a bench model's initialiser (``trainer.Setup.state``)
under XLA compiler options, and the SHA-256 of the parameters it makes.

  python experiments/performance/init_compile.py deeplabv3plus '{}' [trim]
  python experiments/performance/init_compile.py deeplabv3plus '{"xla_cpu_use_fusion_emitters": false}' trim

``trim``: compile inside ``runtime.releasing_free_memory`` (as ``Setup.state`` does).
Run each setting in a fresh process (the peak is the process's).
"""
import hashlib
import json
import sys
import time

import jax
import numpy as np

from jseg import runtime, trainer
from jseg.bench.models import bench_config
from jseg.bench.procstats import rss_mb

opts = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
trim = len(sys.argv) > 3 and sys.argv[3] == "trim"
run = trainer.setup(bench_config(sys.argv[1], 256, 4))
low = run.init_fn.lower(run.init_rng)
t = time.time()
if trim:
  with runtime.releasing_free_memory():
    c = low.compile(compiler_options=opts)
else:
  c = low.compile(compiler_options=opts)
ct = time.time() - t
st = jax.block_until_ready(c(run.init_rng))
h = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(st.params))).hexdigest()[:12]
print(sys.argv[1:], f"compile {ct:.1f} s, process peak {rss_mb():.0f} MB, params sha256 {h}")
