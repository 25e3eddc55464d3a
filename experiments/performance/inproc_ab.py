"""In-process alternated A/B of a code change: the previous form (patched in) vs the current one.

  python experiments/performance/inproc_ab.py --change=upconv --model=unet --size=512 --batch=1 [--train]

Changes (``--change``):
- ``upconv``: ``PixelTransposeConv`` as the per-pixel einsum (before) vs a 1x1 convolution
  + depth-to-space (now);
- ``dw_routing``: every ``DepthwiseConv`` as oneDNN's grouped convolution (before) vs
  only where oneDNN has depthwise kernels for it and its gradients (now);
- ``loss_vjp``: the class log-probabilities unrolled over the class planes with autodiff's
  backward (before) vs the closed-form custom VJP (now);
- ``bn_affine``: ``flax.linen.BatchNorm``, normalising as ``(x - mean) * mul + bias``
  (before) vs ``jseg.models.norm.BatchNorm``, one affine ``x * mul + (bias - mean * mul)``
  (now);
- ``bn_vjp``: that BatchNorm's training forward differentiated by autodiff (before) vs its
  written-out VJP (now, ``norm._batch_norm_train``);
- ``resize_eval``: the output logits upsampled in inference by the training form (two dense
  matmuls + a transpose, before) vs a width matmul + ``layers.upsample_rows`` (now);
- ``trim_taps``: every convolution with all its taps (before) vs without the taps that read
  only padding (now, ``conv.trim_dead_taps``).
- ``split_update`` (with ``--train``): the step as one program (before) vs gradients and
  optimiser update as two (now, ``trainer.SplitStep``); fusions and temporaries summed.
- ``bn_native``: BatchNorm's training forward/backward as XLA fusions (before,
  ``JSEG_BN=xla``) vs ``jseg.native``'s two custom calls per layer (now).
- ``conv_workspace``: oneDNN's scratchpad and reordered kernel in per-thread buffers (before:
  a 1-byte workspace, too small, so the kernel falls back to them) vs an XLA workspace output
  of each call (now).
- ``loss_native``: the loss end in XLA (before, ``JSEG_LOSS=xla``: the output upsampled by
  two matmuls, the class log-probabilities as fusions) vs ``jseg.native``'s kernels, the
  gradient written over the full-size logits, which the width upsampling (now a oneDNN
  1x1 convolution) hands over without a copy (now).
- ``bn_then``: a BatchNorm's output kept for the convolution it feeds (before) vs recomputed
  in the backward from the BatchNorm's input (now, ``BatchNorm(then=...)``; Xception's
  separable convolutions).
- ``pool_position``: the ResNet stem's 3x3/2 max pool differentiated by autodiff (before)
  vs its custom VJP keeping the int8 window position of each maximum (now).
- ``kernel_split``: every kernel gradient cut by images (before) vs by output channels
  where its kernel outweighs one part's input (now, ``conv.KERNEL_SPLIT_RATIO``).
- ``input_channels``: input gradients of a batch the thread count does not divide whole on
  OpenMP's threads (before) vs cut by input channels on XLA's (now, ``conv_split`` 4).
- ``ppm_pools``: PSPNet's pyramid pooling as one ``adaptive_avg_pool`` per bin (before) vs
  one stacked pooling for all bins (now, ``layers.adaptive_avg_pools``).
- ``conv_threads``: each oneDNN convolution one call on OpenMP's threads (before,
  ``JSEG_CONV_THREADS=openmp``) vs cut into single-threaded parts on XLA's threads (now,
  ``conv.conv_split``).
- ``pool_pad``: the ResNet stem's max pool on a padded copy of its input (before) vs
  strided slices with a -inf row joined where a window leaves the map (now,
  ``layers._window3``).
- ``pool_same``: the k x k stride-1 max pool (RefineNet's chained residual pooling,
  DeepLab v1's 3x3 pools) as shifted maxima differentiated by autodiff (before) vs its
  custom VJP keeping the int8 column and row of each maximum (now, ``layers.max_pool_same``).
- ``pool_reduce``: the max pools' int8 window positions (``max_pool_same``, the stem's
  ``max_pool_3x3_s2``) as ``maximum`` / ``where(tap == max)`` chains (before; XLA fused
  the positions into the backward and kept the f32 taps alive) vs one variadic reduction
  over the stacked taps (now, ``layers._first_max``).
- ``pool2_positions``: the 2x2/2 max pool (U-Net, UNet++, VGG, CNN+RNN) as reshape + max
  differentiated by autodiff (before: a float32 indicator of the input kept, ties split)
  vs its custom VJP keeping the int8 position of each window's first maximum (now,
  ``layers.max_pool_2x2``).
- ``scale_reorder`` (evaluation): a BatchNorm's scale folded into its convolution's kernel
  by an XLA multiply, and not folded where the kernel outweighs the output (before) vs
  applied by oneDNN's kernel reorder (``JsegConvScaleBias``), folded wherever oneDNN
  reorders the kernel anyway (now).
- ``split_head``: PSPNet's head convolution over the upsampled pyramid concatenated with
  the features (before) vs in parts, the bins' part at their pooled sizes
  (``pspnet.PyramidConvBNReLU``, ``layers.conv_of_resized``; now).
- ``blocked_up``: CNN+RNN's upsampling chain as transposed convs each interleaved
  (depth-to-space) with its bias and ReLU as separate ops (before) vs the chain and the
  classifier on pixel blocks, interleaved once at the end, bias and ReLU in oneDNN's call
  (now, ``PixelTransposeConv(depth_to_space=False, relu=True)``, ``layers.unblock_pixels``).
- ``concat_parts``: a convolution over a concatenation (U-Net's decoder levels, UNet++'s
  nodes) as the concatenation then one call (before) vs one oneDNN call per part, each
  adding the previous partial sum as its residual post-op (now, ``conv.parts_function``).
- ``unpool``: SegNet's unpooling as an argmax over the windows and a float one-hot
  product (before) vs the pool's own int8 first-max positions
  (``layers.pool_2x2_positions``) and a select per window position (now).
- ``relu_axis`` (with ``--train``): ``relu_kept``'s forward as a maximum over ``[x, 0]``
  stacked along a new first axis (before) vs along a new axis next to the channels (now).
- ``pad_beyond``: a convolution padded by its kernel's extent or more (FCN's conv1_1, padding
  100) handed to oneDNN as it is (before: oneDNN's GEMM code) vs the input padded
  explicitly first (now, ``conv._pad_beyond_kernel``).
- ``grad_norm`` (with ``--train``): the gradients' global norm (the ``grad_norm`` metric)
  as one reduction over all gradients concatenated (before, ``JSEG_NORM=xla``) vs one
  ``JsegSumSquares`` call reading them where they lie (now).
- ``pool_native`` (with ``--train``): the k x k stride-1 max pool's backward as XLA's
  shifted selects (before, ``JSEG_POOL=xla``) vs one ``JsegPoolSameBwd`` call (now).
- ``conv_relu``: a convolution followed by a ReLU as two ops (before: XLA kept the
  pre-activation for the backward) vs bias and ReLU inside the oneDNN call (now,
  ``conv.conv_relu``; VGG without BatchNorm, FCN, DeepLab v1, CNN+RNN, RefineNet's RCUs).
- ``relu_kept``: RefineNet's ReLUs on its residual streams as ``nn.relu`` (before: XLA kept
  each input beside the output) vs ``layers.relu_kept`` (now: the output, a reduction, is
  all the backward reads).
- ``dw_vjp``: stride-1 ``DepthwiseConv`` on XLA's path (where oneDNN has GEMM fallbacks)
  differentiated by autodiff (before) vs ``layers.depthwise_shifted``'s custom VJP (now).
- ``dk_loop``: that VJP's kernel gradient as k*k stacked slice-times-gradient sums (before:
  XLA:CPU materialised every tap's slice at once) vs one tap per loop iteration (now,
  ``layers._shifted_kernel_grad``).
- ``gemm_grad`` (with ``--train``): kernel gradients oneDNN has only its GEMM fallback for
  (dilated convolutions on AVX2) on that GEMM (before, ``JSEG_CONV_GEMM_GRAD=onednn``) vs
  XLA's convolution (now, ``conv.kernel_grad_on_xla``).
- ``dw_grad``: stride-1 dilated depthwise convolutions (Xception, ASPP, the JPU) on oneDNN
  where it has no GEMM fallback for them, else shifted products with XLA's per-tap kernel
  gradient (before, ``JSEG_DW_GRAD=xla``) vs shifted products wherever oneDNN lacks its
  depthwise kernels for a direction, their kernel gradient one ``jseg.native`` call and
  their forward oneDNN's depthwise kernel where it has one (now,
  ``layers.depthwise_on_onednn``, ``layers.depthwise_kernel_grad_native``).
- ``bn_fold``: at evaluation each BatchNorm after a convolution as its own affine + ReLU
  pass (before) vs folded into the convolution's oneDNN call (now, ``norm.conv_bn_chain``).

``--now_first`` times the current form first in every round (order effects on this
shared machine move medians by up to 10%; run both orders).

Both executables are compiled in one process (the previous form patched in while
tracing), then timed in alternation (``--rounds`` x ``--repeats``), so machine load hits
both alike. Prints each form's median over all rounds and the outputs' max difference.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def autodiff_pool(x):
  """The ResNet stem's 3x3/2 max pool before its custom VJP: maxima of strided slices,
  differentiated by autodiff (keeps the padded input and row maxima; splits ties)."""
  import jax.numpy as jnp
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  oh, ow = (h + 1) // 2, (w + 1) // 2
  rows = jnp.maximum(jnp.maximum(xp[:, 0 : 2 * oh - 1 : 2], xp[:, 1 : 2 * oh : 2]),
                     xp[:, 2 : 2 * oh + 1 : 2])
  return jnp.maximum(jnp.maximum(rows[:, :, 0 : 2 * ow - 1 : 2], rows[:, :, 1 : 2 * ow : 2]),
                     rows[:, :, 2 : 2 * ow + 1 : 2])


def padded_pool_fn():
  """The stem pool of the tenth to twelfth passes: the same custom VJP (int8 positions) on
  a padded copy of the input (``jnp.pad`` with -inf), before ``layers._window3``."""
  import functools

  import jax
  import jax.numpy as jnp
  from jseg.models import layers

  def positions(x):
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    oh, ow = (h + 1) // 2, (w + 1) // 2
    rows, row_at = layers._max3(xp[:, 0 : 2 * oh - 1 : 2], xp[:, 1 : 2 * oh : 2],
                                xp[:, 2 : 2 * oh + 1 : 2])
    out, col_at = layers._max3(rows[:, :, 0 : 2 * ow - 1 : 2], rows[:, :, 1 : 2 * ow : 2],
                               rows[:, :, 2 : 2 * ow + 1 : 2])
    return out, row_at, col_at

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
  def pool(h, w, x):
    return positions(x)[0]

  def fwd(h, w, x):
    out, row_at, col_at = positions(x)
    return out, (row_at, col_at)

  def bwd(h, w, res, g):
    row_at, col_at = res
    g_rows = layers._unpool_axis(g, col_at, 2, w + 2)
    g_xp = layers._unpool_axis(g_rows, row_at, 1, h + 2)
    return (g_xp[:, 1 : h + 1, 1 : w + 1],)

  pool.defvjp(fwd, bwd)
  return lambda x: pool(x.shape[1], x.shape[2], x)


def flax_bn_class():
  """``flax.linen.BatchNorm`` with ``norm.BatchNorm``'s ``relu`` and ``residual`` options."""
  from flax import linen as nn

  class FlaxBatchNorm(nn.BatchNorm):
    relu: bool = False

    def __call__(self, x, use_running_average=None, residual=None):
      y = super().__call__(x, use_running_average=use_running_average)
      y = y if residual is None else y + residual
      return nn.relu(y) if self.relu else y

  return FlaxBatchNorm


