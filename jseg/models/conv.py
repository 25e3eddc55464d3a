"""The convolution every jseg network uses: oneDNN on CPU when available, else XLA's.

``conv_general_dilated`` is a drop-in for ``jax.lax.conv_general_dilated``; ``Conv`` is
``flax.linen.Conv`` wired to it (same parameters, same names, same checkpoints). A
float32 2-D NHWC/HWIO convolution on the CPU backend goes to oneDNN's direct
convolutions through an XLA custom call (``jseg.native``), with a ``custom_vjp`` whose
backward pass is oneDNN's input- and kernel-gradient primitives. Everything else
(bfloat16, GPU/TPU, input dilation, other layouts) is ``lax.conv_general_dilated``.

Measured on the 2-core CPU (``experiments/performance/onednn_layers.json``): one 3x3 layer
4x256x256x32->32 forward+backward 231 -> 119 ms (torch 293), a depthwise 3x3 layer
4x64x64x128 299 -> 3.7 ms (torch 11.4); whole training steps x1.29-1.80. Values agree with
XLA's to float32 rounding (``tests/test_conv.py``).

Which implementation is chosen is read when a function is traced: the environment
variable ``JSEG_CONV`` = ``auto`` (default: oneDNN on a single CPU device when it
builds), ``onednn`` (raise if it cannot be used) or ``xla`` (never use it). How a call
uses the cores is ``JSEG_CONV_THREADS`` (``conv_split``): by default it is cut into
single-threaded oneDNN calls on XLA's own threads (per image group, band of output rows
or group of output channels), so oneDNN's OpenMP threads do not compete with XLA's
(training steps 3-26% faster, ``experiments/performance/README.md``, eleventh pass).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jseg import native

Padding = str | Sequence[tuple[int, int]]
_MODES = ("auto", "onednn", "xla")


def conv_mode() -> str:
  """``JSEG_CONV`` (``auto`` | ``onednn`` | ``xla``), checked."""
  return native.env_mode("JSEG_CONV", _MODES)


def onednn_active() -> bool:
  """Whether float32 NHWC convolutions traced now go to oneDNN.

  ``auto`` uses it only with a single device: XLA's SPMD partitioner does not split a
  custom call, so with a batch sharded over several devices (or hosts) it gathers the
  whole batch onto every device and each runs the full convolution (checked in the
  compiled HLO: an ``all-gather`` before every call). ``onednn`` uses it anyway.
  """
  mode = conv_mode()
  if mode == "xla" or (mode == "auto" and jax.device_count() > 1):
    return False
  if jax.default_backend() != "cpu":
    if mode == "onednn":
      raise RuntimeError(
          f"JSEG_CONV=onednn needs the CPU backend; this is {jax.default_backend()}.")
    return False
  if native.onednn() is None:
    if mode == "onednn":
      raise RuntimeError(f"JSEG_CONV=onednn, but the oneDNN extension is unavailable: "
                         f"{native.onednn_error()}")
    return False
  return True


@functools.lru_cache(maxsize=256)
def onednn_depthwise_without_gemm(x_shape: tuple[int, ...], kernel: int, stride: int,
                                 dilation: int, padding: int) -> bool:
  """Whether oneDNN runs this depthwise convolution and both its gradients without falling
  back to its GEMM implementation (``gemm`` in an implementation's name).

  oneDNN 3.2 has depthwise kernels (``jit_dw``) for every direction only at dilation 1;
  at rates 2 and 6 its gradients use the generic direct kernels (as fast as XLA's shifted
  products, and they keep less for the backward), at 12 and 18 GEMMs: at 8x16x16x256,
  forward + both gradients took 10.5 ms at rate 12 and 25.4 ms at 18 against 4.0-5.8 and
  1.0-1.5 ms for the shifted products (``experiments/performance/depthwise_paths.py``).
  """
  names = _depthwise_impls(x_shape, kernel, stride, dilation, padding)
  return bool(names) and not any("gemm" in name or name.startswith("ref") for name in names)


@functools.lru_cache(maxsize=256)
def onednn_depthwise_kernels(x_shape: tuple[int, ...], kernel: int, stride: int,
                             dilation: int, padding: int) -> bool:
  """Whether oneDNN has its depthwise kernels (``_dw`` in the name: ``jit_dw``,
  ``brdgmm_dw``) for this depthwise convolution in every direction, as it has at dilation
  1. Elsewhere its generic direct kernels were 3-4.5x slower than the shifted products with
  ``jseg.native``'s kernel gradient (``layers.DepthwiseConv``)."""
  names = _depthwise_impls(x_shape, kernel, stride, dilation, padding)
  return bool(names) and all("_dw" in name for name in names)


@functools.lru_cache(maxsize=256)
def onednn_depthwise_forward_kernel(x_shape: tuple[int, ...], kernel: int, stride: int,
                                    dilation: int, padding: int) -> bool:
  """Whether oneDNN's forward of this depthwise convolution is one of its depthwise kernels
  (``_dw`` in the name; on AVX-512 up to rate 6 at 16x16, rate 4 at 32x32)."""
  names = _depthwise_impls(x_shape, kernel, stride, dilation, padding)
  return bool(names) and "_dw" in names[0]


def _depthwise_impls(x_shape, kernel, stride, dilation, padding) -> list[str]:
  """oneDNN's implementation names for a depthwise convolution's forward, input gradient and
  kernel gradient ([] if it cannot build them)."""
  n, c = x_shape[0], x_shape[-1]
  k_shape, strides, dil = (kernel, kernel, 1, c), (stride, stride), (dilation, dilation)
  pad = ((padding, padding), (padding, padding))
  oh, ow = _out_hw(x_shape, k_shape, strides, dil, pad)
  try:
    return [native.onednn_impl(kind, x_shape, k_shape, (n, oh, ow, c), strides, dil, pad, c)
            for kind in "fdw"]
  except native.NativeBuildError:
    return []


def conv_backend_summary() -> str:
  """One line for logs: which convolutions float32 CPU steps use here, and why."""
  if onednn_active():
    return "oneDNN (jseg.native custom call)"
  if conv_mode() == "xla":
    return "XLA (JSEG_CONV=xla)"
  if jax.device_count() > 1:
    return f"XLA ({jax.device_count()} devices: the oneDNN custom call is not partitioned)"
  if jax.default_backend() != "cpu":
    return f"XLA ({jax.default_backend()} backend)"
  return f"XLA (oneDNN extension unavailable: {native.onednn_error()})"


def _require_onednn() -> None:
  """Builds/registers the custom calls (once per process) or raises saying why not."""
  if native.onednn() is None:
    raise RuntimeError(f"The oneDNN extension is unavailable: {native.onednn_error()}")


_THREAD_MODES = ("xla", "openmp")
# Call kinds of a forward convolution: plain, and with an epilogue (native.onednn_impl).
FORWARD_KINDS = ("f", "p", "q", "r", "s", "P", "Q", "R", "S")


def _intra_op_threads() -> int:
  """The threads of XLA:CPU's intra-op pool: one per CPU this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


# A kernel gradient whose kernel has more elements than this many times one part's input is
# cut over output channels, not images: with images, each part would stream the whole
# kernel through its core's cache and write a whole kernel gradient, summed afterwards
# (eleventh pass: a 3x3 512->512 layer on 8x8 maps, batch 4, 6.7-7.1 ms in image parts
# against 4.9-5.0 whole; t threads would hold t kernels).
KERNEL_SPLIT_RATIO = 1.0


def conv_split(kind: str, x_shape, y_shape, k_shape) -> tuple[int, int]:
  """How one oneDNN call is cut over XLA:CPU's intra-op threads: ``(split, chunks)``.

  ``JSEG_CONV_THREADS`` (read when a function is traced) = ``xla`` (default), with t
  threads and n images:

  - t divides n: t groups of n / t images (``(1, t)``), except as below;
  - a forward call otherwise: every image's output rows in r = t / gcd(n, t) bands, so the
    n * r parts share evenly over the threads (``(2, r)``);
  - a kernel gradient: in row bands like the forward when its kernel is light
    (``KERNEL_SPLIT_RATIO``) and n < t; by t groups of output channels (``(3, t)``) when
    its kernel outweighs one part's input or t does not divide n;
  - an input gradient when t does not divide n: t groups of input channels (``(4, t)``).

  Channel groups need an ungrouped convolution and t | channels. Each part is a
  single-threaded oneDNN call on one of XLA's threads, so oneDNN starts no OpenMP threads
  of its own to compete with XLA's for the cores. Image and band parts' kernel gradients
  are added in part order: results do not depend on which thread ran which part, but do on
  t (float32 sums grouped otherwise). Calls none of these fit, and every call under
  ``openmp`` or with one thread, run whole on oneDNN's OpenMP threads (``(0, 1)``), as
  before this option existed.
  """
  mode = native.env_mode("JSEG_CONV_THREADS", _THREAD_MODES)
  threads = _intra_op_threads()
  n = x_shape[0]
  if mode == "openmp" or threads < 2:
    return 0, 1
  ungrouped = x_shape[3] == k_shape[2]
  bands = min(threads // math.gcd(n, threads), y_shape[1])
  if kind == "w":
    heavy = math.prod(k_shape) > KERNEL_SPLIT_RATIO * math.prod(x_shape) / threads
    if not heavy and n < threads and n * bands >= threads:
      return 2, bands
    if ungrouped and k_shape[3] % threads == 0 and (heavy or n % threads):
      return 3, threads
  if kind == "d" and ungrouped and n % threads and k_shape[2] % threads == 0:
    return 4, threads
  if n % threads == 0:
    return 1, threads
  return (2, bands) if kind in FORWARD_KINDS and n * bands >= 2 else (0, 1)


def _attrs(strides, dilation, padding, groups, split=0, chunks=1) -> dict[str, Any]:
  return dict(
      strides=np.asarray(strides, np.int64),
      dilation=np.asarray(dilation, np.int64),
      padding=np.asarray([p for pair in padding for p in pair], np.int64),
      groups=np.int64(groups),
      split=np.int64(split),
      chunks=np.int64(chunks),
  )


def _call(target: str, kind: str, out_shape, x_shape, k_shape, y_shape, strides, dilation,
          padding, groups, *operands, relu: bool | None = None,
          aliases: dict[int, int] | None = None) -> jax.Array:
  """One oneDNN custom call: its float32 result, plus a uint8 workspace output (oneDNN's
  scratchpad and reordered kernel) that XLA allocates among its temporaries and drops.
  ``relu``: the epilogue calls' attribute; ``aliases``: operand -> result buffers XLA
  shares (the residual an epilogue adds is the output's buffer)."""
  geom = (kind, tuple(x_shape), tuple(k_shape), tuple(y_shape), tuple(strides),
          tuple(dilation), tuple(padding), int(groups))
  split, chunks = conv_split(kind, x_shape, y_shape, k_shape)
  try:
    ws = native.onednn_workspace(*geom, split, chunks)
  except native.NativeBuildError:
    if split == 0:
      raise
    split, chunks = 0, 1  # oneDNN cannot take this cut (row bands in different layouts)
    ws = native.onednn_workspace(*geom, split, chunks)
  attrs = _attrs(strides, dilation, padding, groups, split, chunks)
  if relu is not None:
    attrs["relu"] = np.int64(relu)
  return jax.ffi.ffi_call(
      target, (jax.ShapeDtypeStruct(out_shape, jnp.float32), jax.ShapeDtypeStruct((ws,), jnp.uint8)),
      vmap_method="sequential", input_output_aliases=aliases)(*operands, **attrs)[0]


def _out_hw(x_shape, k_shape, strides, dilation, padding) -> tuple[int, int]:
  return tuple(
      (x_shape[1 + i] + padding[i][0] + padding[i][1] - (k_shape[i] - 1) * dilation[i] - 1)
      // strides[i] + 1
      for i in range(2)
  )


class Epilogue(NamedTuple):
  """What a forward convolution does to its output: ``relu?(y * scale + shift [+
  residual])`` (``scale``, ``shift`` per output channel), a BatchNorm at evaluation
  (``norm.BatchNorm(conv=...)``). On oneDNN the scale is applied by the reorder of the
  kernel into oneDNN's layout, which runs every call anyway (``JsegConvScaleBias``; the
  same bits as multiplying the kernel first), and the rest runs in the convolution's own
  call (bias, sum and ReLU post-ops): the output is written once instead of written,
  re-read and re-written by a separate pass, and no pass over the kernel scales it. Only
  where oneDNN would read the kernel as it is and the kernel outweighs the output is it
  the separate pass (a scaled copy would cost more); elsewhere (XLA's convolutions) too.
  Measured (``inproc_ab.py --change=scale_reorder``, 2 threads, batch 1, 256²): the
  paper-sized DeepLab v3's evaluation 107.5 -> 94.3 ms, the bench presets' DeepLab v3 and
  PSPNet 4-6% shorter, paper PSPNet unchanged."""

  scale: jax.Array | None  # None: 1 (a bias and ReLU only, ``conv_relu``)
  shift: jax.Array
  relu: bool = False
  residual: jax.Array | None = None

  def apply(self, y: jax.Array) -> jax.Array:
    """The same function as separate operations (every path but oneDNN's)."""
    if self.residual is not None and self.residual.shape != y.shape:
      raise ValueError(f"conv epilogue: residual shape {self.residual.shape} is not the "
                       f"output's {y.shape}.")
    y = y if self.scale is None else y * self.scale.astype(y.dtype)
    y = y + self.shift.astype(y.dtype)
    y = y if self.residual is None else y + self.residual.astype(y.dtype)
    return nn.relu(y) if self.relu else y  # gradient 0 at 0, as the oneDNN path's


def onednn_conv(x: jax.Array, k: jax.Array, strides: tuple[int, int],
                dilation: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]],
                groups: int, epilogue: Epilogue | None = None) -> jax.Array:
  """NHWC x HWIO -> NHWC float32 convolution by oneDNN (explicit non-negative padding).

  A strided 1x1 convolution without padding reads every s-th pixel: it is computed as
  that slice followed by a stride-1 convolution, because oneDNN 3.2's backward of strided
  1x1 convolutions corrupts the heap
  (``experiments/performance/onednn_strided_1x1.py`` reproduces it).
  """
  strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
  x, padding = _pad_beyond_kernel(x, k.shape, dilation, padding)
  if k.shape[:2] == (1, 1) and max(strides) > 1 and padding == ((0, 0), (0, 0)):
    x, strides = x[:, ::strides[0], ::strides[1]], (1, 1)
  dilation, groups = tuple(dilation), int(groups)
  if epilogue is None:
    return _onednn_conv(x, k, strides, dilation, padding, groups)
  y_shape = (x.shape[0], *_out_hw(x.shape, k.shape, strides, dilation, padding), k.shape[3])
  if (epilogue.scale is not None and math.prod(y_shape) < math.prod(k.shape)
      and not _reorders_kernel(x.shape, k.shape, y_shape, strides, dilation, padding, groups,
                               epilogue)):
    # The scaled copy of a kernel read as it is would outweigh the pass over the output it
    # saves (where oneDNN reorders the kernel anyway, the scale rides on that reorder).
    return epilogue.apply(_onednn_conv(x, k, strides, dilation, padding, groups))
  f32 = lambda v: None if v is None else jnp.asarray(v, jnp.float32)
  return _onednn_conv_epilogue(x, k, f32(epilogue.scale), f32(epilogue.shift),
                               f32(epilogue.residual), strides, dilation, padding, groups,
                               bool(epilogue.relu))


