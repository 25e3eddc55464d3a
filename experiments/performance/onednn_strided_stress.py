"""Stress of oneDNN's other strided convolutions (after the strided-1x1 crash).

  MALLOC_CHECK_=3 python experiments/performance/onednn_strided_stress.py

Gradients of seven strided geometries the networks use (7x7/2 and 3x3/2 stems, 3x3/2,
odd sizes, strided depthwise, no padding), 40 times in one jitted function, then compared
with XLA's. Measured 2026-11-30: exit 0, largest relative difference 2.7e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jseg.models.conv import onednn_conv

GEOMS = [  # input NHWC, kernel HWIO, strides, padding, groups
    ((4, 256, 256, 3), (7, 7, 3, 16), (2, 2), ((3, 3), (3, 3)), 1),
    ((4, 256, 256, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)), 1),
    ((4, 64, 64, 64), (3, 3, 64, 128), (2, 2), ((1, 1), (1, 1)), 1),
    ((2, 15, 15, 8), (3, 3, 8, 8), (2, 2), ((1, 1), (1, 1)), 1),
    ((4, 64, 64, 32), (3, 3, 1, 32), (2, 2), ((1, 1), (1, 1)), 32),
    ((4, 32, 32, 91), (3, 3, 1, 91), (2, 2), ((1, 1), (1, 1)), 91),
    ((4, 33, 33, 16), (3, 3, 16, 24), (2, 2), ((0, 0), (0, 0)), 1),
]


def main() -> None:
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.standard_normal(g[0]), jnp.float32) for g in GEOMS]
  ks = [jnp.asarray(rng.standard_normal(g[1]), jnp.float32) for g in GEOMS]

  def total(xs, ks, conv):
    return sum(jnp.sum(conv(x, k, s, p, g) ** 2) for x, k, (_, _, s, p, g) in zip(xs, ks, GEOMS))

  ours = lambda x, k, s, p, g: onednn_conv(x, k, s, (1, 1), p, g)  # noqa: E731
  ref = lambda x, k, s, p, g: lax.conv_general_dilated(  # noqa: E731
      x, k, s, p, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g,
      precision="highest")
  grad = jax.jit(jax.grad(lambda a, b: total(a, b, ours), (0, 1)))
  for _ in range(40):
    out = jax.block_until_ready(grad(xs, ks))
  want = jax.jit(jax.grad(lambda a, b: total(a, b, ref), (0, 1)))(xs, ks)
  rel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)))
  print("ok, largest relative difference", rel)


if __name__ == "__main__":
  main()
