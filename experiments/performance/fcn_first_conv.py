"""FCN's conv1_1 (3 -> C channels, padding 100) five ways, on oneDNN.

  python experiments/performance/fcn_first_conv.py [--rounds=3]

``pad100``: the convolution with padding 100 handed to oneDNN as it is (what FCN's VGG
ran); ``jseg``: the same through ``conv.onednn_conv`` (which now pads explicitly as
``pad_then`` does); ``pad_then``: the image
padded by 99 with zeros, then the convolution with padding 1; ``pad_then2``: padded by 98, then padding 2; ``frame``: the convolution
with padding 2 over the image only (the outputs whose window reads any pixel), written
into a frame of ``relu(bias)`` (every other output's window reads only padding). Forward
at batch 1 and forward + parameter gradient (through a ReLU and a sum of squares) at
batch 4, medians of alternated rounds; max abs difference to ``pad100``.
"""
import argparse, os, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_ms
from jseg.models import conv as conv_lib
from jseg.models.conv import Conv, conv_relu


def make(kind, c):
  def f(params, x):
    if kind in ("pad100", "jseg"):  # jseg: conv.onednn_conv's own explicit padding
      m = Conv(c, (3, 3), padding=((100, 100), (100, 100)), parent=None)
      if kind == "jseg":
        return conv_relu_apply(m, params, x)
      keep = conv_lib._pad_beyond_kernel
      conv_lib._pad_beyond_kernel = lambda x, k_shape, dilation, padding: (x, padding)
      try:
        return conv_relu_apply(m, params, x)
      finally:
        conv_lib._pad_beyond_kernel = keep
    if kind == "pad_then2":
      m = Conv(c, (3, 3), padding=((2, 2), (2, 2)), parent=None)
      return conv_relu_apply(m, params, jnp.pad(x, ((0, 0), (98, 98), (98, 98), (0, 0))))
    if kind == "pad_then":
      m = Conv(c, (3, 3), padding=((1, 1), (1, 1)), parent=None)
      return conv_relu_apply(m, params, jnp.pad(x, ((0, 0), (99, 99), (99, 99), (0, 0))))
    m = Conv(c, (3, 3), padding=((2, 2), (2, 2)), parent=None)
    y = conv_relu_apply(m, params, x)
    n, h, w, _ = x.shape
    frame = jnp.broadcast_to(jax.nn.relu(params["c"]["bias"]), (n, h + 198, w + 198, c))
    return jax.lax.dynamic_update_slice(frame, y, (0, 98, 98, 0))
  return f


def conv_relu_apply(m, params, x):
  import flax.linen as nn
  class W(nn.Module):
    @nn.compact
    def __call__(self, x):
      return conv_relu(m.clone(name="c", parent=None), x)
  return W().apply({"params": params}, x)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--c", type=int, default=16)
  ap.add_argument("--size", type=int, default=256)
  a = ap.parse_args()
  rng = np.random.default_rng(0)
  params = {"c": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 3, a.c)) * 0.2, jnp.float32),
                  "bias": jnp.asarray(rng.standard_normal((a.c,)) * 0.1, jnp.float32)}}
  for n in (1, 4):
    x = jnp.asarray(rng.standard_normal((n, a.size, a.size, 3)), jnp.float32)
    fs = {k: make(k, a.c) for k in ("pad100", "jseg", "pad_then", "pad_then2", "frame")}
    ref = jax.jit(fs["pad100"])(params, x)
    for k, f in fs.items():
      err = float(jnp.abs(jax.jit(f)(params, x) - ref).max())
      print(f"b{n} {k}: err {err:.1e}", flush=True)
    times = {k: [] for k in fs}
    for _ in range(a.rounds):
      for k, f in fs.items():
        if n == 1:
          times[k].append(median_ms(jax.jit(f), params, x, n=10))
        else:
          g = jax.jit(jax.grad(lambda p, x, f=f: jnp.sum(f(p, x) ** 2)))
          times[k].append(median_ms(g, params, x, n=5))
    print(f"b{n} {'fwd' if n == 1 else 'fwd+grad'}: " + ", ".join(
        f"{k} {np.median(v):.2f} ms" for k, v in times.items()), flush=True)


if __name__ == "__main__":
  main()