def _pad_beyond_kernel(x: jax.Array, k_shape, dilation, padding
                       ) -> tuple[jax.Array, tuple[tuple[int, int], tuple[int, int]]]:
  """``x`` padded with zeros where the convolution's padding exceeds its kernel's extent
  less one, and the padding left to the convolution (half the extent there).

  oneDNN runs a convolution padded by as much as its kernel's extent or more (FCN's
  conv1_1, padded by 100 as in the Caffe original) with its GEMM code: 3 -> 16 channels
  at 256^2 batch 1, 4.9 ms; the image padded by 99 first and the convolution padded by 1,
  0.8-1.3 ms, and forward + parameter gradient at batch 4 59.6-63.3 -> 38.5-45.7 ms in
  three runs, same values (``experiments/performance/fcn_first_conv.py``). Ordinary
  paddings pass unchanged.
  """
  eff = [(k_shape[i] - 1) * dilation[i] + 1 for i in range(2)]
  if all(p <= eff[i] - 1 for i in range(2) for p in padding[i]):
    return x, padding
  keep = [tuple(p if p <= eff[i] - 1 else eff[i] // 2 for p in padding[i]) for i in range(2)]
  extra = [(0, 0)] + [(padding[i][0] - keep[i][0], padding[i][1] - keep[i][1])
                      for i in range(2)] + [(0, 0)]
  return jnp.pad(x, extra), (keep[0], keep[1])


def _reorders_kernel(x_shape, k_shape, y_shape, strides, dilation, padding, groups,
                     epilogue: Epilogue) -> bool:
  """Whether the unscaled epilogue call of this geometry reorders its kernel (so a scale
  applied in that reorder costs no extra pass)."""
  kind = _epilogue_kind(epilogue.residual is not None, bool(epilogue.relu), scaled=False)
  split, chunks = conv_split(kind, x_shape, y_shape, k_shape)
  geom = (kind, tuple(x_shape), tuple(k_shape), tuple(y_shape), tuple(strides),
          tuple(dilation), tuple(padding), int(groups))
  try:
    return native.onednn_kernel_reorder(*geom, split, chunks)
  except native.NativeBuildError:
    return native.onednn_kernel_reorder(*geom, 0, 1)


def _epilogue_kind(residual: bool, relu: bool, scaled: bool) -> str:
  """The native call kind of an epilogue (``onednn_impl``): p/q/r/s, upper case scaled."""
  kind = ("s" if relu else "r") if residual else ("q" if relu else "p")
  return kind.upper() if scaled else kind


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _onednn_conv(x: jax.Array, k: jax.Array, strides: tuple[int, int],
                 dilation: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]],
                 groups: int) -> jax.Array:
  """The custom call itself, with its custom VJP (no geometry workarounds)."""
  _require_onednn()
  oh, ow = _out_hw(x.shape, k.shape, strides, dilation, padding)
  y_shape = (x.shape[0], oh, ow, k.shape[3])
  return _call("JsegConvFwd", "f", y_shape, x.shape, k.shape, y_shape, strides, dilation,
               padding, groups, x, k)