def einsum_class():
  """``PixelTransposeConv`` in the form used before 2026-11-30 (a per-pixel einsum)."""
  import jax.numpy as jnp
  from flax import linen as nn

  from jseg.models import layers

  class EinsumPixelTransposeConv(layers.PixelTransposeConv):
    @nn.compact
    def __call__(self, x):
      return einsum_call(self, x)

  return EinsumPixelTransposeConv


def autodiff_class_log_prob(logits, safe):
  """``losses._true_class_log_prob`` before 2026-11-30 (later): unrolled, autodiff backward."""
  import jax
  import jax.numpy as jnp
  k = logits.shape[-1]
  z = jnp.moveaxis(logits, -1, 1)
  planes = [z[:, i] for i in range(k)]
  m = planes[0]
  for p in planes[1:]:
    m = jnp.maximum(m, p)
  m = jax.lax.stop_gradient(m)
  lse = m + jnp.log(sum(jnp.exp(p - m) for p in planes))
  z_y = sum(jnp.where(safe == i, p, 0.0) for i, p in enumerate(planes))
  return z_y - lse, sum(planes) / k - lse


def chained_first_max(taps):
  """``layers._first_max`` before 2026-12-01: maximum and where chains."""
  import jax.numpy as jnp
  m = taps[0]
  for t in taps[1:]:
    m = jnp.maximum(m, t)
  at = jnp.full(m.shape, len(taps) - 1, jnp.int8)
  for i in reversed(range(len(taps) - 1)):
    at = jnp.where(taps[i] == m, jnp.int8(i), at)
  return m, at


