"""The loss end of a training step alone: upsample the logits, cross-entropy, backward.

Compares the forms jseg used before 2026-11-30 (``jax.image.resize`` then
``log_softmax`` + ``take_along_axis`` over the last axis) with the current ones
(``layers.resize_logits``: two matmuls leaving the logits class-major; the loss reduces
over classes in that layout and picks the true class with a one-hot select), and two
forms that were tried and not kept (a custom VJP ``softmax - onehot`` over axis
reductions; reductions unrolled over the classes with autodiff's backward), and the
unrolled forward with the elementwise custom-VJP backward that ``losses`` uses since
2026-11-30 (so "now" and the last column time the same form). Values and gradients are
checked equal first.

  python experiments/performance/loss_tail.py [--batch=4] [--size=256] [--classes=11]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jseg import losses
from jseg.models import layers
from timing import median_ms


def old_resize(x, size):
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, size[0], size[1], c), "bilinear", antialias=False)


def old_ce(logits, labels, ignore_index=255):
  k = logits.shape[-1]
  valid, safe = losses._valid_and_safe(labels, k, ignore_index)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return losses._reduce(nll, losses._pixel_weights(safe, valid, None), True)


@jax.custom_vjp
def _nll_cm(z, safe):
  return _nll_fwd(z, safe)[0]


def _onehot(safe, k):
  return safe[:, None] == jnp.arange(k)[None, :, None, None]


def _nll_fwd(z, safe):
  m = jax.lax.stop_gradient(jnp.max(z, axis=1, keepdims=True))
  lse = m[:, 0] + jnp.log(jnp.sum(jnp.exp(z - m), axis=1))
  return lse - jnp.sum(jnp.where(_onehot(safe, z.shape[1]), z, 0.0), axis=1), (z, lse, safe)


def _nll_bwd(res, g):
  z, lse, safe = res
  return g[:, None] * (jnp.exp(z - lse[:, None]) - _onehot(safe, z.shape[1])), None


_nll_cm.defvjp(_nll_fwd, _nll_bwd)


def custom_vjp_ce(logits, labels, ignore_index=255):
  z = jnp.moveaxis(logits.astype(jnp.float32), -1, 1)
  valid, safe = losses._valid_and_safe(labels, z.shape[1], ignore_index)
  return losses._reduce(_nll_cm(z, safe), losses._pixel_weights(safe, valid, None), True)


def unrolled_ce(logits, labels, ignore_index=255):
  z = jnp.moveaxis(logits.astype(jnp.float32), -1, 1)
  k = z.shape[1]
  valid, safe = losses._valid_and_safe(labels, k, ignore_index)
  m = z[:, 0]
  for i in range(1, k):
    m = jnp.maximum(m, z[:, i])
  m = jax.lax.stop_gradient(m)
  s = sum(jnp.exp(z[:, i] - m) for i in range(k))
  zy = sum(jnp.where(safe == i, z[:, i], 0.0) for i in range(k))
  return losses._reduce(m + jnp.log(s) - zy, losses._pixel_weights(safe, valid, None), True)


@jax.custom_vjp
def _nll_unrolled_vjp(z, safe):
  return _nll_unrolled_fwd(z, safe)[0]


def _nll_unrolled_fwd(z, safe):
  k = z.shape[1]
  m = z[:, 0]
  for i in range(1, k):
    m = jnp.maximum(m, z[:, i])
  lse = m + jnp.log(sum(jnp.exp(z[:, i] - m) for i in range(k)))
  zy = sum(jnp.where(safe == i, z[:, i], 0.0) for i in range(k))
  return lse - zy, (z, lse, safe)


_nll_unrolled_vjp.defvjp(_nll_unrolled_fwd, _nll_bwd)


def unrolled_vjp_ce(logits, labels, ignore_index=255):
  z = jnp.moveaxis(logits.astype(jnp.float32), -1, 1)
  valid, safe = losses._valid_and_safe(labels, z.shape[1], ignore_index)
  return losses._reduce(_nll_unrolled_vjp(z, safe), losses._pixel_weights(safe, valid, None), True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--classes", type=int, default=11)
  p.add_argument("--stride", type=int, default=8)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--rounds", type=int, default=3)
  a = p.parse_args()
  rng = np.random.default_rng(0)
  low = a.size // a.stride
  x = jnp.asarray(rng.standard_normal((a.batch, low, low, a.classes), np.float32))
  y = rng.integers(0, a.classes, (a.batch, a.size, a.size)).astype(np.int32)
  y[0, :10] = 255
  y = jnp.asarray(y)
  size = (a.size, a.size)
  variants = {
      "before (image.resize + log_softmax/take_along_axis)": (old_resize, old_ce),
      "now (resize_logits + losses.cross_entropy)": (layers.resize_logits, losses.cross_entropy),
      "now, custom-VJP loss (not kept)": (layers.resize_logits, custom_vjp_ce),
      "now, reductions unrolled over classes (not kept)": (layers.resize_logits, unrolled_ce),
      "unrolled forward, elementwise custom-VJP backward": (layers.resize_logits, unrolled_vjp_ce),
  }
  fns = {k: jax.jit(jax.value_and_grad(lambda x, y, r=r, l=l: l(r(x, size), y))) for k, (r, l) in variants.items()}
  ref = None
  for k, f in fns.items():
    v, g = f(x, y)
    if ref is None:
      ref = (v, g)
    print(f"{k}: loss diff {float(v - ref[0]):.1e}, grad max diff {float(jnp.abs(g - ref[1]).max()):.1e}")
  for r in range(a.rounds):
    row = []
    for k, f in fns.items():
      row.append(f"{median_ms(f, x, y, n=a.repeats):.2f}")
    print(f"round {r}: fwd+bwd ms", " | ".join(row))


if __name__ == "__main__":
  main()