def _fwd(x, k, strides, dilation, padding, groups):
  # symbolic_zeros: x.perturbed is False for an input no gradient flows to (the image
  # entering the first layer); its input gradient is then not computed, as in torch.
  y = _onednn_conv(x.value, k.value, strides, dilation, padding, groups)
  return y, (x.value, k.value, x.perturbed, k.perturbed)


_GEMM_GRAD_MODES = ("xla", "onednn")


def kernel_grad_on_xla(x_shape: tuple[int, ...], k_shape: tuple[int, ...],
                       y_shape: tuple[int, ...], strides: tuple[int, int],
                       dilation: tuple[int, int], padding: tuple[tuple[int, int], ...],
                       groups: int) -> bool:
  """Whether this convolution's kernel gradient is XLA's rather than oneDNN's: where
  oneDNN has only its GEMM fallback for it (``gemm`` in the implementation's name; oneDNN
  3.2 on AVX2 for dilated convolutions) and the kernel has >= 128 input and >= 64 output
  channels. There XLA's convolution was 1.2-1.8x faster (AVX2 EPYC, batch 4: 32x32
  256->256 rate 4 77.5 vs 44.7 ms, 512->512 rate 4 190.3 vs 136.3, 128->128 rate 2 14.7 vs
  12.3, 16x16 256->64 rate 12 7.7 vs 4.5); with fewer channels oneDNN's GEMM was faster
  (64->64 rate 2 5.3 vs 6.7 ms; 256->11 rate 12 13.0 vs 14.3). Forward and input gradient
  were on par (fifteenth pass, ``experiments/performance/README.md``).
  ``JSEG_CONV_GEMM_GRAD=onednn`` keeps oneDNN's everywhere."""
  if native.env_mode("JSEG_CONV_GEMM_GRAD", _GEMM_GRAD_MODES) == "onednn":
    return False
  if k_shape[2] < 128 or k_shape[3] < 64:
    return False
  split, chunks = conv_split("w", x_shape, y_shape, k_shape)
  return "gemm" in _impl_name("w", tuple(x_shape), tuple(k_shape), tuple(y_shape),
                              tuple(strides), tuple(dilation),
                              tuple(map(tuple, padding)), int(groups), split, chunks)