def separate_conv_relu(c, x):
  """``conv.conv_relu`` before 2026-12-01: the convolution, then ``nn.relu``."""
  from flax import linen as nn
  from jseg.models import conv as conv_mod
  fn, params = conv_mod.then_conv(c, x.shape[-1])
  return nn.relu(fn(x, *params))


def autodiff_pool_2x2(x):
  """``layers.max_pool_2x2`` before 2026-12-01: reshape + max, autodiff's backward."""
  n, h, w, c = x.shape
  x = x[:, : h - h % 2, : w - w % 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def autodiff_pool_same(x, k):
  """``layers.max_pool_same`` before 2026-12-01: shifted maxima, autodiff's backward."""
  import jax.numpy as jnp
  p = (k - 1) // 2
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0)), constant_values=-jnp.inf)
  y = xp[:, 0:h]
  for i in range(1, k):
    y = jnp.maximum(y, xp[:, i : i + h])
  yp = jnp.pad(y, ((0, 0), (0, 0), (p, p), (0, 0)), constant_values=-jnp.inf)
  out = yp[:, :, 0:w]
  for j in range(1, k):
    out = jnp.maximum(out, yp[:, :, j : j + w])
  return out


def einsum_call(self, x):
  import jax.numpy as jnp
  from flax import linen as nn
  s = self.stride
  n, h, w, c = x.shape
  kernel = self.param("kernel", nn.initializers.lecun_normal(), (s, s, c, self.features), jnp.float32)
  y = jnp.einsum("nhwc,abco->nhawbo", x, kernel.astype(self.dtype)).reshape(n, h * s, w * s, self.features)
  if self.use_bias:
    y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
  return y


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--change", default="upconv", choices=["upconv", "dw_routing", "loss_vjp", "bn_affine", "bn_vjp", "resize_eval", "trim_taps", "split_update", "bn_native", "conv_workspace", "loss_native", "bn_then", "pool_position", "conv_threads", "ppm_pools", "kernel_split", "input_channels", "bn_fold", "pool_pad", "pool_same", "pool_reduce", "pool2_positions", "conv_relu", "relu_kept", "dw_vjp", "dk_loop", "gemm_grad", "dw_grad", "scale_reorder", "grad_norm", "split_head", "blocked_up", "concat_parts", "unpool", "relu_axis", "pad_beyond", "pool_native"])
  p.add_argument("--now_first", action="store_true")
  p.add_argument("--model", default="unet")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--train", action="store_true")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--preset", default="bench", help="jseg.bench's model sizes: bench or paper")
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  import jax
  import numpy as np
  from flax import linen as nn

  import checks
  from jseg import parallel, trainer
  from jseg import losses
  from jseg.models import cnn_rnn, layers, unet, unetplusplus
  closed_form = losses._true_class_log_prob
  from jseg.models import fastfcn, norm, segnet
  from jseg.models.backbones import mobilenet, resnet, vgg, xception
  bn_modules = (fastfcn, layers, segnet, unet, mobilenet, resnet, vgg, xception)
  run, host_batch = checks._setup(a.model, a.batch, a.size, preset=a.preset)
  mods = (cnn_rnn, unet, unetplusplus)
  routed = layers.onednn_depthwise_without_gemm
  custom_vjp_bn = norm._batch_norm_train
  from jseg.models import deeplab, pspnet, refinenet
  resize = layers.resize_logits
  from jseg.models import conv as conv_mod
  trim = conv_mod.trim_dead_taps
  ratio = conv_mod.KERNEL_SPLIT_RATIO
  split_fn = conv_mod.conv_split
  folds = conv_mod.folds_epilogue
  reorder_scaled = conv_mod.onednn_conv

  def xla_scaled(x, k, strides, dilation, padding, groups, epilogue=None):
    """The evaluation fold before: the scale multiplied into the kernel by an XLA pass, and
    not folded where the output is smaller than the kernel."""
    import math
    import jax.numpy as jnp
    if epilogue is None or epilogue.scale is None:
      return reorder_scaled(x, k, strides, dilation, padding, groups, epilogue)
    strides, padding = tuple(strides), tuple(tuple(q) for q in padding)
    if k.shape[:2] == (1, 1) and max(strides) > 1 and padding == ((0, 0), (0, 0)):
      x, strides = x[:, ::strides[0], ::strides[1]], (1, 1)
    y_hw = conv_mod._out_hw(x.shape, k.shape, strides, dilation, padding)
    if x.shape[0] * y_hw[0] * y_hw[1] * k.shape[3] < math.prod(k.shape):
      return epilogue.apply(conv_mod._onednn_conv(x, k, strides, tuple(dilation), padding, int(groups)))
    f32 = lambda v: None if v is None else jnp.asarray(v, jnp.float32)
    return conv_mod._onednn_conv_epilogue(x, k * f32(epilogue.scale), None, f32(epilogue.shift),
                                          f32(epilogue.residual), strides, tuple(dilation),
                                          padding, int(groups), bool(epilogue.relu))
  padded = padded_pool_fn()
  autodiff_bn = lambda x, s, b, eps, dt: norm._batch_norm_train_fwd(x, s, b, eps, dt)[0]
  from jseg import native as native_mod
  workspace = native_mod.onednn_workspace
  recomputed_then = norm._batch_norm_then_native
  pool = layers.max_pool_3x3_s2
  pool_same = layers.max_pool_same
  first_max = layers._first_max
  pool2 = layers.max_pool_2x2
  fused_conv_relu = conv_mod.conv_relu
  relu_kept = layers.relu_kept
  dw_shifted = layers.depthwise_shifted

  def autodiff_dw_shifted(x, kernel, k, d):
    return layers._shifted_products(layers._same_pad(x, d * (k - 1) // 2), kernel, k, d,
                                    x.shape[1], x.shape[2])
  loop_kernel_grad = layers._shifted_kernel_grad
  dw_fwd_kernel = layers.onednn_depthwise_forward_kernel

  def stacked_kernel_grad(xp, g, k, d):
    import jax.numpy as jnp
    h, w = g.shape[1], g.shape[2]
    return jnp.stack([
        jnp.stack([jnp.sum(xp[:, i * d:i * d + h, j * d:j * d + w] * g, axis=(0, 1, 2))
                   for j in range(k)]) for i in range(k)])
  pools = layers.adaptive_avg_pools

  def kept_then(x, scale, bias, ra_mean, ra_var, args, eps, relu, momentum, fn):
    y, new_mean, new_var = norm._batch_norm_train_native(x, scale, bias, None, ra_mean, ra_var,
                                                         eps, relu, momentum)
    return fn(y, *args), new_mean, new_var

  split_head = pspnet.PyramidHead

  class ConcatHead(pspnet.FCNHead):
    """PSPNet's head on the upsampled concatenation (before): same parameters."""

    @nn.compact
    def __call__(self, x, bins, train):
      import jax.numpy as jnp
      y = jnp.concatenate([x] + [layers.resize_bilinear(b, x.shape[1:3]) for b in bins], -1)
      return pspnet.FCNHead.__call__(self, y, train)

  blocked_up = (cnn_rnn.PixelTransposeConv, cnn_rnn.unblock_pixels)
  where_unpool = segnet.max_unpool_2x2
  pad_beyond = conv_mod._pad_beyond_kernel
  relu_reduce_now = layers._relu_reduce

  def stacked_first_relu(x):
    """relu_kept's forward before: the maximum over [x, 0] stacked along a new first axis."""
    import jax.numpy as jnp
    from jax import lax
    return lax.reduce(jnp.stack([x, jnp.zeros_like(x)]), jnp.array(-jnp.inf, x.dtype), lax.max, (0,))

  def onehot_unpool(y, ref):
    """SegNet's unpooling before: an argmax over the windows and a float one-hot product."""
    import jax.numpy as jnp
    n, hh, ww, c = ref.shape
    h, w = hh // 2, ww // 2
    win = ref[:, : 2 * h, : 2 * w].reshape(n, h, 2, w, 2, c).transpose(0, 1, 3, 5, 2, 4)
    idx = jnp.argmax(win.reshape(n, h, w, c, 4), axis=-1)
    mask = jax.nn.one_hot(jax.lax.stop_gradient(idx), 4, dtype=y.dtype)
    out = (y[..., None] * mask).reshape(n, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    out = out.reshape(n, 2 * h, 2 * w, c)
    if (2 * h, 2 * w) != (hh, ww):
      out = jnp.pad(out, ((0, 0), (0, hh - 2 * h), (0, ww - 2 * w), (0, 0)))
    return out

  class InterleavedUp(nn.Module):
    """PixelTransposeConv before ``relu=``/``depth_to_space=``: same parameters."""
    features: int
    stride: int = 2
    use_bias: bool = True
    dtype: object = None
    relu: bool = False
    depth_to_space: bool = True

    @nn.compact
    def __call__(self, x):
      import jax.numpy as jnp
      s, (n, h, w, c) = self.stride, x.shape
      kernel = self.param("kernel", nn.initializers.lecun_normal(), (s, s, c, self.features), jnp.float32)
      k = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(1, 1, c, s * s * self.features)
      y = conv_mod.conv_general_dilated(x, k, (1, 1), ((0, 0), (0, 0)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = y.reshape(n, h, w, s, s, self.features).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * s, w * s, self.features)
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      return nn.relu(y) if self.relu else y

  def patch(before: bool) -> None:
    if a.change == "upconv":
      for m in mods:  # the networks look the layer up in their own module at call time
        m.PixelTransposeConv = einsum_class() if before else layers.PixelTransposeConv
    elif a.change == "dw_routing":
      layers.onednn_depthwise_without_gemm = (lambda *args: True) if before else routed
    elif a.change == "trim_taps":
      conv_mod.trim_dead_taps = (lambda x_shape, k, strides, dilation, pads: (k, pads)) if before else trim
    elif a.change == "resize_eval":
      for m in (deeplab, fastfcn, pspnet, refinenet):
        m.resize_logits = (lambda x, size, train=True: resize(x, size, True)) if before else resize
    elif a.change == "bn_vjp":
      norm._batch_norm_train = autodiff_bn if before else custom_vjp_bn
    elif a.change == "loss_vjp":
      losses._true_class_log_prob = autodiff_class_log_prob if before else closed_form
    elif a.change == "split_update":
      pass  # the step itself differs (below)
    elif a.change == "bn_native":
      os.environ["JSEG_BN"] = "xla" if before else "native"
    elif a.change == "bn_then":
      norm._batch_norm_then_native = kept_then if before else recomputed_then
    elif a.change == "loss_native":
      os.environ["JSEG_LOSS"] = "xla" if before else "native"
    elif a.change == "conv_workspace":
      from jseg import native
      native.onednn_workspace = (lambda *args: 1) if before else workspace
    elif a.change == "input_channels":
      conv_mod.conv_split = (lambda *args: (lambda r: (0, 1) if r[0] == 4 else r)(split_fn(*args))) if before else split_fn
    elif a.change == "kernel_split":
      conv_mod.KERNEL_SPLIT_RATIO = float("inf") if before else ratio
    elif a.change == "ppm_pools":
      pspnet.adaptive_avg_pools = (lambda x, bins: [layers.adaptive_avg_pool(x, b) for b in bins]) if before else pools
    elif a.change == "conv_threads":
      os.environ["JSEG_CONV_THREADS"] = "openmp" if before else "xla"
    elif a.change == "gemm_grad":
      os.environ["JSEG_CONV_GEMM_GRAD"] = "onednn" if before else "xla"
    elif a.change == "dw_grad":
      os.environ["JSEG_DW_GRAD"] = "xla" if before else "auto"
      layers.onednn_depthwise_forward_kernel = (lambda *args: False) if before else dw_fwd_kernel
    elif a.change == "grad_norm":
      os.environ["JSEG_NORM"] = "xla" if before else "auto"
    elif a.change == "pool_native":
      os.environ["JSEG_POOL"] = "xla" if before else "auto"
    elif a.change == "blocked_up":
      cnn_rnn.PixelTransposeConv, cnn_rnn.unblock_pixels = (
          (InterleavedUp, lambda y, width, strides: y) if before else blocked_up)
    elif a.change == "pad_beyond":
      conv_mod._pad_beyond_kernel = (lambda x, k_shape, dilation, padding: (x, padding)) if before else pad_beyond
    elif a.change == "relu_axis":
      layers._relu_reduce = stacked_first_relu if before else relu_reduce_now
    elif a.change == "unpool":
      segnet.max_unpool_2x2 = onehot_unpool if before else where_unpool
    elif a.change == "concat_parts":
      conv_mod._apply_parts.__kwdefaults__["split"] = not before
    elif a.change == "split_head":
      pspnet.PyramidHead = ConcatHead if before else split_head
    elif a.change == "scale_reorder":
      conv_mod.onednn_conv = xla_scaled if before else reorder_scaled
    elif a.change == "bn_fold":
      conv_mod.folds_epilogue = (lambda fn: False) if before else folds
    elif a.change == "pool_pad":
      for m in (resnet, deeplab):  # they import the pool by name
        m.max_pool_3x3_s2 = padded if before else pool
    elif a.change == "dw_vjp":
      layers.depthwise_shifted = autodiff_dw_shifted if before else dw_shifted
    elif a.change == "dk_loop":
      layers._shifted_kernel_grad = stacked_kernel_grad if before else loop_kernel_grad
    elif a.change == "relu_kept":
      refinenet.relu_kept = nn.relu if before else relu_kept
    elif a.change == "conv_relu":
      for m in (cnn_rnn, deeplab, refinenet, unet, vgg):  # they import conv_relu by name
        m.conv_relu = separate_conv_relu if before else fused_conv_relu
    elif a.change == "pool2_positions":
      for m in (unet, unetplusplus, vgg, cnn_rnn):  # they import the pool by name
        m.max_pool_2x2 = autodiff_pool_2x2 if before else pool2
    elif a.change == "pool_reduce":
      layers._first_max = chained_first_max if before else first_max
    elif a.change == "pool_same":
      for m in (refinenet, deeplab):  # they import the pool by name
        m.max_pool_same = autodiff_pool_same if before else pool_same
    elif a.change == "pool_position":
      for m in (resnet, deeplab):  # they import the pool by name
        m.max_pool_3x3_s2 = autodiff_pool if before else pool
    else:  # every module that builds BatchNorm layers looks the name up at call time
      for m in bn_modules:
        m.BatchNorm = flax_bn_class() if before else norm.BatchNorm

  batch = host_batch()  # one batch for both (host_batch draws a new one per call)
  fns = {}
  for name in ("before", "now"):
    patch(name == "before")
    if a.train:
      from jseg import losses
      from jseg.bench.models import bench_config
      import functools
      loss_fn = losses.build_loss(bench_config(a.model, a.size, a.batch))
      step = jax.jit(functools.partial(trainer.train_step, loss_fn=loss_fn))
      if a.change == "split_update" and name == "now":
        step = trainer.SplitStep(  # the state not donated: the timing re-runs its arguments
            jax.jit(functools.partial(trainer.grad_step_into, loss_fn=loss_fn),
                    donate_argnums=(3,), keep_unused=True),
            jax.jit(trainer.update_step),
            jax.jit(lambda p: jax.tree.map(jax.numpy.zeros_like, p)))
      b = parallel.shard_batch(batch, run.mesh)
      args = (run.state, b, run.step_rng)
      fns[name] = (step.lower(*args).compile(), args)
    else:
      model = run.model
      v = trainer.variables(run.state.params, run.state.batch_stats)
      x = jax.device_put(batch["image"])
      f = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
      fns[name] = (f.lower(v, x).compile(), (v, x))
  patch(False)
  if a.now_first:
    fns = {"now": fns["now"], "before": fns["before"]}
  outs = {k: f(*args) for k, (f, args) in fns.items()}
  leaf = lambda o: o[1]["loss"] if a.train else o
  ref = np.asarray(leaf(outs["before"]))
  if a.train:  # and every other output leaf (parameters, statistics, metrics)
    la = jax.tree_util.tree_leaves_with_path(outs["before"])
    lb = jax.tree.leaves(outs["now"])
    worst = max((float(np.abs(np.asarray(u) - np.asarray(v)).max()) / max(float(np.abs(np.asarray(u)).max()), 1e-30),
                 jax.tree_util.keystr(k)) for (k, u), v in zip(la, lb) if np.issubdtype(np.asarray(u).dtype, np.floating))
    print(f"largest relative difference over all {len(la)} output leaves: {worst[0]:.1e} ({worst[1]})")
  diff = float(np.abs(ref - np.asarray(leaf(outs["now"]))).max()) / max(float(np.abs(ref).max()), 1e-30)
  times = {k: [] for k in fns}
  for _ in range(a.rounds):
    for k, (f, args) in fns.items():
      for _ in range(a.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times[k].append(time.perf_counter() - t0)
  what = "train step" if a.train else "inference"
  parts = lambda f: (f.grads_fn, f.update_fn) if isinstance(f, trainer.SplitStep) else (f,)
  temp = {k: sum(p.memory_analysis().temp_size_in_bytes for p in parts(f)) / 2**20 for k, (f, _) in fns.items()}
  kernels = {k: sum(p.as_text().split("ENTRY")[1].count(" fusion(") for p in parts(f)) for k, (f, _) in fns.items()}
  print("XLA temporaries (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in temp.items())
        + "; fusions: " + ", ".join(f"{k} {v}" for k, v in kernels.items()))
  print(f"{a.change}: {a.model} {what} b{a.batch} {a.size}^2: max diff {diff:.1e} (relative to the largest output); " + ", ".join(
      f"{k} median {1e3 * statistics.median(t):.1f} ms (min {1e3 * min(t):.1f})" for k, t in times.items()))


if __name__ == "__main__":
  main()
