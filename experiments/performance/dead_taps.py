"""One atrous 3x3 convolution, forward and forward + both gradients, with all its taps vs
with the taps that read only padding dropped (``conv.trim_dead_taps``).

  python experiments/performance/dead_taps.py

Shapes: DeepLab v3's bench-sized ASPP branch at rate 18 on a 16x16 map, the paper-sized one
(2048 -> 256 channels), rate 36 on a 32x32 map (output stride 8 evaluation), and rate 12 on
16x16 (every tap live: nothing to drop). Median of 10 runs, milliseconds.
"""
import time, jax, jax.numpy as jnp, numpy as np
from jseg.models import conv
def bench(f, *a, n=10):
  jax.block_until_ready(f(*a)); ts = []
  for _ in range(n):
    t0 = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t0)
  return sorted(ts)[n // 2] * 1e3
trim = conv.trim_dead_taps
for (n, h, ci, co, d) in [(4, 16, 256, 64, 18), (2, 16, 2048, 256, 18), (1, 32, 2048, 256, 36), (4, 16, 256, 64, 12)]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, h, ci)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, ci, co)) * 0.01, jnp.float32)
  def f(x, k):
    return jnp.sum(jnp.tanh(conv.conv_general_dilated(x, k, (1, 1), ((d, d), (d, d)), None, (d, d), ("NHWC", "HWIO", "NHWC"))))
  res = {}
  for name in ("all taps", "trimmed"):
    conv.trim_dead_taps = (lambda xs, k, s, dd, p: (k, p)) if name == "all taps" else trim
    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    fw = jax.jit(f)
    res[name] = (bench(fw, x, k), bench(g, x, k))
  conv.trim_dead_taps = trim
  print((n, h, h, ci, co, "rate", d), {k: f"fwd {v[0]:.2f} ms, fwd+bwd {v[1]:.2f} ms" for k, v in res.items()}, flush=True)
