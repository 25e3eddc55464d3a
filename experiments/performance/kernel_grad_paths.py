"""Kernel gradient alone: jseg's convolution vs XLA's (2 threads, medians of 7, ms), with
oneDNN's implementation name for it.

  JSEG_CONV_GEMM_GRAD=onednn python experiments/performance/kernel_grad_paths.py "4,32,256,256,1,2,3;..."

Each case is ``n,h,cin,cout,stride,dilation,k``. Without ``JSEG_CONV_GEMM_GRAD=onednn`` the
jseg column already is XLA's where ``conv.kernel_grad_on_xla`` routes it (fifteenth pass).
"""
import sys, time, statistics
import jax, jax.numpy as jnp, numpy as np
import jseg
from jseg import native
from jseg.models import conv as jconv
from jax import lax
def med(fn, r=7):
  for _ in range(2): fn()
  ts=[]
  for _ in range(r):
    t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
  return round(1e3*statistics.median(ts),2)
CASES=[tuple(int(v) for v in c.split(",")) for c in sys.argv[1].split(";")]
for (n,h,ci,co,s,d,k) in CASES:
  x=jax.random.normal(jax.random.key(0),(n,h,h,ci)); w=jax.random.normal(jax.random.key(1),(k,k,ci,co))*.1
  p=d*(k-1)//2
  res={}
  for name,cf in (("onednn",jconv.conv_general_dilated),("xla",lax.conv_general_dilated)):
    def c(x,w): return cf(x,w,(s,s),((p,p),(p,p)),rhs_dilation=(d,d),dimension_numbers=("NHWC","HWIO","NHWC"))
    g=jax.random.normal(jax.random.key(2),c(x,w).shape)
    dw=jax.jit(lambda x,w,g: jax.vjp(lambda w: c(x,w),w)[1](g)[0])
    res[name]=med(lambda: dw(x,w,g).block_until_ready())
  y_shape = g.shape
  split, chunks = jconv.conv_split("w", x.shape, y_shape, w.shape)
  impl = native.onednn_impl("w", x.shape, w.shape, y_shape, (s,s), (d,d), ((p,p),(p,p)), 1, split, chunks)
  gf = 2*np.prod(y_shape)*ci*k*k/1e9
  print((n,h,ci,co,s,d,k), f"onednn {res['onednn']} xla {res['xla']} ratio {res['onednn']/res['xla']:.2f} GF {gf:.2f} impl {impl}", flush=True)
