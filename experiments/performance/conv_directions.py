"""One convolution's forward, input gradient and kernel gradient, each alone: jseg's oneDNN
call, XLA's convolution and torch's ``convolution_backward`` (2 threads, medians of 7, ms).

  python experiments/performance/conv_directions.py ["n,h,cin,cout,stride,dilation,k;..."]

``JSEG_CONV_BLOCKED=0`` in the environment times the kernel gradient on NHWC activations
(fourteenth pass, experiments/performance/README.md).
"""
import os, sys, time, statistics, json
import jax, jax.numpy as jnp, numpy as np
import jseg
from jseg.models import conv as jconv
from jax import lax
import torch
torch.set_num_threads(2)
def med(fn, r=7):
  for _ in range(2): fn()
  ts=[]
  for _ in range(r):
    t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
  return round(1e3*statistics.median(ts),1)
CASES=[(4,256,32,32,1,1,3),(4,128,64,64,1,1,3),(4,64,128,128,1,1,3),(4,32,256,256,1,1,3),(4,32,512,512,1,1,3),(4,256,3,32,1,1,3)]
if len(sys.argv)>1: CASES=[tuple(int(v) for v in c.split(",")) for c in sys.argv[1].split(";")]
for (n,h,ci,co,s,d,k) in CASES:
  x=jax.random.normal(jax.random.key(0),(n,h,h,ci)); w=jax.random.normal(jax.random.key(1),(k,k,ci,co))*.1
  p=d*(k-1)//2
  res={}
  for name,cf in (("onednn",jconv.conv_general_dilated),("xla",lax.conv_general_dilated)):
    def c(x,w): return cf(x,w,(s,s),((p,p),(p,p)),rhs_dilation=(d,d),dimension_numbers=("NHWC","HWIO","NHWC"))
    g=jax.random.normal(jax.random.key(2),c(x,w).shape)
    fwd=jax.jit(c); dx=jax.jit(lambda x,w,g: jax.vjp(lambda x: c(x,w),x)[1](g)[0]); dw=jax.jit(lambda x,w,g: jax.vjp(lambda w: c(x,w),w)[1](g)[0])
    res[name]=(med(lambda: fwd(x,w).block_until_ready()),med(lambda: dx(x,w,g).block_until_ready()),med(lambda: dw(x,w,g).block_until_ready()))
  X=torch.randn(n,ci,h,h); W=torch.randn(co,ci,k,k)*.1; Y=torch.nn.functional.conv2d(X,W,stride=s,padding=p,dilation=d); G=torch.randn(Y.shape)
  with torch.no_grad():
    f=med(lambda: torch.nn.functional.conv2d(X,W,stride=s,padding=p,dilation=d))
    bx=med(lambda: torch.ops.aten.convolution_backward(G,X,W,None,[s,s],[p,p],[d,d],False,[0,0],1,[True,False,False]))
    bw=med(lambda: torch.ops.aten.convolution_backward(G,X,W,None,[s,s],[p,p],[d,d],False,[0,0],1,[False,True,False]))
  res["torch"]=(f,bx,bw)
  print((n,h,ci,co,s,d,k), "  ".join(f"{k_}: f {v[0]} dx {v[1]} dw {v[2]}" for k_,v in res.items()), flush=True)