@functools.lru_cache(maxsize=512)
def _impl_name(kind: str, *geom) -> str:
  """oneDNN's implementation name for one call's geometry and cut ('' if it cannot build)."""
  try:
    return native.onednn_impl(kind, *geom)
  except native.NativeBuildError:
    return ""


def _xla_kernel_grad(x: jax.Array, dy: jax.Array, k_shape, strides, dilation, padding,
                     groups) -> jax.Array:
  """The kernel gradient as XLA's convolution (the transpose of the kernel-linear map)."""
  def conv(k):
    return lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups)
  return jax.linear_transpose(conv, jax.ShapeDtypeStruct(k_shape, jnp.float32))(dy)[0]


def _bwd(strides, dilation, padding, groups, res, dy):
  x, k, need_dx, need_dk = res
  if isinstance(dy, SymbolicZero):
    return None, None
  dy = dy.astype(jnp.float32)
  geom = (x.shape, k.shape, dy.shape, strides, dilation, padding, groups)
  dx = dk = None
  if need_dx:
    dx = _call("JsegConvBwdData", "d", x.shape, *geom, dy, k)
  if need_dk:
    if kernel_grad_on_xla(*geom):
      dk = _xla_kernel_grad(x, dy, k.shape, strides, dilation, padding, groups)
    else:
      dk = _call("JsegConvBwdWeights", "w", k.shape, *geom, x, dy)
  return dx, dk


