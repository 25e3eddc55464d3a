"""BatchNorm whose normalisation is one per-channel affine map, ``x * a + b``.

A drop-in for ``flax.linen.BatchNorm`` over the last (channel) axis: the same parameters
(``scale``, ``bias``), statistics (``batch_stats/mean``, ``batch_stats/var``), defaults,
float32 statistics and running-average update, so checkpoints and converted pretrained
weights load unchanged. flax normalises as ``(x - mean) * (scale / std) + bias``, which
XLA materialises ``x - mean`` for (one more full-size array written in the forward and
kept for the backward); here ``a = scale / std`` and ``b = bias - mean * a`` are computed
per channel first (as PyTorch's CPU kernel does). Measured in one process, alternated
(``experiments/performance/inproc_ab.py --change=bn_affine``): DeepLab v3+ training step,
batch 8 at 256^2, 426.1 -> 336.6 ms median, XLA temporaries 428.6 -> 319.5 MB. Values
equal flax's to float32 rounding (``tests/test_norm.py``).

In training the normalisation has a written-out VJP (``_batch_norm_train``): the same
values as autodiff's, but every per-channel term is computed inside the full-size pass
that uses it, so XLA:CPU compiles 6 kernels per layer for the forward and 4 for the
backward instead of 10 and 4 (each kernel costs compiler memory: DeepLab v3+'s step went
from 1370 to 962 kernels together with ``optim.global_norm``, compile peak +620 -> +390 MB,
``experiments/performance/README.md``, "Sixth pass"). Step time unchanged.

On CPU (one device, ``jseg.native`` built; ``JSEG_BN`` = ``auto`` | ``native`` | ``xla``)
a training layer is instead two custom calls, forward and backward, each two passes over
the data, with the ReLU (``relu=True``) and a ResNet block's residual (``residual=``) in
the same pass: XLA compiles none of its kernels, which lowers the compiler's memory peak
(``experiments/performance/README.md``, "Eighth pass"). Sums are accumulated in double,
so values equal the XLA form's to float32 rounding (``tests/test_norm.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jseg import native
from jseg.models import conv as conv_lib

Dtype = Any


class BatchNorm(nn.Module):
  """Batch normalisation over every axis but the last (``flax.linen.BatchNorm``'s API).

  ``use_running_average``: normalise with the running statistics (evaluation) instead of
  the batch's. Under ``jit`` with a batch sharded over devices the batch statistics are
  global (XLA reduces across devices), i.e. synchronised BatchNorm.
  """

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = nn.initializers.zeros
  scale_init: Any = nn.initializers.ones
  relu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None,
               residual: jax.Array | None = None,
               then: tuple[Callable, tuple] | None = None,
               conv: tuple[Callable, tuple] | None = None,
               add_before: jax.Array | None = None) -> jax.Array:
    """Normalised ``x`` (plus ``residual``, before the ReLU: a ResNet block's end).

    ``add_before``: added to ``x`` (to the convolution's output with ``conv=``) before it is
    normalised: the rest of a convolution computed in parts (``layers.conv_of_resized``).
    Folded at evaluation as ``scale * add_before`` into the epilogue's residual.

    ``then=(fn, args)`` returns ``fn(y, *args)`` for the normalised ``y`` instead, e.g. the
    convolution this layer feeds. In training on the native kernels ``y`` is then not kept
    for the backward (the convolution would keep it as its input): the backward recomputes
    it from ``x`` and the batch statistics in one pass, bit for bit (``JsegBnApply``).

    ``conv=(fn, params)`` (``conv.then_conv``'s pair): ``x`` is the input of the
    convolution this layer normalises, ``fn(x, *params)`` (a list of parts for a
    ``conv.parts_function``). At evaluation with oneDNN the
    layer is that convolution's epilogue (``conv.Epilogue``: scale applied by the kernel's
    reorder into oneDNN's layout, shift as its bias, residual and ReLU as post-ops), so the activation is written once
    instead of written and re-read by an affine + ReLU pass. Everywhere else it is ``fn``
    then this layer.
    """
    if then is not None and residual is not None:
      raise ValueError("BatchNorm: `then` and `residual` cannot be combined.")
    use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    parts = isinstance(x, (list, tuple))
    if parts and conv is None:
      raise ValueError("BatchNorm: a list of inputs (a concatenation's parts) needs conv=.")
    x_dtype = jnp.result_type(*x) if parts else x.dtype
    dtype = self.dtype or jnp.result_type(x_dtype, self.param_dtype)
    if conv is not None:
      fn, conv_params = conv
      fold = (use_ra and x_dtype == jnp.float32 and jnp.dtype(dtype) == jnp.float32
              and self.param_dtype == jnp.float32 and conv_lib.folds_epilogue(fn)
              and conv_lib.onednn_active())
      if not fold:
        x, conv = fn(x, *conv_params), None
    if add_before is not None and conv is None:
      if add_before.shape != x.shape:
        raise ValueError(f"BatchNorm: add_before shape {add_before.shape} is not the input's "
                         f"{x.shape}.")
      x, add_before = x + add_before.astype(x.dtype), None
    c = x.shape[-1] if conv is None else conv_params[0].shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = (self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale
             else None)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias else None
    if use_ra:
      a = jax.lax.rsqrt(ra_var.value + self.epsilon)
      a = a if scale is None else a * scale
      b = -ra_mean.value * a
      b = b if bias is None else b + bias
      if conv is not None:  # folded (above)
        kernel, conv_bias = conv_params[0], (conv_params[1] if len(conv_params) > 1 else None)
        shift = b if conv_bias is None else b + a * conv_bias
        if add_before is not None:
          added = add_before * a.astype(add_before.dtype)
          residual = added if residual is None else residual + added
        y = fn(x, kernel, epilogue=conv_lib.Epilogue(a, shift, self.relu, residual))
        return y if then is None else then[0](y, *then[1])
      y = jnp.asarray(x * a + b, dtype)
      y = y if residual is None else y + residual
      y = nn.relu(y) if self.relu else y
      return y if then is None else then[0](y, *then[1])
    scale = jnp.ones((c,), jnp.float32) if scale is None else scale
    bias = jnp.zeros((c,), jnp.float32) if bias is None else bias
    if residual is not None and residual.shape != x.shape:
      raise ValueError(f"BatchNorm: residual shape {residual.shape} is not the input's {x.shape}.")
    if (x.dtype == scale.dtype == bias.dtype == jnp.dtype(dtype) == jnp.float32
        and (residual is None or residual.dtype == jnp.float32) and bn_native_active()):
      # The running averages come out of the same call (see _batch_norm_train_native).
      if then is not None:
        y, new_mean, new_var = _batch_norm_then_native(
            x, scale, bias, ra_mean.value, ra_var.value, tuple(then[1]), self.epsilon,
            self.relu, self.momentum, then[0])
        then = None  # applied
      else:
        y, new_mean, new_var = _batch_norm_train_native(
            x, scale, bias, residual, ra_mean.value, ra_var.value, self.epsilon, self.relu,
            self.momentum)
    else:
      y, mean, var = _batch_norm_train(x, scale, bias, self.epsilon, dtype)
      y = y if residual is None else y + residual
      y = nn.relu(y) if self.relu else y
      new_mean = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      new_var = self.momentum * ra_var.value + (1 - self.momentum) * var
    if not self.is_initializing():
      ra_mean.value, ra_var.value = new_mean, new_var
    return y if then is None else then[0](y, *then[1])


_BN_MODES = native.KERNEL_MODES


def bn_mode() -> str:
  """``JSEG_BN`` (``auto`` | ``native`` | ``xla``), checked."""
  return native.env_mode("JSEG_BN", _BN_MODES)


def bn_native_active() -> bool:
  """Whether float32 BatchNorm in training, traced now, runs as ``jseg.native``'s kernels.

  ``auto`` (default): where the oneDNN convolutions run (one CPU device, the extension
  built, ``JSEG_CONV`` not ``xla``): with a batch sharded over devices a custom call would
  gather the batch instead of synchronising the statistics. ``native``: raise if the
  extension is unavailable or the backend is not CPU. ``xla``: never.
  """
  return native.kernels_active("JSEG_BN", conv_lib.onednn_active)


def bn_backend_summary() -> str:
  """One line for logs: which BatchNorm training kernels traced functions use now."""
  if bn_native_active():
    return "jseg.native kernels (CPU)"
  return "XLA" + (" (JSEG_BN=xla)" if bn_mode() == "xla" else "")


def _moments(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """float32 per-channel mean, ``E[x^2] - E[x]^2`` and that clipped at 0 (flax's
  ``use_fast_variance``)."""
  xf = x.astype(jnp.promote_types(jnp.float32, x.dtype))
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  mean = jnp.sum(xf, axes) / n
  var_raw = jnp.sum(xf * xf, axes) / n - mean * mean
  return mean, var_raw, jnp.maximum(0.0, var_raw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon, dtype):
  """``(y, mean, var)``: normalised with the batch's statistics, which it also returns.

  A custom VJP with the derivative written out (the chain rule of the forward below,
  term by term, so values equal autodiff's) so that every per-channel quantity is
  computed inside the one full-size pass that uses it. Under autodiff XLA:CPU compiled
  seven separate [C]-sized kernels per layer for the forward's ``rsqrt``/``scale``/
  ``bias``/derivative terms; each costs ~0.5 MB of compiler memory and a dispatch.
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon, dtype)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, dtype):
  mean, var_raw, var = _moments(x)
  a = scale * jax.lax.rsqrt(var + epsilon)
  y = jnp.asarray(x * a + (bias - mean * a), dtype)
  return (y, mean, var), (x, scale, mean, var_raw)


def _batch_norm_train_bwd(epsilon, dtype, res, cts):
  x, scale, mean, var_raw = res
  gy, g_mean, g_var = cts
  n = x.size // x.shape[-1]
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.promote_types(jnp.float32, x.dtype))
  gyf = gy.astype(jnp.float32)
  var = jnp.maximum(0.0, var_raw)
  inv = jax.lax.rsqrt(var + epsilon)
  a = scale * inv
  r1 = jnp.sum(gyf, axes)  # dL/db, b = bias - mean * a
  r2 = jnp.sum(gyf * xf, axes)  # dL/da (through x * a)
  d_a = r2 - mean * r1  # a's total: also through b
  d_scale = inv * d_a
  d_inv = scale * d_a
  d_var = -0.5 * inv * inv * inv * d_inv + g_var
  # jnp.maximum's derivative: 1 above, 0 below, 1/2 at a tie (as autodiff).
  d_var_raw = d_var * jnp.where(var_raw > 0, 1.0, jnp.where(var_raw == 0, 0.5, 0.0))
  d_mean = -a * r1 - 2.0 * mean * d_var_raw + g_mean
  dx = gyf * a + (d_mean / n + (2.0 / n) * d_var_raw * xf)
  return (dx.astype(x.dtype), d_scale.astype(scale.dtype), r1.astype(scale.dtype))


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _batch_norm_train_native(x, scale, bias, residual, ra_mean, ra_var, epsilon, relu, momentum):
  """``_batch_norm_train`` (plus ``residual`` when not None, then ReLU when ``relu``) and the
  running averages' update, as two XLA FFI custom calls: ``(y, new_mean, new_var)``.

  ``JsegBnFwd``: the statistics (summed in double), the normalisation (and ReLU) and the
  running averages, in two passes over ``x``; ``JsegBnBwd``: the two sums of the backward
  and the input gradient in two passes (the ReLU's mask read from the forward's output,
  which the next layer keeps anyway). XLA:CPU compiles ~10 kernels per layer for the
  written-out form, each costing compiler memory; custom calls are thunks
  (``experiments/performance/README.md``, "Eighth pass"). float32 only.
  """
  return _batch_norm_train_native_fwd(x, scale, bias, residual, ra_mean, ra_var, epsilon, relu,
                                      momentum)[0]


def _native_attrs(epsilon, relu):
  return {"eps": np.float32(epsilon), "relu": np.int64(bool(relu))}


def _batch_norm_train_native_fwd(x, scale, bias, residual, ra_mean, ra_var, epsilon, relu,
                                 momentum):
  c = x.shape[-1]
  vec = jax.ShapeDtypeStruct((c,), jnp.float32)
  outs = (jax.ShapeDtypeStruct(x.shape, jnp.float32), vec, vec, vec, vec)
  # (1 - momentum) rounded to float32 as the XLA form's weakly typed constant is.
  attrs = dict(_native_attrs(epsilon, relu), momentum=np.float32(momentum),
               one_minus=np.float32(1 - momentum))
  stats = (ra_mean.astype(jnp.float32), ra_var.astype(jnp.float32))
  if residual is None:
    y, new_mean, new_var, mean, var_raw = jax.ffi.ffi_call(
        "JsegBnFwd", outs, vmap_method="sequential")(x, scale, bias, *stats, **attrs)
  else:
    y, new_mean, new_var, mean, var_raw = jax.ffi.ffi_call(
        "JsegBnAddFwd", outs, vmap_method="sequential")(x, residual, scale, bias, *stats, **attrs)
  # Residuals must be arrays or None: an empty array marks that a residual was added.
  res = (x, y if relu else None, scale, mean, var_raw,
         None if residual is None else jnp.zeros((0,), jnp.float32))
  return (y, new_mean, new_var), res


def _batch_norm_train_native_bwd(epsilon, relu, momentum, res, cts):
  x, y, scale, mean, var_raw, marker = res
  gy, g_new_mean, g_new_var = cts
  has_residual = marker is not None
  vec = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
  full = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  # The new running averages' cotangents reach the batch mean and (clipped) variance times
  # (1 - momentum) (zeros in training: nothing differentiates the statistics, and XLA folds
  # them away); the variance's reaches var_raw through jnp.maximum (derivative 1 above 0,
  # 1/2 at 0, 0 below), which the kernel applies with the rest of the chain rule.
  one_minus = np.float32(1 - momentum)
  args = (gy.astype(jnp.float32), x, y if relu else x, scale, mean, var_raw,
          one_minus * g_new_mean.astype(jnp.float32), one_minus * g_new_var.astype(jnp.float32))
  attrs = _native_attrs(epsilon, relu)
  g_ra = (np.float32(momentum) * g_new_mean, np.float32(momentum) * g_new_var)
  # dx is written over gy (input_output_aliases): XLA reuses gy's buffer when gy dies here,
  # as it does for its own fusions, and copies gy first when it does not.
  if not has_residual:
    dx, d_scale, d_bias = jax.ffi.ffi_call(
        "JsegBnBwd", (full, vec, vec), vmap_method="sequential",
        input_output_aliases={0: 0})(*args, **attrs)
    return (dx, d_scale, d_bias, None, *g_ra)
  if not relu:  # the residual's cotangent is gy itself
    dx, d_scale, d_bias = jax.ffi.ffi_call(
        "JsegBnBwd", (full, vec, vec), vmap_method="sequential")(*args, **attrs)
    return (dx, d_scale, d_bias, args[0], *g_ra)
  dx, d_res, d_scale, d_bias = jax.ffi.ffi_call(
      "JsegBnAddBwd", (full, full, vec, vec), vmap_method="sequential",
      input_output_aliases={0: 0})(*args, **attrs)
  return (dx, d_scale, d_bias, d_res, *g_ra)


_batch_norm_train_native.defvjp(_batch_norm_train_native_fwd, _batch_norm_train_native_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _batch_norm_then_native(x, scale, bias, ra_mean, ra_var, args, epsilon, relu, momentum, fn):
  """``(fn(y, *args), new_mean, new_var)`` for ``y`` = ``_batch_norm_train_native``'s output,
  with ``y`` recomputed in the backward (``JsegBnApply``) instead of kept."""
  return _batch_norm_then_native_fwd(x, scale, bias, ra_mean, ra_var, args, epsilon, relu,
                                     momentum, fn)[0]


def _batch_norm_then_native_fwd(x, scale, bias, ra_mean, ra_var, args, epsilon, relu, momentum,
                                fn):
  (y, new_mean, new_var), (x, _, scale, mean, var_raw, _) = _batch_norm_train_native_fwd(
      x, scale, bias, None, ra_mean, ra_var, epsilon, relu, momentum)
  return (fn(y, *args), new_mean, new_var), (x, scale, bias, mean, var_raw, args)


def _batch_norm_then_native_bwd(epsilon, relu, momentum, fn, res, cts):
  x, scale, bias, mean, var_raw, args = res
  g_out, g_new_mean, g_new_var = cts
  # g_out is passed but not read: without that dependency XLA schedules the recomputation
  # in the forward, and y is live as long as before.
  y = jax.ffi.ffi_call("JsegBnApply", jax.ShapeDtypeStruct(x.shape, jnp.float32),
                       vmap_method="sequential")(x, scale, bias, mean, var_raw,
                                                 g_out.astype(jnp.float32),
                                                 **_native_attrs(epsilon, relu))
  _, vjp = jax.vjp(fn, y, *args)  # fn's forward is dead code here: XLA drops it
  gy, *g_args = vjp(g_out)
  res_bn = (x, y if relu else None, scale, mean, var_raw, None)
  dx, d_scale, d_bias, _, g_ra_mean, g_ra_var = _batch_norm_train_native_bwd(
      epsilon, relu, momentum, res_bn, (gy, g_new_mean, g_new_var))
  return dx, d_scale, d_bias, g_ra_mean, g_ra_var, tuple(g_args)


_batch_norm_then_native.defvjp(_batch_norm_then_native_fwd, _batch_norm_then_native_bwd)


def conv_bn_chain(x: jax.Array, convs: Sequence[tuple[Callable, tuple]],
                  bns: Sequence[BatchNorm], train: bool,
                  residual: jax.Array | Callable[[], jax.Array] | None = None) -> jax.Array:
  """``bns[-1](convs[-1](... bns[0](convs[0](x)) ...))``: convolutions each followed by
  its BatchNorm (+ ReLU as each is built), ``residual`` added by the last one (a callable
  is called just before it: a ResNet shortcut traced after the main path, as before).

  ``convs``: ``conv.then_conv`` pairs. In training each BatchNorm feeds the next
  convolution through ``then`` (on CPU its output is recomputed in the backward instead
  of kept); at evaluation each is folded into its own convolution (``conv=``: one oneDNN
  call writes the normalised, rectified activation).
  """
  if len(convs) != len(bns) or not bns:
    raise ValueError(f"conv_bn_chain: {len(convs)} convolutions for {len(bns)} BatchNorms.")
  last = len(bns) - 1
  y = x
  for i, bn in enumerate(bns):
    res = None
    if i == last and residual is not None:
      res = residual() if callable(residual) else residual
    if train:
      then = convs[i + 1] if i < last else None
      y = bn(y, conv=convs[0] if i == 0 else None, then=then, residual=res)
    else:
      y = bn(y, conv=convs[i], residual=res)
  return y
