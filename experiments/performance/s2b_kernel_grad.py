"""Not-kept lever: a dilated convolution's kernel gradient by space-to-batch on oneDNN.

  python experiments/performance/s2b_kernel_grad.py
  ONEDNN_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 python experiments/performance/s2b_kernel_grad.py

The d x d phases of x and of the output gradient go into the batch and oneDNN computes the
undilated kernel gradient (its direct kernels, not its GEMM fallback). Prints, per DeepLab-like
geometry, XLA's convolution (jseg's choice where oneDNN has only GEMM), oneDNN's own call
and the space-to-batch form, ms, with their differences to XLA's (nineteenth pass).
"""
import sys, jax, jax.numpy as jnp, numpy as np
from jseg.models import conv as C
from jseg import native
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from timing import median_ms

def to_phases(a, d):
  n, h, w, c = a.shape
  hp, wp = -(-h // d) * d, -(-w // d) * d
  a = jnp.pad(a, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  a = a.reshape(n, hp // d, d, wp // d, d, c).transpose(2, 4, 0, 1, 3, 5)
  return a.reshape(d * d * n, hp // d, wp // d, c)

def s2b_kernel_grad(x, dy, k_shape, d, pad):
  (pt, pb), (pl, pr) = pad
  xs, dys = to_phases(x, d), to_phases(dy, d)
  ppad = ((pt // d, pb // d), (pl // d, pr // d))
  geom = (xs.shape, k_shape, dys.shape, (1, 1), (1, 1), ppad, 1)
  return C._call("JsegConvBwdWeights", "w", k_shape, *geom, xs, dys)

cases = [((4,16,16,256),(3,3,256,256),4),((4,16,16,256),(3,3,256,64),12),((4,16,16,256),(3,3,256,64),6),((4,16,16,128),(3,3,128,256),2),((4,32,32,256),(3,3,256,256),4),((4,32,32,512),(3,3,512,512),2),((4,64,64,256),(3,3,256,256),12)]
for xs, ks, d in cases:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32); dy = jnp.asarray(rng.standard_normal(xs[:3] + (ks[3],)), jnp.float32)
  pad = ((d, d), (d, d))
  geom = (xs, ks, dy.shape, (1,1), (d,d), pad, 1)
  fx = jax.jit(lambda x, dy: C._xla_kernel_grad(x, dy, ks, (1,1), (d,d), pad, 1))
  fg = jax.jit(lambda x, dy: C._call("JsegConvBwdWeights", "w", ks, *geom, x, dy))
  fs = jax.jit(lambda x, dy: s2b_kernel_grad(x, dy, ks, d, pad))
  a, b, c = np.asarray(fx(x, dy)), np.asarray(fg(x, dy)), np.asarray(fs(x, dy))
  sc = np.abs(a).max()
  xs2 = to_phases(x, d).shape
  impl = native.onednn_impl("w", xs2, ks, xs2[:3] + (ks[3],), (1,1), (1,1), ((d//d, d//d),)*2, 1)
  print(f"{xs} {ks} d{d}: xla {median_ms(fx, x, dy, n=10):.2f} gemm {median_ms(fg, x, dy, n=10):.2f} s2b {median_ms(fs, x, dy, n=10):.2f} ms | err gemm {np.abs(b-a).max()/sc:.1e} s2b {np.abs(c-a).max()/sc:.1e} | s2b impl {impl}", flush=True)
