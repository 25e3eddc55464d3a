"""The 5x5 stride-1 max pool's backward (``layers.max_pool_same``, RefineNet's chained
residual pooling) in three forms: jseg's (k shifted, concatenated copies per axis), a gather
from slices of padded copies per axis, and one k*k gather over both axes. Per form: XLA's
temporaries, median ms, and whether the bits equal jseg's.

  python experiments/performance/pool_same_bwd.py

Seventeenth pass: the gathers were 3-10x faster and kept less alone, but in RefineNet's
whole step they raised XLA's temporaries 155.4 -> 165.0 MB and the peak by 10-36 MB (step
1-8% faster); not kept.
"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jseg.models import layers
sys.path.insert(0,'experiments/performance')
from timing import median_ms
def unwindow_pad(g, at, k, axis):
    p=(k-1)//2
    n=g.shape[axis]
    pad=[(0,0)]*g.ndim; pad[axis]=(p,p)
    gp=jnp.pad(g,pad); ap=jnp.pad(at,pad,constant_values=-1)
    out=None
    for i in range(k):
        # out[j] += g[j'] where j' = j - (i - p) and at[j'] == i ; j' index in padded = j - i + 2p
        s=2*p-i
        gs=lax.slice_in_dim(gp,s,s+n,1,axis); as_=lax.slice_in_dim(ap,s,s+n,1,axis)
        t=jnp.where(as_==i,gs,jnp.zeros((),g.dtype))
        out=t if out is None else out+t
    return out
def bwd_now(row_at,col_at,g,k=5):
    return layers._unwindow(layers._unwindow(g,row_at,k,1),col_at,k,2)
def bwd_pad(row_at,col_at,g,k=5):
    return unwindow_pad(unwindow_pad(g,row_at,k,1),col_at,k,2)
for shape in [(4,64,64,64),(4,32,32,128),(4,16,16,256)]:
    x=jnp.asarray(np.random.default_rng(0).standard_normal(shape),jnp.float32)
    g=jnp.asarray(np.random.default_rng(1).standard_normal(shape),jnp.float32)
    _,(row_at,col_at)=layers._max_pool_same_fwd(5,x)
    res=[]
    for name,f in [('now',bwd_now),('pad',bwd_pad)]:
        fj=jax.jit(f); c=fj.lower(row_at,col_at,g).compile()
        out=np.asarray(fj(row_at,col_at,g)); res.append(out)
        print(shape,name,f"temps {c.memory_analysis().temp_size_in_bytes/2**20:.1f} MB {median_ms(fj,row_at,col_at,g,n=20):.2f} ms")
    print(' equal', np.array_equal(res[0],res[1]))
print('--- 2D composite')
def bwd_2d(row_at,col_at,g,k=5):
    p=(k-1)//2; n,h,w,c=g.shape
    gp=jnp.pad(g,((0,0),(p,p),(p,p),(0,0)))
    rp=jnp.pad(row_at,((0,0),(p,p),(p,p),(0,0)),constant_values=-1)
    cp=jnp.pad(col_at,((0,0),(0,0),(p,p),(0,0)),constant_values=-1)
    zero=jnp.zeros((),g.dtype); out=None
    for ic in range(k):
        sc=2*p-ic  # x' = x - (ic - p) -> padded x index x - ic + 2p
        inner=None
        for ir in range(k):
            sr=2*p-ir
            t=jnp.where(rp[:, sr:sr+h, sc:sc+w]==ir, gp[:, sr:sr+h, sc:sc+w], zero)
            inner=t if inner is None else inner+t
        t=jnp.where(cp[:, :, sc:sc+w]==ic, inner, zero)
        out=t if out is None else out+t
    return out
for shape in [(4,64,64,64),(4,32,32,128),(4,16,16,256)]:
    x=jnp.asarray(np.random.default_rng(0).standard_normal(shape),jnp.float32)
    g=jnp.asarray(np.random.default_rng(1).standard_normal(shape),jnp.float32)
    _,(row_at,col_at)=layers._max_pool_same_fwd(5,x)
    ref=np.asarray(jax.jit(bwd_now)(row_at,col_at,g))
    fj=jax.jit(bwd_2d); c=fj.lower(row_at,col_at,g).compile()
    print(shape,'2d',f"temps {c.memory_analysis().temp_size_in_bytes/2**20:.1f} MB {median_ms(fj,row_at,col_at,g,n=20):.2f} ms equal {np.array_equal(np.asarray(fj(row_at,col_at,g)),ref)}")
