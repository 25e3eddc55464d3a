"""XLA's temporaries of the gradient of a backbone's features alone (no model around it).

  python experiments/performance/backbone_temps.py [--batch=4] [--size=256]

For backbones no benchmarked model uses (MobileNetV2): the loss is the sum of the means of
sin(feature) over every returned feature, so every feature's backward is in the program.
Prints the compiled gradient program's temporaries (MB).
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jseg.models.backbones.mobilenet import MobileNetV2


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  a = p.parse_args()
  m = MobileNetV2(output_stride=16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(a.batch, a.size, a.size, 3)), jnp.float32)
  v = m.init(jax.random.PRNGKey(0), x, False)

  def loss(params):
    feats, upd = m.apply({**v, "params": params}, x, True, mutable=["batch_stats"])
    return sum(jnp.mean(jnp.sin(t)) for t in feats.values()), upd

  c = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(v["params"]).compile()
  print(f"mobilenetv2 b{a.batch} {a.size}^2: gradient temporaries "
        f"{c.memory_analysis().temp_size_in_bytes / 2**20:.1f} MB")


if __name__ == "__main__":
  main()
