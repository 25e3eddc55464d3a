"""One convolution + BatchNorm (evaluation) + ReLU: separate pass vs in the oneDNN call.

  python experiments/performance/conv_epilogue.py [--rounds=10]

Per geometry (UNet++ and U-Net layers at one 256^2 image, a 64x64 layer at batch 4), three
forms compiled in one process and timed alternately: the convolution alone (the floor),
the convolution followed by XLA's affine + ReLU pass (``Epilogue.apply``, jseg before the
twelfth pass) and ``conv.Epilogue`` in the call (scale folded into the kernel, shift as
oneDNN's bias, ReLU as its post-op). Median (minimum) ms.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jseg.models import conv

DN = ("NHWC", "HWIO", "NHWC")
SHAPES = [(1, 256, 256, 80, 16), (1, 256, 256, 16, 16), (1, 128, 128, 160, 32),
          (1, 64, 64, 192, 64), (4, 64, 64, 64, 64)]


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  rng = np.random.default_rng(0)
  for n, h, w, c, o in SHAPES:
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c, o)) / np.sqrt(9 * c), jnp.float32)
    s = jnp.asarray(rng.uniform(0.5, 1.5, o), jnp.float32)
    b = jnp.asarray(rng.standard_normal(o), jnp.float32)
    plain = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    fs = {
        "conv alone": jax.jit(lambda x, k, s, b: plain(x, k)),
        "conv + separate pass": jax.jit(lambda x, k, s, b: conv.Epilogue(s, b, True).apply(plain(x, k))),
        "epilogue in the call": jax.jit(lambda x, k, s, b: conv.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=DN, epilogue=conv.Epilogue(s, b, True))),
    }
    assert "JsegConvScaleBias" in fs["epilogue in the call"].lower(x, k, s, b).as_text()
    ref = fs["conv + separate pass"](x, k, s, b)
    err = float(jnp.abs(fs["epilogue in the call"](x, k, s, b) - ref).max() / jnp.abs(ref).max())
    times = {name: [] for name in fs}
    for r in range(a.rounds):
      order = list(fs.items()) if r % 2 == 0 else list(reversed(fs.items()))
      for name, f in order:
        jax.block_until_ready(f(x, k, s, b))
        for _ in range(a.repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(f(x, k, s, b))
          times[name].append(time.perf_counter() - t0)
    print(f"{n}x{h}x{w}x{c} -> {o} (max rel diff {err:.1e}): " + ", ".join(
        f"{name} {1e3 * statistics.median(t):.2f} ({1e3 * min(t):.2f})" for name, t in times.items()))


if __name__ == "__main__":
  main()
