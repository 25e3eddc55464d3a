"""Non-conv ops of the U-Net step, forward+backward, JAX (jseg's forms) vs torch.

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce \
    taskset -c 0 python experiments/performance/ops.py --threads=1

Each op is timed as the VJP of ``sum(op(x) * g)`` (forward and backward, as in
training), median of ``--repeats`` after 2 warm-ups, at U-Net level 0 shapes
(batch 4, 256x256, 32 channels; the up-convolution from 128x128x64). BatchNorm
is ``flax.linen.BatchNorm`` in training mode (batch statistics) followed by
ReLU, and, as a candidate formulation, a custom-VJP BatchNorm+ReLU whose
backward is the closed form torch uses (two reductions, one elementwise pass).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _med(fn, repeats):
  for _ in range(2):
    fn()
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return round(1e3 * statistics.median(ts), 2)


def bn_relu_closed_form():
  """BatchNorm (batch statistics) + ReLU with a hand-written VJP."""
  import jax
  import jax.numpy as jnp

  @jax.custom_vjp
  def f(x, scale, bias):
    return fwd(x, scale, bias)[0]

  def fwd(x, scale, bias):
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    inv = jax.lax.rsqrt(var + 1e-5)
    xhat = (x - mean) * inv
    y = jnp.maximum(xhat * scale + bias, 0)
    return y, (xhat, inv, scale, y)

  def bwd(res, g):
    xhat, inv, scale, y = res
    g = jnp.where(y > 0, g, 0)
    m = xhat.shape[0] * xhat.shape[1] * xhat.shape[2]
    dbias = g.sum((0, 1, 2))
    dscale = (g * xhat).sum((0, 1, 2))
    dx = (scale * inv) * (g - (dbias + xhat * dscale) / m)
    return dx, dscale, dbias

  f.defvjp(fwd, bwd)
  return f


def run_jax(repeats):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import linen as nn

  from jseg.models.layers import PixelTransposeConv, max_pool_2x2
  from jseg.losses import cross_entropy

  k = jax.random.key(0)
  x = jax.random.normal(k, (4, 256, 256, 32))
  out = {}

  bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  v = bn.init(k, x)

  def flax_bn_relu(p, x):
    y, _ = bn.apply({"params": p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
    return jax.nn.relu(y)

  closed = bn_relu_closed_form()

  def vjp_time(f, *args):
    def loss(*a):
      return jnp.sum(f(*a) * 1.0001)
    g = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    jax.block_until_ready(g(*args))
    return _med(lambda: jax.block_until_ready(g(*args)), repeats), g

  out["bn_relu_flax"], g1 = vjp_time(flax_bn_relu, v["params"], x)
  out["bn_relu_closed_form"], g2 = vjp_time(lambda s, b, x: closed(x, s, b), v["params"]["scale"],
                                            v["params"]["bias"], x)
  a, b = g1(v["params"], x), g2(v["params"]["scale"], v["params"]["bias"], x)
  err = float(np.abs(np.asarray(a[1]) - np.asarray(b[2])).max())
  out["bn_closed_form_max_abs_diff_dx"] = err
  out["max_pool_2x2"], _ = vjp_time(max_pool_2x2, x)
  out["concat_skip"], _ = vjp_time(lambda a, b: jnp.concatenate([a, b], -1), x, x)
  up = PixelTransposeConv(32, 2)
  xs = jax.random.normal(k, (4, 128, 128, 64))
  pv = up.init(k, xs)
  out["up_conv_einsum"], _ = vjp_time(lambda p, x: up.apply(p, x), pv, xs)
  logits = jax.random.normal(k, (4, 256, 256, 11))
  labels = jax.random.randint(k, (4, 256, 256), 0, 11)
  out["cross_entropy"], _ = vjp_time(lambda l: cross_entropy(l, labels)[None], logits)
  return out


def run_torch(repeats, threads):
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(threads)
  out = {}

  def vjp_time(f, *args):
    args = [a.requires_grad_() for a in args]

    def step():
      for a in args:
        a.grad = None
      (f(*args) * 1.0001).sum().backward()
    return _med(step, repeats)

  x = torch.randn(4, 32, 256, 256)
  bn = torch.nn.BatchNorm2d(32).train()
  out["bn_relu"] = vjp_time(lambda x: F.relu(bn(x)), x)
  out["max_pool_2x2"] = vjp_time(lambda x: F.max_pool2d(x, 2), x)
  out["concat_skip"] = vjp_time(lambda a, b: torch.cat([a, b], 1), x, x.clone())
  up = torch.nn.ConvTranspose2d(64, 32, 2, 2)
  out["up_conv"] = vjp_time(up, torch.randn(4, 64, 128, 128))
  labels = torch.randint(0, 11, (4, 256, 256))
  out["cross_entropy"] = vjp_time(lambda l: F.cross_entropy(l, labels), torch.randn(4, 11, 256, 256))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=1)
  a = p.parse_args()
  res = {"jax_ms": run_jax(a.repeats), "torch_ms": run_torch(a.repeats, a.threads)}
  print("RESULT " + json.dumps(res))


if __name__ == "__main__":
  main()
