"""PSPNet's split head: forms of the bins' per-tap products ``b_i @ k_i[tap]`` at the
paper size (2048 features, 4 bins of 512 channels, 512 outputs), jitted, 2 threads.

``python experiments/performance/bin_taps.py`` prints the median ms of each form over
alternated rounds. Forms: ``einsum`` (``nhwc,yxcf->nyxhwf`` per bin, kernel slices),
``batched`` (per bin, taps as the dot's batch dimension: the kernel's own layout),
``blockdiag`` (all bins in one batched dot over the bins' half of the kernel, a
block-diagonal left side), ``full`` (the same over the whole kernel: no slice).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--batch", type=int, default=1)
  a = p.parse_args()
  rng = np.random.default_rng(0)
  n, c, f, bins = a.batch, 512, 512, (1, 2, 3, 6)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 2048 + 4 * c, f)), jnp.float32)
  bs = [jnp.asarray(rng.standard_normal((n, s, s, c)), jnp.float32) for s in bins]

  def einsum(kernel, bs):
    return [jnp.einsum("nhwc,yxcf->nyxhwf", b, kernel[:, :, 2048 + i * c:2048 + (i + 1) * c])
            for i, b in enumerate(bs)]

  def batched(kernel, bs):
    out = []
    for i, b in enumerate(bs):
      k = kernel[:, :, 2048 + i * c:2048 + (i + 1) * c].reshape(9, c, f)
      lhs = jnp.broadcast_to(b.reshape(1, -1, c), (9, b.size // c, c))
      out.append(jnp.einsum("tmc,tcf->tmf", lhs, k))
    return out

  def blockdiag(kernel, bs, lo=2048):
    rows = []
    for i, b in enumerate(bs):
      m = b.size // c
      r = jnp.zeros((m, kernel.shape[2] - lo), b.dtype)
      rows.append(r.at[:, 2048 - lo + i * c:2048 - lo + (i + 1) * c].set(b.reshape(m, c)))
    lhs = jnp.concatenate(rows, 0)
    k = kernel[:, :, lo:].reshape(9, kernel.shape[2] - lo, f)
    return jnp.einsum("tmc,tcf->tmf", jnp.broadcast_to(lhs, (9,) + lhs.shape), k)

  forms = {"einsum": einsum, "batched": batched, "blockdiag": blockdiag,
           "full": lambda k, bs: blockdiag(k, bs, 0)}
  fns = {k: jax.jit(v).lower(kernel, bs).compile() for k, v in forms.items()}
  times = {k: [] for k in fns}
  for _ in range(a.rounds):
    for k, fn in fns.items():
      for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(kernel, bs))
        times[k].append((time.perf_counter() - t0) * 1e3)
  for k, t in times.items():
    print(f"{k:10s} median {np.median(t):7.2f} ms  min {np.min(t):7.2f} ms")


if __name__ == "__main__":
  main()
