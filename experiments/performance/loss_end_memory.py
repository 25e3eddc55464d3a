"""XLA's temporaries and time of the loss end alone: upsample 4x64x64x11 logits to 256^2
(``layers.resize_logits``), cross-entropy, gradient to the low-resolution logits.

  JSEG_LOSS=xla python experiments/performance/loss_end_memory.py
  JSEG_LOSS=native python experiments/performance/loss_end_memory.py

Prints the compiled program's temporaries (MB), the median of 30 calls (ms) and the loss.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from jseg import losses
from jseg.models import layers

n, s, k = 4, 256, 11
rng = np.random.default_rng(0)
lo = jnp.asarray(rng.standard_normal((n, s // 4, s // 4, k)), jnp.float32)
lab = jnp.asarray(rng.integers(0, k, (n, s, s)), jnp.int32)
g = jax.jit(jax.value_and_grad(lambda x, y: losses.cross_entropy(layers.resize_logits(x, (s, s)), y)))
g = g.lower(lo, lab).compile()
v, _ = g(lo, lab)
ts = []
for _ in range(30):
  t = time.perf_counter()
  jax.block_until_ready(g(lo, lab))
  ts.append(time.perf_counter() - t)
print(f"native={losses.loss_native_active()} temporaries {g.memory_analysis().temp_size_in_bytes / 2**20:.2f} MB, "
      f"median {1e3 * np.median(ts):.2f} ms, loss {float(v):.6f}")
