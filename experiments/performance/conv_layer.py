"""One 3x3 conv layer, forward and forward+backward, JAX (under XLA_FLAGS) vs torch.

  python experiments/performance/conv_layer.py --flags="--xla_cpu_use_onednn=true" [--torch]
  python experiments/performance/conv_layer.py --sweep   # every flag set in FLAG_SETS, each in a subprocess

Shapes are the U-Net benchmark's first level by default (batch 4, 256x256, 32->32
channels, NHWC in JAX, NCHW in torch); ``--shapes`` takes ``n,h,cin,cout[,stride,dilation,kernel];...``.
Prints and returns median milliseconds of ``--repeats`` runs after 2 warm-ups for
the forward, the input gradient, the kernel gradient and the whole VJP, plus a
check that every flag set computes the same values as the default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FLAG_SETS = {
    "default": "",
    "ynn_conv": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution",
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn_dot_only": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "ynn_conv_only": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
}


def _med(fn, repeats):
  for _ in range(2):
    fn()
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def run_jax(shapes, repeats):
  import jax
  import jax.numpy as jnp
  import numpy as np
  out = {}
  for shape in shapes:
    n, h, cin, cout, s, d, k = (tuple(shape) + (1, 1, 3)[len(shape) - 4:])[:7]
    x = jax.random.normal(jax.random.key(0), (n, h, h, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.1
    p = d * (k - 1) // 2

    def conv(x, w):
      return jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), rhs_dilation=(d, d),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = jax.random.normal(jax.random.key(2), conv(x, w).shape)

    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    both = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g))
    key = f"{n}x{h}x{h}x{cin}->{cout} k{k} s{s} d{d}"
    if (s, d) == (1, 1):
      # The kernel gradient as k*k dots of shifted inputs with the output gradient
      # (contraction over batch and pixels) and as one im2col dot.
      xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))

      def dw_shifted(xp, g):
        return jnp.stack([jnp.stack([jnp.einsum("nhwc,nhwo->co", xp[:, i:i + h, j:j + h], g)
                                     for j in range(k)]) for i in range(k)])

      def dw_im2col(xp, g):
        cols = jnp.concatenate([xp[:, i:i + h, j:j + h] for i in range(k) for j in range(k)], -1)
        return jnp.einsum("nhwc,nhwo->co", cols, g).reshape(k, k, cin, cout)

      ref = np.asarray(dw(x, w, g), np.float64)
      for name, f in (("dw_shifted_dots", dw_shifted), ("dw_im2col_dot", dw_im2col)):
        fj = jax.jit(f)
        err = float(np.abs(np.asarray(fj(xp, g), np.float64) - ref).max() / np.abs(ref).max())
        if err > 1e-4:
          raise AssertionError(f"{name} disagrees with the conv kernel gradient: rel err {err}")
        out.setdefault(key, {})[name + "_ms"] = _med(lambda: fj(xp, g).block_until_ready(), repeats)
    out.setdefault(key, {}).update({
        "fwd_ms": _med(lambda: fwd(x, w).block_until_ready(), repeats),
        "dx_ms": _med(lambda: dx(x, w, g).block_until_ready(), repeats),
        "dw_ms": _med(lambda: dw(x, w, g).block_until_ready(), repeats),
        "vjp_ms": _med(lambda: jax.block_until_ready(both(x, w, g)), repeats),
        "checksum": float(np.asarray(dw(x, w, g)).astype(np.float64).sum()),
    })
  return out


def run_torch(shapes, repeats, threads):
  import torch
  torch.set_num_threads(threads)
  out = {}
  for shape in shapes:
    n, h, cin, cout, s, d, k = (tuple(shape) + (1, 1, 3)[len(shape) - 4:])[:7]
    x = torch.randn(n, cin, h, h, requires_grad=True)
    w = (torch.randn(cout, cin, k, k) * 0.1).requires_grad_()
    conv = lambda: torch.nn.functional.conv2d(x, w, stride=s, padding=d * (k - 1) // 2, dilation=d)  # noqa: E731
    g = torch.randn(conv().shape)

    def bwd():
      x.grad = w.grad = None
      conv().backward(g)

    with torch.no_grad():
      f = _med(conv, repeats)
    out[f"{n}x{h}x{h}x{cin}->{cout} k{k} s{s} d{d}"] = {"fwd_ms": f, "fwd_bwd_ms": _med(bwd, repeats)}
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--flags", default=None)
  p.add_argument("--sweep", action="store_true")
  p.add_argument("--torch", action="store_true")
  p.add_argument("--shapes", default="4,256,32,32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--only", default="", help="comma-separated FLAG_SETS names for --sweep")
  p.add_argument("--threads", type=int, default=os.cpu_count())
  a = p.parse_args()
  shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")]
  if a.sweep:
    results = {}
    for name, flags in FLAG_SETS.items():
      if a.only and name not in a.only.split(","):
        continue
      cmd = [sys.executable, __file__, f"--flags={flags}", "--shapes", a.shapes, "--repeats", str(a.repeats)]
      r = subprocess.run(cmd, capture_output=True, text=True)
      line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
      results[name] = json.loads(line[-1][7:]) if line else {"error": r.stderr.strip().splitlines()[-3:]}
      print(name, flags, json.dumps(results[name]), flush=True)
    if a.torch:
      results["torch"] = run_torch(shapes, a.repeats, a.threads)
      print("torch", json.dumps(results["torch"]), flush=True)
    print("SWEEP " + json.dumps({"loadavg": os.getloadavg(), "results": results}))
    return
  if a.flags is not None:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + a.flags).strip()
  out = run_jax(shapes, a.repeats)
  if a.torch:
    out = {"jax": out, "torch": run_torch(shapes, a.repeats, a.threads)}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