_onednn_conv.defvjp(_fwd, _bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _onednn_conv_epilogue(x: jax.Array, k: jax.Array, scale: jax.Array | None, bias: jax.Array,
                          residual: jax.Array | None, strides: tuple[int, int],
                          dilation: tuple[int, int],
                          padding: tuple[tuple[int, int], tuple[int, int]], groups: int,
                          relu: bool) -> jax.Array:
  """relu?(conv(x, k * scale) + bias [+ residual]) as one oneDNN call: the scale (per output
  channel) in the kernel's reorder into oneDNN's layout, bias, sum and ReLU as post-ops."""
  _require_onednn()
  oh, ow = _out_hw(x.shape, k.shape, strides, dilation, padding)
  y_shape = (x.shape[0], oh, ow, k.shape[3])
  if bias.shape != (k.shape[3],):
    raise ValueError(f"conv epilogue: shift shape {bias.shape} is not ({k.shape[3]},).")
  if scale is not None and scale.shape != (k.shape[3],):
    raise ValueError(f"conv epilogue: scale shape {scale.shape} is not ({k.shape[3]},).")
  if residual is not None and residual.shape != y_shape:
    raise ValueError(f"conv epilogue: residual shape {residual.shape} is not the output's {y_shape}.")
  kind = _epilogue_kind(residual is not None, relu, scale is not None)
  geom = (y_shape, x.shape, k.shape, y_shape, strides, dilation, padding, groups)
  target = "JsegConv" + ("Scale" if scale is not None else "") + "Bias"
  head = (x, k) if scale is None else (x, k, scale)
  if residual is None:
    return _call(target, kind, *geom, *head, bias, relu=relu)
  return _call(target + "Add", kind, *geom, *head, bias, residual, relu=relu,
               aliases={len(head) + 1: 0})


def _epilogue_fwd(x, k, scale, bias, residual, strides, dilation, padding, groups, relu):
  y = _onednn_conv_epilogue(x, k, scale, bias, residual, strides, dilation, padding, groups, relu)
  return y, (x, k, scale, y if relu else None, residual is None)


def _epilogue_bwd(strides, dilation, padding, groups, relu, res, dy):
  # Evaluation graphs are rarely differentiated; when they are (saliency, attacks on an
  # eval-mode network) this is the unfused layers' gradient.
  x, k, scale, y, no_residual = res
  dz = (jnp.where(y > 0, dy, 0) if relu else dy).astype(jnp.float32)
  k_eff = k if scale is None else k * scale
  dx, dk = _bwd(strides, dilation, padding, groups, (x, k_eff, True, True), dz)
  dscale = None if scale is None else (dk * k).sum((0, 1, 2))
  dk = dk if scale is None else dk * scale
  return dx, dk, dscale, dz.sum((0, 1, 2)), None if no_residual else dz


_onednn_conv_epilogue.defvjp(_epilogue_fwd, _epilogue_bwd)


def _explicit_padding(padding: Padding, x_shape, k_shape, strides, dilation):
  if isinstance(padding, str):
    eff = [(k_shape[i] - 1) * dilation[i] + 1 for i in range(2)]
    return tuple(tuple(int(v) for v in p)
                 for p in lax.padtype_to_pads(x_shape[1:3], eff, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _is_nhwc_hwio(dimension_numbers, lhs_shape, rhs_shape) -> bool:
  want = lax.conv_dimension_numbers(lhs_shape, rhs_shape, ("NHWC", "HWIO", "NHWC"))
  if dimension_numbers is None:  # lax's default is NCHW/OIHW
    return False
  return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) == want


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    epilogue: Epilogue | None = None,
) -> jax.Array:
  """``lax.conv_general_dilated``, by oneDNN where it applies (see the module docstring).

  ``epilogue``: applied to the output (``Epilogue``), in the convolution's own call on
  oneDNN, else as separate operations."""
  after = (lambda y: y) if epilogue is None else epilogue.apply
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count, precision, preferred_element_type)
  ok = (  # an NHWC/HWIO convolution with explicit geometry: dead taps can be dropped
      lhs.ndim == 4 and rhs.ndim == 4
      and batch_group_count == 1
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and min(lhs.shape) > 0 and min(rhs.shape) > 0
      and _is_nhwc_hwio(dimension_numbers, lhs.shape, rhs.shape)
  )
  if ok:
    strides = tuple(int(s) for s in window_strides)
    dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
    pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides, dilation)
    ok = min(p for pair in pads for p in pair) >= 0 and min(
        _out_hw(lhs.shape, rhs.shape, strides, dilation, pads)) > 0
  if ok:
    rhs, pads = trim_dead_taps(lhs.shape, rhs, strides, dilation, pads)
    float32 = (lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
               and preferred_element_type in (None, jnp.float32, np.float32))
    if float32 and onednn_active():
      return onednn_conv(lhs, rhs, strides, dilation, pads, int(feature_group_count), epilogue)
    return after(lax.conv_general_dilated(lhs, rhs, strides, pads, None, dilation,
                                          dimension_numbers, feature_group_count, 1, precision,
                                          preferred_element_type))
  return after(lax.conv_general_dilated(*args))


