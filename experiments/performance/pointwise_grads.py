"""A 1x1 convolution's gradients on oneDNN vs as XLA dots, alone (2 threads).

  python experiments/performance/pointwise_grads.py [--rounds=3]

Networks' classifiers (32 -> 11 channels at 256², batch 4: U-Net; 100 -> 11 on CNN+RNN's
4x16x4096 pixel blocks) and a wide case. For each: forward, input gradient and kernel
gradient, medians of alternated rounds (ms), each form's own call.
"""
import argparse, os, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_ms
from jseg.models import conv

DN = ("NHWC", "HWIO", "NHWC")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  a = ap.parse_args()
  rng = np.random.default_rng(0)
  for xs, co in [((4, 256, 256, 32), 11), ((4, 16, 4096, 100), 11), ((4, 256, 256, 16), 11),
                 ((4, 128, 128, 64), 128), ((4, 64, 64, 256), 11)]:
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, xs[3], co)) * 0.1, jnp.float32)
    dy = jnp.asarray(rng.standard_normal(xs[:3] + (co,)), jnp.float32)
    forms = {
        "onednn": lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN),
        "xla_dot": lambda x, k: jnp.einsum("nhwc,cd->nhwd", x, k[0, 0]),
    }
    res = {}
    for name, f in forms.items():
      fw = jax.jit(f)
      dx = jax.jit(lambda x, k, dy, f=f: jax.vjp(lambda x: f(x, k), x)[1](dy)[0])
      dk = jax.jit(lambda x, k, dy, f=f: jax.vjp(lambda k: f(x, k), k)[1](dy)[0])
      res[name] = (fw, dx, dk)
    ref = [g(x, k, dy) for g in res["onednn"][1:]]
    for name, (fw, dx, dk) in res.items():
      errs = [float(jnp.abs(g(x, k, dy) - r).max() / jnp.abs(r).max()) for g, r in zip((dx, dk), ref)]
      assert max(errs) < 1e-4, (name, errs)
    t = {n: [[], [], []] for n in res}
    for _ in range(a.rounds):
      for name, (fw, dx, dk) in res.items():
        t[name][0].append(median_ms(fw, x, k, n=7))
        t[name][1].append(median_ms(dx, x, k, dy, n=7))
        t[name][2].append(median_ms(dk, x, k, dy, n=7))
    print(f"{xs} -> {co}: " + " | ".join(
        f"{n}: fwd {np.median(v[0]):.2f}, dx {np.median(v[1]):.2f}, dk {np.median(v[2]):.2f} ms"
        for n, v in t.items()), flush=True)


if __name__ == "__main__":
  main()
