"""A lever tried and NOT kept: ``nn.Conv`` with a row-stacked kernel gradient (no gain measured).

``python experiments/performance/checks.py conv --model=pspnet`` swaps it in for every
``nn.Conv``; ``python experiments/performance/stacked_conv.py`` checks its gradients
against XLA's and times one layer. Results in this folder's README.

What it does: ``flax.linen.Conv`` whose kernel gradient avoids XLA:CPU's layout transposes.

XLA computes a convolution's kernel gradient as another convolution in which
the batch acts as the contracted feature: it first relays the activations to
``(C, H, W, N)`` and the output gradient to ``(H, W, N, O)``, two full-size
transposes with the batch (often 2-8) as the minor dimension, which made up
14-30% of the training step of the benchmarked networks on CPU
(``experiments/performance/README.md``).

The same gradient is computed here as one convolution over the batch stacked
along the rows: every image is zero-padded as the forward pass pads it, the
images are stacked into one ``(1, N*Hp, Wp, C)`` image, and the output
gradient is stacked the same way with ``Hp - H_out`` zero rows after each
image, so that the windows straddling two images meet only zeros. With a batch
of one, the output gradient is already in the layout XLA wants (no transpose),
and the activation transpose is a plain 2-D one. The value is the same sum in
a different order (float32 rounding differs); ``check()`` compares it with
``jax.grad`` of ``lax.conv_general_dilated``.

Used for stride-1, ungrouped NHWC convolutions on the CPU backend; every other
case (strides, groups, input dilation, GPU/TPU, where the vendor libraries
compute kernel gradients directly) is ``lax.conv_general_dilated`` unchanged.
Parameters and their names are ``nn.Conv``'s.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
_NHWC_NUMBERS = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                         out_spec=(0, 3, 1, 2))


def _stacked_kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...],
                         padding: tuple[tuple[int, int], tuple[int, int]],
                         dilation: tuple[int, int], precision: Any) -> jax.Array:
  """d(conv)/d(kernel) for a stride-1 NHWC conv, as one convolution over the row-stacked batch."""
  (pt, pb), (pl, pr) = padding
  n, h, w, c = x.shape
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  hp, wp = h + pt + pb, w + pl + pr
  extra = hp - g.shape[1]  # rows a window spans beyond its first: dilation*(kh-1)
  xs = x.reshape(1, n * hp, wp, c)
  if extra:
    g = jnp.pad(g, ((0, 0), (0, extra), (0, 0), (0, 0)))
  gs = g.reshape(1, n * hp, g.shape[2], g.shape[3])[:, : n * hp - extra]

  def conv(k):
    return lax.conv_general_dilated(xs, k, (1, 1), "VALID", rhs_dilation=dilation,
                                    dimension_numbers=_NHWC, precision=precision)

  _, vjp = jax.vjp(conv, jnp.zeros(kernel_shape, gs.dtype))
  return vjp(gs)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_stride1(x, kernel, padding, dilation, precision):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


def _conv_stride1_fwd(x, kernel, padding, dilation, precision):
  return _conv_stride1(x, kernel, padding, dilation, precision), (x, kernel)


def _conv_stride1_bwd(padding, dilation, precision, res, g):
  x, kernel = res
  _, vjp_x = jax.vjp(
      lambda x_: lax.conv_general_dilated(x_, kernel, (1, 1), padding, rhs_dilation=dilation,
                                          dimension_numbers=_NHWC, precision=precision), x)
  dx = vjp_x(g)[0]
  dk = _stacked_kernel_grad(x, g, kernel.shape, padding, dilation, precision)
  return dx, dk.astype(kernel.dtype)


_conv_stride1.defvjp(_conv_stride1_fwd, _conv_stride1_bwd)


def _explicit_padding(padding: Any, kernel_shape: Sequence[int], dilation: Sequence[int],
                      in_shape: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]] | None:
  if isinstance(padding, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilation)]
    pads = lax.padtype_to_pads(in_shape, dilated, (1, 1), padding)
    return tuple((int(a), int(b)) for a, b in pads)  # type: ignore[return-value]
  pads = tuple((int(a), int(b)) for a, b in padding)
  if len(pads) != 2 or any(a < 0 or b < 0 for a, b in pads):
    return None
  return pads  # type: ignore[return-value]


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` with the row-stacked kernel gradient where it applies."""
  dilation = tuple(rhs_dilation or (1, 1))
  eligible = (
      jax.default_backend() == "cpu"
      and lhs.ndim == 4 and rhs.ndim == 4
      and tuple(window_strides) == (1, 1)
      and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
      and feature_group_count == 1 and batch_group_count == 1
      and preferred_element_type is None
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC_NUMBERS
  )
  pads = _explicit_padding(padding, rhs.shape[:2], dilation, lhs.shape[1:3]) if eligible else None
  if pads is None:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  return _conv_stride1(lhs, rhs, pads, dilation, precision)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
Conv.__doc__ = "``nn.Conv`` (same parameters and names) with the row-stacked kernel gradient on CPU."


def check() -> None:
  """Gradients equal XLA's on awkward shapes; then one layer timed both ways."""
  import statistics
  import time

  import numpy as np

  import jseg  # noqa: F401  (sets the kept XLA flag before the CPU backend starts)
  rng = np.random.default_rng(0)
  cases = [((3, 9, 7, 5), (3, 3, 5, 4), ((1, 1), (1, 1)), (1, 1)),
           ((2, 12, 10, 5), (3, 3, 5, 4), ((2, 2), (2, 2)), (2, 2)),
           ((1, 6, 5, 5), (1, 1, 5, 4), ((0, 0), (0, 0)), (1, 1)),
           ((2, 10, 9, 5), (5, 3, 5, 4), ((0, 1), (2, 0)), (1, 1)),
           ((2, 11, 11, 5), (7, 7, 5, 4), "SAME", (1, 1))]
  for xs, ks, pad, dil in cases:
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    k = jnp.asarray(rng.standard_normal(ks), jnp.float32)
    ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pad, rhs_dilation=dil, dimension_numbers=_NHWC)
    ours = lambda x, k: conv_general_dilated(x, k, (1, 1), pad, rhs_dilation=dil, dimension_numbers=_NHWC)
    g = jnp.asarray(rng.standard_normal(ref(x, k).shape), jnp.float32)
    for a, b in zip(jax.vjp(ours, x, k)[1](g), jax.vjp(ref, x, k)[1](g)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  print("gradients match XLA's on", len(cases), "cases")
  x = jnp.asarray(rng.standard_normal((4, 256, 256, 32)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 32, 32)), jnp.float32)
  for name, fn in (("xla", lax.conv_general_dilated), ("stacked", conv_general_dilated)):
    f = jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=_NHWC) ** 2), argnums=(0, 1)))
    jax.block_until_ready(f(x, k))
    ts = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(f(x, k))
      ts.append(time.perf_counter() - t0)
    print(f"{name}: 4x256x256x32->32 3x3 conv, input+kernel gradient {1e3 * statistics.median(ts):.1f} ms")


if __name__ == "__main__":
  check()