def live_taps(size: int, kernel: int, stride: int, dilation: int,
              pad: tuple[int, int]) -> tuple[int, int]:
  """``[first, last]`` kernel taps along one axis that read at least one input sample.

  Tap ``t`` reads input rows ``i * stride + t * dilation - pad[0]`` for the output rows ``i``;
  a tap whose rows all fall in the padding multiplies zeros. Dead taps form a prefix and a
  suffix (the rows a tap reads shift right as ``t`` grows), so the live ones are a range.
  """
  out = (size + pad[0] + pad[1] - (kernel - 1) * dilation - 1) // stride + 1
  live = [t for t in range(kernel)
          if t * dilation - pad[0] <= size - 1 and (out - 1) * stride + t * dilation - pad[0] >= 0]
  return (live[0], live[-1]) if live else (0, kernel - 1)


def trim_dead_taps(x_shape, k: jax.Array, strides, dilation, pads):
  """Drops the kernel rows/columns that only ever read padding, adjusting the padding so
  the output (shape and values) is unchanged.

  An atrous convolution whose rate reaches the feature map's size reads zeros with its
  outer taps: DeepLab's ASPP at rate 18 on the 16x16 map of a 256^2 crop (output stride 16)
  is exactly a 1x1 convolution with the centre tap. oneDNN runs such a convolution with
  its generic GEMM kernels, and every framework spends 9x the work on it. The kernel
  gradient of a dropped tap is exactly zero, as autodiff of the slice gives.
  """
  new_k, new_pads = k, list(pads)
  out_hw = _out_hw(x_shape, k.shape, strides, dilation, pads)
  for axis in range(2):
    lo, hi = live_taps(x_shape[1 + axis], k.shape[axis], strides[axis], dilation[axis], pads[axis])
    if (lo, hi) == (0, k.shape[axis] - 1):
      continue
    size, d = x_shape[1 + axis], dilation[axis]
    p_lo = pads[axis][0] - lo * d  # the first live tap now starts the window
    p_hi = (out_hw[axis] - 1) * strides[axis] + (hi - lo) * d + 1 - size - p_lo  # same output size
    if p_lo < 0 or p_hi < 0:
      continue
    new_k = lax.slice_in_dim(new_k, lo, hi + 1, axis=axis)
    new_pads[axis] = (p_lo, p_hi)
  return new_k, tuple(new_pads)


