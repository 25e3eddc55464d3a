"""Inference time of FastFCN's JPU vs a dilated ResNet at the same output stride (8).

Both networks have the same FCN head on a 2048-channel stride-8 map: ``jpu=True``
runs the classification ResNet (stride 32) and the JPU; ``jpu=False`` dilates
layer3/layer4 (rates 2 and 4). Parameters are random (speed does not depend on
them). Usage:

  python experiments/fastfcn_jpu_vs_dilated/run.py --depth 50 --size 256 --reps 5
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jseg.models import build_model


def measure(jpu: bool, depth: int, size: int, batch: int, reps: int) -> dict:
  cfg = ml_collections.ConfigDict(dict(name="fastfcn", num_classes=21, depth=depth, jpu=jpu,
                                       output_stride=8, aux_head=False))
  model = build_model(cfg)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  t = time.perf_counter()
  compiled = fwd.lower(variables, x).compile()
  compile_s = time.perf_counter() - t
  compiled(variables, x).block_until_ready()  # warm-up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    compiled(variables, x).block_until_ready()
    times.append(time.perf_counter() - t)
  return dict(jpu=jpu, params=n_params, compile_s=compile_s, min_s=min(times),
              median_s=float(np.median(times)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depth", type=int, default=50)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--out", default="")
  a = p.parse_args()
  rows = [measure(j, a.depth, a.size, a.batch, a.reps) for j in (False, True)]
  dilated, jpu = rows
  print(f"ResNet-{a.depth}, {a.batch}x{a.size}x{a.size}, {jax.devices()[0].platform}, "
        f"{a.reps} timed runs after one warm-up")
  print(f"{'backbone':<22}{'params':>12}{'compile s':>11}{'min ms':>9}{'median ms':>11}")
  for name, r in (("dilated (OS 8)", dilated), ("stride 32 + JPU", jpu)):
    print(f"{name:<22}{r['params']:>12,}{r['compile_s']:>11.1f}{1e3 * r['min_s']:>9.0f}"
          f"{1e3 * r['median_s']:>11.0f}")
  ratio = dilated["median_s"] / jpu["median_s"]
  print(f"speed ratio JPU / dilated (median time dilated / JPU): {ratio:.2f}x")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(dict(args=vars(a), rows=rows, ratio=ratio), f, indent=1)


if __name__ == "__main__":
  main()
