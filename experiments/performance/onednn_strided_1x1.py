"""Reproduces the oneDNN 3.2 crash that made jseg slice strided 1x1 convolutions.

  python experiments/performance/onednn_strided_1x1.py strided   # segfault / heap corruption
  python experiments/performance/onednn_strided_1x1.py sliced    # what jseg does: fine

Gradients of three strided (2x2) 1x1 convolutions from DeepLab v3+'s Xception skip
connections, 30 times. Measured 2026-11-30 (oneDNN 3.2, onednn-cpu-gomp 2023.2.0, Xeon
with AVX-512): ``strided`` exits with SIGSEGV (139) or a glibc heap-corruption abort;
forward alone is fine, so the fault is in the backward primitives (input gradient
``brgconv_strided``, kernel gradient ``jit_1x1``). ``sliced`` (``x[:, ::2, ::2]`` then a
stride-1 1x1 convolution, the same function) runs clean, also under ``MALLOC_CHECK_=3``.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jseg.models.conv import _onednn_conv as raw_conv  # the custom call, no workaround


def main() -> None:
  which = sys.argv[1] if len(sys.argv) > 1 else "sliced"
  rng = np.random.default_rng(0)
  geoms = [((4, 128, 128, 8), (1, 1, 8, 16)), ((4, 64, 64, 16), (1, 1, 16, 32)),
           ((4, 32, 32, 32), (1, 1, 32, 91))]
  xs = [jnp.asarray(rng.standard_normal(g[0]), jnp.float32) for g in geoms]
  ks = [jnp.asarray(rng.standard_normal(g[1]), jnp.float32) for g in geoms]

  def f(xs, ks):
    tot = 0.0
    for x, k in zip(xs, ks):
      if which == "strided":
        y = raw_conv(x, k, (2, 2), (1, 1), ((0, 0), (0, 0)), 1)
      else:
        y = raw_conv(x[:, ::2, ::2], k, (1, 1), (1, 1), ((0, 0), (0, 0)), 1)
      tot = tot + jnp.sum(y ** 2)
    return tot

  g = jax.jit(jax.grad(f, (0, 1)))
  for _ in range(30):
    out = jax.block_until_ready(g(xs, ks))
  print(which, "ok", float(sum(jnp.sum(a) for a in out[1])))


if __name__ == "__main__":
  main()
