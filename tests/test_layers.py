"""Each fast form in jseg/models/layers.py against the stock op or a NumPy reference.

Values and gradients are compared on random inputs (no ties, so max-pool
gradients are unique), with odd sizes where the op allows them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from jseg import native
from jseg.models import layers


def _rand(shape, seed=0):
  # NumPy data: no XLA compilation per shape (eager jax.random would compile each).
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _vjp(f, x, seed=1):
  """Value and input gradient of sum(f(x) * r) for a fixed random cotangent r (jitted)."""

  def run(t):
    y, pull = jax.vjp(f, t)
    return y, pull(jnp.asarray(_rand(y.shape, seed)))[0]

  return jax.jit(run)(x)


def _value_and_grads(f, args, seed=4):
  """f(*args) and the gradients of sum(f(*args) * r) w.r.t. all args, in one jitted call."""

  shape = jax.eval_shape(f, *args).shape
  r = jnp.asarray(_rand(shape, seed))

  def run(*a):
    y, pull = jax.vjp(f, *a)
    return y, pull(r)

  return jax.jit(run)(*args)


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 9, 2)])
def test_max_pool_2x2_matches_nn_max_pool(shape):
  x = _rand(shape)
  y, g = _vjp(layers.max_pool_2x2, x)
  y_ref, g_ref = _vjp(lambda t: nn.max_pool(t, (2, 2), (2, 2)), x)
  assert y.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(g, g_ref, atol=1e-6)


@pytest.mark.parametrize("ceil", [False, True])
def test_max_pool_2x2_gradient_goes_to_torchs_position_and_keeps_int8(ceil):
  """Ties (ReLU zeros, repeated values): each window's gradient goes to its first maximum
  in row-major order, as torch's max_pool2d; the backward keeps one int8 per window."""
  torch = pytest.importorskip("torch")
  from jseg.models.backbones.vgg import max_pool_2x2_ceil
  pool = max_pool_2x2_ceil if ceil else layers.max_pool_2x2
  x = np.maximum(np.round(_rand((2, 9, 7, 3)) * 2) / 2, 0).astype(np.float32)
  y = pool(x)
  r = _rand(y.shape, 1)
  g = jax.jit(jax.grad(lambda t: jnp.sum(pool(t) * r)))(x)
  tx = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
  ty = torch.nn.functional.max_pool2d(tx, 2, 2, ceil_mode=ceil)
  (ty * torch.tensor(r).permute(0, 3, 1, 2)).sum().backward()
  np.testing.assert_array_equal(y, ty.detach().permute(0, 2, 3, 1).numpy())
  np.testing.assert_array_equal(g, tx.grad.permute(0, 2, 3, 1).numpy())
  assert (x == 0).mean() > 0.3  # the case has ties
  _, vjp = jax.vjp(layers.max_pool_2x2, _rand((2, 64, 64, 8)))
  kept = [(str(leaf.dtype), leaf.shape) for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "dtype")]
  assert kept == [("int8", (2, 32, 32, 8))]


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 9, 2)])
def test_max_pool_3x3_s2_matches_nn_max_pool_with_neg_inf_padding(shape):
  x = _rand(shape)
  y, g = _vjp(layers.max_pool_3x3_s2, x)
  # nn.max_pool pads with -inf, like torch.nn.MaxPool2d(3, 2, 1).
  ref = lambda t: nn.max_pool(t, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
  y_ref, g_ref = _vjp(ref, x)
  assert y.shape == (shape[0], -(-shape[1] // 2), -(-shape[2] // 2), shape[3])
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(g, g_ref, atol=1e-6)


def test_max_pool_3x3_s2_gradient_goes_to_one_maximum_and_keeps_little():
  # Ties (here every window is all zeros, as after a ReLU): PyTorch gives the whole
  # gradient to one position per window; autodiff of the maxima would split it.
  x = np.zeros((1, 6, 6, 1), np.float32)
  g = np.asarray(jax.grad(lambda t: layers.max_pool_3x3_s2(t).sum())(x))
  assert set(np.unique(g)) <= {0.0, 1.0, 2.0, 3.0, 4.0}  # a sum of whole unit gradients
  np.testing.assert_allclose(g.sum(), 9.0)
  # The backward keeps int8 positions (row per row maximum, column per maximum), not the
  # padded input and the row maxima.
  x = _rand((2, 64, 64, 8))
  _, vjp = jax.vjp(layers.max_pool_3x3_s2, x)
  kept = sorted((str(leaf.dtype), leaf.shape) for leaf in jax.tree.leaves(vjp)
                if hasattr(leaf, "dtype"))
  assert kept == [("int8", (2, 32, 32, 8)), ("int8", (2, 32, 64, 8))]
  # ... and no padded copy of the input is written (XLA:CPU ran it as its own kernel).
  text = jax.jit(jax.grad(lambda t: layers.max_pool_3x3_s2(t).sum())).lower(x).as_text()
  assert "66x66" not in text, "a padded copy of the input"


def test_max_pools_positions_are_written_in_the_forward():
  """Within one compiled program (a step), the int8 positions are what survives to the
  backward: a chain of pools needs far fewer temporaries than the same maxima written as
  maximum/where chains, whose positions XLA recomputed in the backward from f32 taps it
  kept alive."""
  x = _rand((1, 64, 64, 16))
  r = _rand((1, 64, 64, 16), 1)

  def chained(taps):
    m = taps[0]
    for t in taps[1:]:
      m = jnp.maximum(m, t)
    at = jnp.full(m.shape, len(taps) - 1, jnp.int8)
    for i in reversed(range(len(taps) - 1)):
      at = jnp.where(taps[i] == m, jnp.int8(i), at)
    return m, at

  def temps(pool):
    def f(t):
      for _ in range(4):
        t = jnp.tanh(pool(t))
      return jnp.sum(t * r[:, : t.shape[1], : t.shape[2]])
    return jax.jit(jax.grad(f)).lower(x).compile().memory_analysis().temp_size_in_bytes

  pools = (lambda t: layers.max_pool_same(t, 5), layers.max_pool_3x3_s2)
  ours = [temps(p) for p in pools]
  first_max = layers._first_max
  try:
    layers._first_max = chained
    before = [temps(p) for p in pools]
  finally:
    layers._first_max = first_max
  assert ours[0] < 0.75 * before[0], (ours, before)
  assert ours[1] <= before[1], (ours, before)


def test_max_pool_3x3_s2_all_negative_input_ignores_padding():
  x = -1.0 - np.abs(_rand((1, 5, 5, 1)))
  assert float(jax.jit(layers.max_pool_3x3_s2)(x).max()) < 0  # padding never wins


def _np_adaptive_avg_pool(x, bins):
  n, h, w, c = x.shape
  out = np.zeros((n, bins, bins, c), x.dtype)
  for i in range(bins):
    h0, h1 = (i * h) // bins, -((-(i + 1) * h) // bins)
    for j in range(bins):
      w0, w1 = (j * w) // bins, -((-(j + 1) * w) // bins)
      out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize("hw,bins", [((12, 12), 6), ((7, 11), 3), ((5, 9), 2), ((13, 4), 1),
                                     ((4, 5), 6)])
def test_adaptive_avg_pool_matches_numpy(hw, bins):
  x = _rand((2, *hw, 3))
  np.testing.assert_allclose(jax.jit(layers.adaptive_avg_pool, static_argnums=1)(x, bins),
                             _np_adaptive_avg_pool(x, bins), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hw", [(12, 12), (7, 11), (4, 5)])
def test_adaptive_avg_pools_equal_one_pool_per_bin_with_their_gradient(hw):
  """The stacked pooling PSPNet uses gives each bin's pool and the same input gradient."""
  bins = (1, 2, 3, 6)
  x = _rand((2, *hw, 3))
  pools = jax.jit(layers.adaptive_avg_pools, static_argnums=1)(x, bins)
  assert [p.shape for p in pools] == [(2, b, b, 3) for b in bins]
  for p, b in zip(pools, bins):
    np.testing.assert_allclose(p, _np_adaptive_avg_pool(x, b), rtol=1e-5, atol=1e-6)
  w = [_rand((2, b, b, 3), seed=b) for b in bins]
  loss = lambda ps: sum(jnp.sum(p * wi) for p, wi in zip(ps, w))  # noqa: E731
  g = jax.grad(lambda x: loss(layers.adaptive_avg_pools(x, bins)))(x)
  g_ref = jax.grad(lambda x: loss([layers.adaptive_avg_pool(x, b) for b in bins]))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def _np_resize_bilinear(x, size):
  """Half-pixel bilinear (torch align_corners=False): src = (dst + 0.5) * in/out - 0.5."""

  def axis_weights(n_in, n_out):
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] += 1 - frac
    m[np.arange(n_out), i1] += frac
    return m

  mh = axis_weights(x.shape[1], size[0])
  mw = axis_weights(x.shape[2], size[1])
  return np.einsum("ih,nhwc,jw->nijc", mh, x.astype(np.float64), mw)


@pytest.mark.parametrize("src,dst", [((4, 5), (32, 40)), ((7, 9), (13, 20)), ((16, 12), (5, 7)),
                                     ((6, 6), (6, 6))])
def test_resize_bilinear_matches_half_pixel_numpy(src, dst):
  x = _rand((2, *src, 3))
  np.testing.assert_allclose(jax.jit(layers.resize_bilinear, static_argnums=1)(x, dst),
                             _np_resize_bilinear(x, dst), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("srcs,dst,k", [([(1, 1), (2, 2), (3, 3), (6, 6)], (13, 10), 3),
                                        ([(4, 5)], (16, 20), 5), ([(7, 3)], (5, 9), 3),
                                        ([(2, 3), (6, 6)], (6, 6), 1)])
def test_conv_of_resized_equals_conv_of_resized_maps(srcs, dst, k):
  """Sum over inputs of a 'same' convolution of the bilinearly resized map (up, down and
  same size; kernels 1, 3, 5), values and the gradients of inputs and kernels."""
  xs = [_rand((2, *s, 3), seed=i) for i, s in enumerate(srcs)]
  ks = [_rand((k, k, 3, 4), seed=10 + i) * 0.3 for i in range(len(srcs))]

  def stock(xs, ks):
    return sum(lax.conv_general_dilated(layers.resize_bilinear(x, dst), kk, (1, 1),
                                        [(k // 2, k // 2)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=lax.Precision.HIGHEST)
               for x, kk in zip(xs, ks))

  def parts(xs, ks):
    return layers.conv_of_resized(xs, ks, dst)

  (y0, g0), (y1, g1) = [_value_and_grads(f, (xs, ks)) for f in (stock, parts)]
  assert y1.shape == (2, *dst, 4)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_of_resized_over_one_kernel_at_an_offset():
  """``offset``: the inputs' channels are a window of one kernel's input channels (the rest
  unused), the same sum as with each input's slice of that kernel."""
  xs = [_rand((2, s, s, 3), seed=i) for i, s in enumerate((1, 2, 6))]
  kernel = _rand((3, 3, 5 + 9 + 2, 4), seed=7)
  slices = [kernel[:, :, 5 + 3 * i:8 + 3 * i] for i in range(3)]
  got = jax.jit(lambda xs, k: layers.conv_of_resized(xs, k, (11, 9), offset=5))(xs, kernel)
  want = jax.jit(lambda xs, ks: layers.conv_of_resized(xs, ks, (11, 9)))(xs, slices)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="do not match"):
    layers.conv_of_resized(xs, kernel, (11, 9), offset=8)  # 8 + 9 channels > 16


def test_conv_of_resized_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match="kernel"):
    layers.conv_of_resized([jnp.zeros((1, 2, 2, 3))], [jnp.zeros((3, 3, 4, 5))], (4, 4))
  with pytest.raises(ValueError, match="kernel"):
    layers.conv_of_resized([jnp.zeros((1, 2, 2, 3))], [jnp.zeros((2, 2, 3, 5))], (4, 4))
  with pytest.raises(ValueError, match="1 inputs for 2 kernels"):
    layers.conv_of_resized([jnp.zeros((1, 2, 2, 3))], [jnp.zeros((3, 3, 3, 5))] * 2, (4, 4))


@pytest.mark.parametrize("src,dst", [((32, 32), (256, 256)), ((1, 1), (9, 7)), ((5, 8), (5, 24)),
                                     ((9, 4), (3, 4)), ((6, 10), (17, 3))])
def test_resize_logits_matches_jax_image_resize_values_and_gradients(src, dst):
  x = _rand((2, *src, 4))

  def stock(v):
    return jax.image.resize(v, (2, *dst, 4), "bilinear", antialias=False)

  ours = functools.partial(layers.resize_logits, size=dst)
  np.testing.assert_allclose(jax.jit(ours)(x), stock(x), rtol=1e-5, atol=1e-5)
  ct = _rand((2, *dst, 4))
  g_ours = jax.vjp(ours, x)[1](ct)[0]
  g_stock = jax.vjp(stock, x)[1](ct)[0]
  np.testing.assert_allclose(g_ours, g_stock, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("src,dst", [((32, 32), (256, 256)), ((64, 64), (256, 256)), ((5, 7), (15, 21)),
                                     ((3, 8), (12, 4)), ((1, 4), (5, 8)), ((2, 2), (2, 6)),
                                     ((5, 8), (7, 24))])
def test_resize_logits_inference_form_matches_jax_image_resize(src, dst):
  """train=False: the two-tap row upsampling (integer height factors) or the matmul form
  (the last case, 5 -> 7 rows); values equal jax.image.resize's."""
  x = _rand((2, *src, 11))
  got = jax.jit(functools.partial(layers.resize_logits, size=dst, train=False))(x)
  want = jax.image.resize(x, (2, *dst, 11), "bilinear", antialias=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(got, layers.resize_logits(x, dst), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("s", [2, 3, 4, 8])
def test_upsample_rows_matches_numpy_half_pixel(s):
  x = _rand((1, 6, 3, 2))
  np.testing.assert_allclose(layers.upsample_rows(x, s), _np_resize_bilinear(x, (6 * s, 3)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_resize_logits_keeps_bfloat16(train):
  x = _rand((1, 4, 4, 2)).astype(jnp.bfloat16)
  y = layers.resize_logits(x, (8, 8), train)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), layers.resize_logits(x.astype(jnp.float32), (8, 8)),
                             atol=0.05)


def test_pad_same():
  assert layers.pad_same(3) == ((1, 1), (1, 1))
  assert layers.pad_same(3, 12) == ((12, 12), (12, 12))
  assert layers.pad_same(1) == ((0, 0), (0, 0))
  assert layers.pad_same(7) == ((3, 3), (3, 3))


def _np_transpose_conv(x, kernel, bias):
  """y[s*i+a, s*j+b, o] = sum_c x[i, j, c] kernel[a, b, c, o] + bias[o], with loops."""
  n, h, w, _ = x.shape
  s = kernel.shape[0]
  y = np.zeros((n, h * s, w * s, kernel.shape[-1]))
  for i in range(h):
    for j in range(w):
      for a in range(s):
        for b in range(s):
          y[:, s * i + a, s * j + b] = x[:, i, j] @ kernel[a, b]
  return y + bias


@pytest.mark.parametrize("stride", [2, 3])
def test_pixel_transpose_conv_matches_numpy_and_nn_conv_transpose(stride):
  x = _rand((2, 3, 5, 4))
  m = layers.PixelTransposeConv(6, stride)
  assert jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.key(0), x)["params"]) == {
      "kernel": (stride, stride, 4, 6), "bias": (6,)}
  k, b = _rand((stride, stride, 4, 6), 1), _rand((6,), 2)
  f = lambda t, kk: m.apply({"params": {"kernel": kk, "bias": b}}, t)  # noqa: E731
  # nn.ConvTranspose (transpose_kernel=False) applies the spatially flipped kernel.
  ct = nn.ConvTranspose(6, (stride, stride), strides=(stride, stride), padding="VALID")
  f_ref = lambda t, kk: ct.apply({"params": {"kernel": kk[::-1, ::-1], "bias": b}}, t)  # noqa: E731
  y, g = _value_and_grads(f, (x, k))
  y_ref, g_ref = _value_and_grads(f_ref, (x, k))
  np.testing.assert_allclose(y, _np_transpose_conv(np.asarray(x), np.asarray(k), np.asarray(b)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, e in zip(g, g_ref):  # input and kernel gradients
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


def test_pixel_transpose_conv_blocked_chain_and_relu_match_depth_to_space():
  """Two layers with ReLU and a 1x1 conv, blocked (``depth_to_space=False``) then
  ``unblock_pixels``, against the interleaved layers: values and every gradient."""
  x = _rand((2, 3, 5, 4))
  strides = (2, 3)
  convs = [layers.PixelTransposeConv(6, s, relu=True, name=f"u{i}") for i, s in enumerate(strides)]
  blocked = [layers.PixelTransposeConv(6, s, relu=True, depth_to_space=False) for s in strides]
  plain = [layers.PixelTransposeConv(6, s) for s in strides]
  ks = [_rand((s, s, c, 6), 10 + i) for i, (s, c) in enumerate(zip(strides, (4, 6)))]
  bs = [_rand((6,), 20 + i) for i in range(2)]
  w1 = _rand((6, 3), 30)

  def run(mods, relu_after, x, ks, bs, w1, unblock):
    y = x
    for m, k, b in zip(mods, ks, bs):
      y = m.apply({"params": {"kernel": k, "bias": b}}, y)
      y = jax.nn.relu(y) if relu_after else y
    y = y @ w1
    return layers.unblock_pixels(y, x.shape[2], strides) if unblock else y

  f_blocked = lambda *a: run(blocked, False, *a, unblock=True)  # noqa: E731
  f_relu = lambda *a: run(convs, False, *a, unblock=False)  # noqa: E731
  f_ref = lambda *a: run(plain, True, *a, unblock=False)  # noqa: E731
  args = (x, ks, bs, w1)
  y_ref, g_ref = _value_and_grads(f_ref, args)
  assert y_ref.shape == (2, 18, 30, 3)
  for f in (f_blocked, f_relu):
    y, g = _value_and_grads(f, args)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="unblock_pixels"):
    layers.unblock_pixels(jnp.zeros((1, 3, 5 * 36 + 1, 2)), 5, strides)


@pytest.mark.parametrize("kernel,stride,dilation,hw", [
    (3, 1, 1, (9, 8)), (3, 2, 1, (9, 8)), (3, 1, 2, (9, 7)), (3, 2, 2, (10, 7)),
    (5, 2, 3, (13, 12)),
])
@pytest.mark.parametrize("conv_mode", ["auto", "xla"])  # oneDNN grouped conv / shifted products
def test_depthwise_conv_matches_grouped_nn_conv(kernel, stride, dilation, hw, conv_mode,
                                                monkeypatch):
  monkeypatch.setenv("JSEG_CONV", conv_mode)
  c = 5
  x = _rand((2, *hw, c))
  m = layers.DepthwiseConv(kernel, stride, dilation, use_bias=True)
  ref = nn.Conv(c, (kernel, kernel), strides=stride, kernel_dilation=dilation,
                padding=layers.pad_same(kernel, dilation), feature_group_count=c)
  shapes = jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.key(0), x))
  assert shapes == jax.tree.map(jnp.shape, jax.eval_shape(ref.init, jax.random.key(0), x))
  v = {"params": {"kernel": _rand((kernel, kernel, 1, c), 1), "bias": _rand((c,), 2)}}
  f = lambda t, p: m.apply({"params": p}, t)  # noqa: E731
  f_ref = lambda t, p: ref.apply({"params": p}, t)  # noqa: E731
  y, g = _value_and_grads(f, (x, v["params"]))
  y_ref, g_ref = _value_and_grads(f_ref, (x, v["params"]))
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, e in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


def test_conv_bn_relu_matches_stock_ops():
  x = _rand((2, 9, 7, 3))
  m = layers.ConvBNReLU(4, kernel=3, stride=2, dilation=1)
  p = {"conv": {"kernel": _rand((3, 3, 3, 4), 1)},
       "bn": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)}}
  v = {"params": p, "batch_stats": {"bn": {"mean": np.zeros(4, np.float32),
                                           "var": np.ones(4, np.float32)}}}
  assert jax.tree.map(jnp.shape, jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))) == \
      jax.tree.map(jnp.shape, v)
  conv = nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)
  z = jax.jit(conv.apply)({"params": p["conv"]}, x)
  # Training: batch statistics (biased variance), running stats updated with momentum 0.9.
  y, upd = jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  mean, var = z.mean((0, 1, 2)), z.var((0, 1, 2))
  np.testing.assert_allclose(y, jax.nn.relu((z - mean) / jnp.sqrt(var + 1e-5)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["bn"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
  # Evaluation: running statistics.
  stats = {"bn": {"mean": mean, "var": var}}
  y_eval = jax.jit(lambda v, x: m.apply(v, x, train=False))({"params": p, "batch_stats": stats}, x)
  np.testing.assert_allclose(y_eval, jax.nn.relu((z - mean) / jnp.sqrt(var + 1e-5)),
                             rtol=1e-4, atol=1e-5)
  assert y_eval.shape == (2, 5, 4, 4)
  dilated = layers.ConvBNReLU(4, kernel=3, dilation=3)
  out = jax.eval_shape(lambda: dilated.init_with_output(jax.random.key(0), x, train=False)[0])
  assert out.shape == (2, 9, 7, 4)


def test_input_checks_name_the_bad_shape():
  with pytest.raises(ValueError, match=r"at least 32x32 pixels; got 16x40"):
    layers.check_min_size(jnp.zeros((1, 16, 40, 3)), 32, "mynet")
  layers.check_min_size(jnp.zeros((1, 32, 32, 3)), 32, "mynet")
  with pytest.raises(ValueError, match=r"NHWC.*\(16, 16, 3\)"):
    layers.check_nhwc(jnp.zeros((16, 16, 3)), "mynet")


@pytest.mark.parametrize("which", ["conv", "depthwise"])
def test_rate_2_3x3_receptive_field_is_5x5(which):
  """Gradient of one output pixel w.r.t. the input: nonzero exactly on the 9 taps of a 5x5 footprint."""
  size, c = 11, 2
  x = _rand((1, size, size, c))
  if which == "conv":
    m = nn.Conv(c, (3, 3), kernel_dilation=2, padding=layers.pad_same(3, 2))
  else:
    m = layers.DepthwiseConv(3, dilation=2)
  shapes = jax.eval_shape(m.init, jax.random.key(1), x)
  v = jax.tree.map(lambda p: np.abs(_rand(p.shape, 5)) + 0.1, shapes)  # no zero weights
  g = jax.jit(jax.grad(lambda t: m.apply(v, t)[0, 5, 5].sum()))(x)
  support = np.asarray(jnp.abs(g).sum(-1)[0] > 0)
  rows, cols = np.nonzero(support)
  assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (5, 5)
  expected = np.zeros((size, size), bool)
  expected[3:8:2, 3:8:2] = True
  np.testing.assert_array_equal(support, expected)


def test_relu_kept_equals_relu():
  """Values and gradient (0 at an exact 0) as nn.relu (what it keeps: test_models_refinenet)."""
  x = jnp.asarray(_rand((2, 16, 16, 8))).at[:, :2].set(0.0)
  r = jnp.asarray(_rand((2, 16, 16, 8), 1))
  for f in (layers.relu_kept, nn.relu):
    np.testing.assert_array_equal(f(x), nn.relu(x))
  g = jax.grad(lambda t: jnp.sum(layers.relu_kept(t) * r))(x)
  np.testing.assert_array_equal(g, jax.grad(lambda t: jnp.sum(nn.relu(t) * r))(x))


@pytest.mark.parametrize("dw_grad", ["auto", "xla"])  # jseg.native's kernel gradient / XLA's
@pytest.mark.parametrize("k,d,hw", [(3, 1, 9), (3, 2, 12), (3, 4, 7), (5, 3, 10)])
def test_depthwise_shifted_equals_the_grouped_convolution_with_its_gradients(k, d, hw, dw_grad,
                                                                            monkeypatch):
  """``layers.depthwise_shifted`` (its own backward) against XLA's grouped convolution:
  values, input and kernel gradients, including dilations wider than the map."""
  monkeypatch.setenv("JSEG_DW_GRAD", dw_grad)
  x = jnp.asarray(_rand((2, hw, hw + 1, 6)))
  kern = jnp.asarray(_rand((k, k, 1, 6), 1))
  r = jnp.asarray(_rand((2, hw, hw + 1, 6), 2))
  p = d * (k - 1) // 2

  def ref(x, kern):
    return lax.conv_general_dilated(x, kern, (1, 1), ((p, p), (p, p)), rhs_dilation=(d, d),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=6, precision=lax.Precision.HIGHEST)

  ours = lambda x, kern: layers.depthwise_shifted(x, kern, k, d)  # noqa: E731
  np.testing.assert_allclose(ours(x, kern), ref(x, kern), rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda x, kern: jnp.sum(ours(x, kern) * r), argnums=(0, 1))(x, kern)
  want = jax.grad(lambda x, kern: jnp.sum(ref(x, kern) * r), argnums=(0, 1))(x, kern)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


needs_native = pytest.mark.skipif(native.onednn() is None,
                                  reason="the jseg.native extension is not built here")


@needs_native
@pytest.mark.parametrize("n,h,w,c,k,d", [(2, 9, 11, 37, 3, 2), (1, 16, 16, 70, 3, 12),
                                         (3, 7, 5, 8, 5, 1), (2, 6, 6, 33, 3, 7)])
def test_native_depthwise_kernel_grad_equals_the_exact_sums(n, h, w, c, k, d):
  """``depthwise_kernel_grad_native`` against the same sums in float64 (channel counts off
  its 32-channel blocks, taps partly or wholly in the padding), and the same bits on a
  second call (each output is summed by one task in a fixed order)."""
  x = _rand((n, h, w, c))
  g = _rand((n, h, w, c), 1)
  p = d * (k - 1) // 2
  xp = np.pad(x.astype(np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
  want = np.stack([np.stack([np.sum(xp[:, i * d:i * d + h, j * d:j * d + w] * g, axis=(0, 1, 2))
                             for j in range(k)]) for i in range(k)])
  f = jax.jit(lambda x, g: layers.depthwise_kernel_grad_native(x, g, k, d))
  got = np.asarray(f(jnp.asarray(x), jnp.asarray(g)))
  assert got.shape == (k, k, c)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.testing.assert_array_equal(got, np.asarray(f(jnp.asarray(x), jnp.asarray(g))))


@needs_native
def test_native_depthwise_kernel_grad_is_one_call_and_checks_shapes(monkeypatch):
  """The shifted-product backward uses the single native call (``JSEG_DW_GRAD=native``; by
  default where the oneDNN convolutions run), XLA's per-tap slices and reductions under
  ``JSEG_DW_GRAD=xla``, and
  mismatched operands are refused by name."""
  x = jnp.asarray(_rand((2, 16, 16, 64)))
  kern = jnp.asarray(_rand((3, 3, 1, 64), 1))
  loss = lambda x, kern: jnp.sum(layers.depthwise_shifted(x, kern, 3, 2) ** 2)  # noqa: E731
  texts = {}
  for mode in ("native", "xla"):
    monkeypatch.setenv("JSEG_DW_GRAD", mode)
    texts[mode] = jax.jit(jax.grad(loss, argnums=1)).lower(x, kern).as_text()
  assert "JsegDwKernelGrad" in texts["native"] and "JsegDwKernelGrad" not in texts["xla"]
  with pytest.raises(ValueError, match="one shape"):
    layers.depthwise_kernel_grad_native(x, x[:, :8], 3, 2)


@needs_native
@pytest.mark.parametrize("k,shape", [(5, (2, 9, 7, 3)), (3, (1, 6, 11, 20)), (5, (2, 2, 3, 4)),
                                     (7, (1, 13, 5, 2))])
def test_native_max_pool_same_backward_has_xlas_bits(monkeypatch, k, shape):
  """``JSEG_POOL=native`` (the default where the oneDNN convolutions run) routes the stride-1
  pool's gradient in one custom call with the same bits as XLA's shifted selects
  (``JSEG_POOL=xla``), ties (ReLU zeros) and maps smaller than the window included."""
  x = np.maximum(np.round(_rand(shape) * 2) / 2, 0).astype(np.float32)
  x[0, 0, 0] = -np.inf  # a window corner below everything
  r = _rand(shape, 1)
  loss = lambda t: jnp.sum(layers.max_pool_same(t, k) * r)  # noqa: E731
  grads, texts = {}, {}
  for mode in ("native", "xla"):
    monkeypatch.setenv("JSEG_POOL", mode)
    f = jax.jit(jax.grad(loss))
    texts[mode] = f.lower(x).as_text()
    grads[mode] = np.asarray(f(x))
  assert "JsegPoolSameBwd" in texts["native"] and "JsegPoolSameBwd" not in texts["xla"]
  assert (x == 0).mean() > 0.3 and np.abs(grads["xla"]).max() > 0
  np.testing.assert_array_equal(grads["native"], grads["xla"])


@needs_native
def test_native_max_pool_same_backward_keeps_less_and_checks_shapes(monkeypatch):
  """In a compiled chain of 5x5 pools the native backward needs less than half XLA's
  temporaries (XLA wrote a full-size copy per shifted tap); mismatched positions are
  refused by name."""
  x = _rand((2, 32, 32, 32))
  r = _rand((2, 32, 32, 32), 1)

  def f(t):
    for _ in range(4):
      t = jnp.tanh(layers.max_pool_same(t, 5))
    return jnp.sum(t * r)

  temps = {}
  for mode in ("native", "xla"):
    monkeypatch.setenv("JSEG_POOL", mode)
    temps[mode] = jax.jit(jax.grad(f)).lower(x).compile().memory_analysis().temp_size_in_bytes
  assert temps["native"] < 0.5 * temps["xla"], temps
  g = jnp.asarray(x)
  at = jnp.zeros(x.shape, jnp.int8)
  with pytest.raises(ValueError, match="positions of its shape"):
    layers.pool_same_bwd_native(g, at[:, :8], at, 5)


def test_shifted_kernel_grad_runs_tap_by_tap_on_large_slices():
  """At >= 2 MiB per tap slice the kernel gradient loops over taps: equal to the written-out
  sums and to the grouped convolution's kernel gradient, with fewer than four slices of
  temporaries (the written-out form kept all eight off-centre slices at once)."""
  k, d = 3, 2
  x = jnp.asarray(_rand((1, 32, 32, 512)))
  g = jnp.asarray(_rand((1, 32, 32, 512), 1))
  xp = layers._same_pad(x, d)
  got = jax.jit(lambda xp, g: layers._shifted_kernel_grad(xp, g, k, d))(xp, g)
  sums = np.stack([np.stack([np.asarray(jnp.sum(xp[:, i * d:i * d + 32, j * d:j * d + 32] * g,
                                                axis=(0, 1, 2))) for j in range(k)])
                   for i in range(k)])
  np.testing.assert_allclose(np.asarray(got), sums, rtol=1e-5, atol=1e-3)

  def conv(kern):
    return lax.conv_general_dilated(x, kern, (1, 1), ((d, d), (d, d)), rhs_dilation=(d, d),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=512, precision=lax.Precision.HIGHEST)
  want = jax.vjp(conv, jnp.zeros((k, k, 1, 512)))[1](g)[0][:, :, 0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
  temps = jax.jit(lambda xp, g: layers._shifted_kernel_grad(xp, g, k, d)).lower(
      xp, g).compile().memory_analysis().temp_size_in_bytes
  assert temps < 4 * g.size * 4, temps


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 7, 5, 4)])
def test_pool_2x2_positions_are_each_windows_first_maximum(shape):
  """int8 row-major position of each 2x2 window's first maximum (floor mode: a trailing odd
  row/column ignored), ties (all-zero windows after a ReLU) to the first, NaN wins: the
  positions ``max_pool_2x2``'s backward routes its gradient to."""
  from jseg.models.layers import max_pool_2x2, pool_2x2_positions

  rng = np.random.default_rng(0)
  x = np.maximum(rng.integers(-2, 3, size=shape), 0).astype(np.float32)  # many ties
  x[0, 0, 1, 0] = np.nan
  n, h, w, c = shape
  win = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
  win = win.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)
  want = np.where(np.isnan(win).any(-1), np.isnan(win).argmax(-1), win.argmax(-1))
  got = np.asarray(pool_2x2_positions(jnp.asarray(x)))
  assert got.dtype == np.int8 and got.shape == (n, h // 2, w // 2, c)
  np.testing.assert_array_equal(got, want)
  g = jax.grad(lambda x: jnp.sum(max_pool_2x2(x)))(jnp.asarray(np.nan_to_num(x)))
  routed = np.asarray(g)[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
  routed = routed.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4).argmax(-1)
  np.testing.assert_array_equal(routed, pool_2x2_positions(jnp.asarray(np.nan_to_num(x))))
