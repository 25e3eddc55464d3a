"""In-process A/B of the eval forward (batch 1, 256^2): old vs new stem max pool and logits upsampling.

  python experiments/performance/infer_ab.py deeplabv3     # or pspnet

Swaps ``max_pool_3x3_s2`` (nine-slice form vs separable) and ``resize_logits`` (vs
``jax.image.resize``) in the model modules, compiles four variants and times 25 calls
of each, three rounds. Measured 2026-11-30 (2 threads): DeepLab v3 17.2-20.9 ms and
PSPNet 16.8-19.0 ms for all four variants, no ordering between them.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jseg.models.backbones.resnet as rn
import jseg.models.deeplab as dl
import jseg.models.pspnet as ps
from jseg import trainer
from jseg.bench.models import bench_config
from jseg.models import layers
from timing import median_ms


def old_pool(x):
  """The nine-strided-slice 3x3/2 max pool jseg used before 2026-11-30."""
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  oh, ow = (h + 1) // 2, (w + 1) // 2
  out = None
  for i in range(3):
    for j in range(3):
      s = xp[:, i : i + 2 * oh - 1 : 2, j : j + 2 * ow - 1 : 2]
      out = s if out is None else jnp.maximum(out, s)
  return out


def main() -> None:
  model_name = sys.argv[1] if len(sys.argv) > 1 else "deeplabv3"
  run = trainer.setup(bench_config(model_name, 256, 4))
  variables = trainer.variables(run.state.params, run.state.batch_stats)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 256, 256, 3), np.float32))
  new_pool, new_rl = layers.max_pool_3x3_s2, layers.resize_logits

  def build(pool, rl):
    for m in (dl, rn):
      if hasattr(m, "max_pool_3x3_s2"):
        m.max_pool_3x3_s2 = pool
    for m in (dl, ps):
      m.resize_logits = rl
    return jax.jit(lambda v, x: run.model.apply(v, x, train=False)[0]).lower(variables, x).compile()

  variants = {"old": build(old_pool, layers.resize_bilinear), "newpool": build(new_pool, layers.resize_bilinear),
              "newrl": build(old_pool, new_rl), "new": build(new_pool, new_rl)}
  for _ in range(3):
    print(model_name, " ".join(f"{k}={median_ms(f, variables, x, n=25):.2f}" for k, f in variants.items()),
          flush=True)


if __name__ == "__main__":
  main()