# flax.linen.Conv computing with ``conv_general_dilated``: same fields, params and names.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


class ConvKernel(nn.Module):
  """The ``kernel`` parameter a bias-free ``Conv(features, kernel_size, kernel_init=...)``
  creates under the same name: same path, shape, initialiser and random key, so
  checkpoints are unchanged. For a convolution applied as a function of its kernel
  (``norm.BatchNorm``'s ``then``, with ``as_function``). ``use_bias=True`` returns
  ``(kernel, bias)`` as ``Conv(..., use_bias=True)`` creates them (bias after kernel)."""

  features: int
  kernel_size: tuple[int, int]
  kernel_init: Any = nn.linear.default_kernel_init
  use_bias: bool = False
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, in_features: int) -> jax.Array | tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, in_features, self.features), jnp.float32)
    if not self.use_bias:
      return kernel
    return kernel, self.param("bias", self.bias_init, (self.features,), jnp.float32)


def as_function(conv: nn.Module) -> Callable[..., jax.Array]:
  """``fn(x, kernel[, bias])``: the unbound ``conv`` (``Conv(..., parent=None)``) applied
  to ``x`` with ``kernel`` (and ``bias`` when the conv has one), the same computation as
  the module bound."""
  return functools.partial(_apply_with_kernel, conv)


def then_conv(conv: nn.Module, in_features: int,
              name: str | None = None) -> tuple[Callable[..., jax.Array], tuple[jax.Array, ...]]:
  """``(fn, params)`` for ``norm.BatchNorm``'s ``then``: the unbound ``conv``
  (``Conv(..., parent=None)``) as a function of its parameters, which are created in the
  calling module under ``name`` (default: ``conv.name``) exactly as the bound ``Conv``
  would create them (path, shapes, initialisers, keys): checkpoints are unchanged."""
  p = ConvKernel(conv.features, tuple(conv.kernel_size), conv.kernel_init, conv.use_bias,
                 conv.bias_init, name=name or conv.name)(in_features)
  return as_function(conv), (p if conv.use_bias else (p,))


