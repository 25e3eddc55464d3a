"""One convolution layer's three oneDNN calls (forward, input gradient, kernel gradient)
timed alone, whole on OpenMP's threads and cut into parts on XLA's (``JSEG_CONV_THREADS``).

  python experiments/performance/conv_kinds.py --batch=4 --size=16 --cin=256 --cout=256 --dilation=1

Prints median ms over ``--repeats`` calls of each (the forms alternate ``--rounds`` times).
"""
from __future__ import annotations

import argparse
import os
import time


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=16)
  p.add_argument("--cin", type=int, default=256)
  p.add_argument("--cout", type=int, default=256)
  p.add_argument("--kernel", type=int, default=3)
  p.add_argument("--dilation", type=int, default=1)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--rounds", type=int, default=2)
  a = p.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jseg.models import conv

  rng = np.random.default_rng(0)
  n, h, c, o, kk, d = a.batch, a.size, a.cin, a.cout, a.kernel, a.dilation
  x = jnp.asarray(rng.standard_normal((n, h, h, c)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((kk, kk, c, o)) * 0.01, jnp.float32)
  dy = jnp.asarray(rng.standard_normal((n, h, h, o)), jnp.float32)
  pad = (d * (kk - 1) // 2,) * 2
  geom = (x.shape, k.shape, dy.shape, (1, 1), (d, d), (pad, pad), 1)

  def timed(fn, *args):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))

  gflop = 2 * n * h * h * kk * kk * c * o / 1e9
  for _ in range(a.rounds):
    for mode in ("xla", "openmp"):
      os.environ["JSEG_CONV_THREADS"] = mode  # read when the calls are traced (new jits)
      f = jax.jit(lambda x, k: conv._call("JsegConvFwd", "f", dy.shape, *geom, x, k))
      bd = jax.jit(lambda dy, k: conv._call("JsegConvBwdData", "d", x.shape, *geom, dy, k))
      bw = jax.jit(lambda x, dy: conv._call("JsegConvBwdWeights", "w", k.shape, *geom, x, dy))
      ms = [timed(f, x, k), timed(bd, dy, k), timed(bw, x, dy)]
      print(f"{mode:6s} {n}x{h}x{h}x{c}->{o} k{kk} d{d} split {[conv.conv_split(kind, x.shape, dy.shape, k.shape) for kind in 'fdw']}: "
            + ", ".join(f"{name} {t:.2f} ms ({gflop / t * 1e3:.0f} GFLOP/s)"
                        for name, t in zip(("fwd", "dx", "dk"), ms)))


if __name__ == "__main__":
  main()