def _apply_with_kernel(conv: nn.Module, x: jax.Array, kernel: jax.Array,
                       bias: jax.Array | None = None,
                       epilogue: Epilogue | None = None) -> jax.Array:
  if epilogue is not None:  # a bias is the caller's to fold into the epilogue's shift
    if bias is not None or not isinstance(conv, nn.Conv):
      raise ValueError("an epilogue needs a flax Conv applied without its bias")
    conv = conv.clone(use_bias=False, conv_general_dilated=functools.partial(
        conv.conv_general_dilated, epilogue=epilogue))
    return conv.apply({"params": {"kernel": kernel}}, x)
  params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
  return conv.apply({"params": params}, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_channels(kernel: jax.Array, widths: tuple[int, ...]) -> list[jax.Array]:
  """``kernel`` (HWIO) cut along its input channels into pieces of ``widths``.

  The gradient is the pieces' gradients concatenated: autodiff of the slices padded each
  piece's gradient to the whole kernel and added them (paper-sized PSPNet's step: ~200 MB
  more temporaries for its 3x3x4096x512 head kernel).
  """
  cuts = np.cumsum((0,) + tuple(widths))
  return [kernel[:, :, a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def _split_channels_fwd(kernel, widths):
  return split_channels(kernel, widths), None


def _split_channels_bwd(widths, _, gs):
  return (jnp.concatenate(gs, axis=2),)


split_channels.defvjp(_split_channels_fwd, _split_channels_bwd)


def parts_function(conv: nn.Module) -> Callable[..., jax.Array]:
  """``fn(xs, kernel[, bias], epilogue=None)``: ``as_function(conv)`` applied to the
  concatenation of ``xs`` along channels, without writing it where oneDNN runs.

  There the convolution is one oneDNN call per part with the kernel's matching input
  channels, each adding the previous partial sum as its residual post-op (the scale of an
  ``epilogue`` in every part's call, its shift, residual and ReLU in the first or last);
  elsewhere the concatenation then one convolution. Same function up to float32 rounding
  (the sum's order). A U-Net decoder level or a UNet++ node reads its skip features and the
  upsampled map in place: the concatenation was a separate copy, first-touched every call
  (``experiments/performance/README.md``, twenty-second pass).
  """
  return functools.partial(_apply_parts, conv)


def _apply_parts(conv: nn.Module, xs: Sequence[jax.Array], kernel: jax.Array,
                 bias: jax.Array | None = None, epilogue: Epilogue | None = None, *,
                 split: bool = True) -> jax.Array:
  xs = list(xs)
  widths = tuple(int(x.shape[-1]) for x in xs)
  if sum(widths) != kernel.shape[2]:
    raise ValueError(f"conv over parts: the parts' channels {widths} do not add up to the "
                     f"kernel's {kernel.shape[2]} input channels.")
  if len({x.shape[:-1] for x in xs}) != 1:
    raise ValueError(f"conv over parts: the parts' shapes {[tuple(x.shape) for x in xs]} "
                     "differ outside the channels.")
  if bias is not None and not getattr(conv, "use_bias", True):
    raise ValueError("conv over parts: a bias was given for a Conv built with use_bias=False.")
  one = functools.partial(_apply_with_kernel, conv)
  if not (split and len(xs) > 1 and all(x.dtype == jnp.float32 for x in xs)
          and getattr(conv, "feature_group_count", 1) == 1 and onednn_active()
          and folds_epilogue(one)):
    y = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=-1)
    return one(y, kernel, bias, epilogue)
  if epilogue is None:
    zeros = jnp.zeros((kernel.shape[3],), jnp.float32)
    epilogue = Epilogue(None, zeros if bias is None else bias)
  elif bias is not None:
    raise ValueError("an epilogue needs a flax Conv applied without its bias")
  no_shift = jnp.zeros_like(epilogue.shift)
  y = None
  for i, (x, k) in enumerate(zip(xs, split_channels(kernel, widths))):
    last = i == len(xs) - 1
    y = one(x, k, epilogue=Epilogue(
        epilogue.scale, epilogue.shift if last else no_shift, epilogue.relu and last,
        epilogue.residual if i == 0 else y))
  return y


def then_conv_of(conv: nn.Module, x: jax.Array | Sequence[jax.Array]
                 ) -> tuple[Callable[..., jax.Array], tuple[jax.Array, ...]]:
  """``then_conv(conv, in_features)`` for the input ``x``: an array, or a list of parts
  whose concatenation is the input (then the function is ``parts_function(conv)``)."""
  if isinstance(x, (list, tuple)):
    return parts_function(conv), then_conv(conv, sum(int(p.shape[-1]) for p in x))[1]
  return then_conv(conv, x.shape[-1])


def conv_relu(conv: nn.Module, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
  """``relu(conv(x))`` for an unbound flax ``Conv(..., parent=None)`` whose parameters are
  created in the calling module under ``conv.name``, as the bound ``Conv`` would create
  them (checkpoints unchanged). ``x`` may be a list of parts: the conv of their
  concatenation (``parts_function``).

  On oneDNN the bias and the ReLU run in the convolution's own call (bias and ReLU
  post-ops), in training too: the pre-activation output is never written, and the
  backward reads the ReLU's output (which the next layer keeps anyway) for its mask. With
  the ReLU as a separate op, XLA kept each pre-activation output alive for the backward
  beside the ReLU's (VGG without BatchNorm, FCN, DeepLab v1, CNN+RNN: one full-size
  activation per layer; ``experiments/performance/README.md``, thirteenth pass).
  Elsewhere (XLA, non-float32) it is the two ops.
  """
  fn, params = then_conv_of(conv, x)
  f32 = all(p.dtype == jnp.float32 for p in (x if isinstance(x, (list, tuple)) else [x]))
  if not (folds_epilogue(fn) and onednn_active() and f32):
    return nn.relu(fn(x, *params))
  shift = params[1] if len(params) > 1 else jnp.zeros((conv.features,), jnp.float32)
  return fn(x, params[0], epilogue=Epilogue(None, shift, relu=True))


def folds_epilogue(fn: Callable[..., jax.Array]) -> bool:
  """Whether ``fn`` (``as_function`` / ``then_conv``'s, or ``parts_function``'s) takes an
  ``epilogue=``: a float32 flax ``Conv`` computing with this module's
  ``conv_general_dilated``."""
  if not (isinstance(fn, functools.partial) and fn.func in (_apply_with_kernel, _apply_parts)
          and isinstance(fn.args[0], nn.Conv)):
    return False
  c = fn.args[0]
  return (getattr(c.conv_general_dilated, "func", c.conv_general_dilated) is conv_general_dilated
          and (c.dtype is None or jnp.dtype(c.dtype) == jnp.float32))
