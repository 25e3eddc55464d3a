"""jseg.models.conv: oneDNN convolutions against lax.conv_general_dilated, and the dispatch.

Every geometry the networks use (strides, dilation, groups incl. depthwise, 1x1, the 7x7/2
stem, asymmetric and string padding, odd sizes) is compared in value and in both
gradients, and the lowered program is checked to really contain the custom call, so a
silent fallback to XLA cannot pass as a oneDNN test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from jseg import native
from jseg.models import conv

pytestmark = pytest.mark.skipif(
    native.onednn() is None, reason=f"oneDNN extension unavailable: {native.onednn_error()}")

DN = ("NHWC", "HWIO", "NHWC")


def _rand(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _value_and_grads(f, x, k, seed=7):
  y_shape = jax.eval_shape(f, x, k).shape
  r = jnp.asarray(_rand(y_shape, seed))

  def run(x, k):
    y, pull = jax.vjp(f, x, k)
    return y, pull(r)

  return jax.jit(run)(x, k)


def _uses_onednn(f, *args) -> bool:
  return "JsegConv" in jax.jit(f).lower(*args).as_text()


# (input NHWC, kernel HWIO, strides, padding, dilation, groups)
CASES = [
    ((2, 9, 11, 8), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 9, 11, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 16, 16, 8), (3, 3, 8, 8), (1, 1), ((2, 2), (2, 2)), (2, 2), 1),
    ((2, 16, 16, 8), (3, 3, 8, 8), (1, 1), ((4, 4), (4, 4)), (4, 4), 1),
    ((2, 16, 16, 8), (3, 3, 1, 8), (1, 1), ((3, 3), (3, 3)), (3, 3), 8),  # depthwise, dilated
    ((2, 15, 15, 8), (3, 3, 1, 8), (2, 2), ((0, 1), (1, 0)), (1, 1), 8),  # asymmetric padding
    ((2, 16, 16, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3)), (1, 1), 1),  # ResNet stem
    ((2, 16, 16, 8), (1, 1, 8, 12), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
    ((2, 16, 16, 8), (1, 1, 8, 12), (2, 2), ((0, 0), (0, 0)), (1, 1), 1),  # sliced, see conv.py
    ((2, 15, 13, 8), (1, 1, 8, 12), (2, 3), "VALID", (1, 1), 1),
    ((1, 10, 10, 6), (3, 3, 2, 9), (1, 1), ((1, 1), (1, 1)), (1, 1), 3),  # grouped
    ((3, 7, 5, 4), (3, 3, 4, 5), (1, 1), "SAME", (1, 1), 1),  # 3 images: bands (forward)
    ((2, 12, 12, 4), (3, 3, 4, 6), (2, 2), "SAME", (1, 1), 1),
    ((2, 12, 12, 4), (3, 3, 4, 6), (1, 1), "VALID", (2, 2), 1),
    # One image: the forward is cut into bands of output rows (conv.conv_split), whose
    # first/last bands take the padding; strided, dilated, asymmetric, two output rows.
    ((1, 17, 13, 8), (3, 3, 8, 16), (2, 2), "SAME", (1, 1), 1),
    ((1, 33, 9, 6), (7, 7, 6, 5), (2, 2), ((3, 2), (3, 3)), (1, 1), 1),
    ((1, 20, 20, 16), (3, 3, 16, 8), (1, 1), ((4, 4), (4, 4)), (4, 4), 1),
    ((1, 3, 5, 4), (3, 3, 4, 4), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    ((4, 9, 7, 8), (3, 3, 1, 8), (1, 1), "SAME", (1, 1), 8),  # 4 images, depthwise
    ((3, 11, 6, 4), (3, 3, 4, 5), (2, 1), ((1, 2), (0, 1)), (1, 1), 1),  # 3 images x bands
    # kernel gradients by output channels: a kernel heavier than the images; an odd batch
    ((2, 4, 5, 32), (3, 3, 32, 16), (1, 1), "SAME", (1, 1), 1),
    ((3, 7, 5, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (0, 2)), (1, 1), 1),
    # padded beyond the kernel's extent (FCN's conv1_1): the input is padded first
    ((2, 10, 9, 3), (3, 3, 3, 8), (1, 1), ((5, 5), (4, 6)), (1, 1), 1),
    ((1, 8, 8, 4), (3, 3, 4, 4), (2, 1), ((6, 3), (2, 7)), (2, 2), 1),
]


@pytest.mark.parametrize("threads", ["xla", "openmp"])
@pytest.mark.parametrize("xs,ks,strides,padding,dilation,groups", CASES)
def test_values_and_gradients_match_lax(xs, ks, strides, padding, dilation, groups, threads,
                                        monkeypatch):
  """Both ways of running a call: cut into parts on XLA's threads, and whole on OpenMP's."""
  monkeypatch.setenv("JSEG_CONV_THREADS", threads)
  x, k = _rand(xs, 0), _rand(ks, 1)

  def ours(x, k):
    return conv.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation,
                                     dimension_numbers=DN, feature_group_count=groups)

  def ref(x, k):
    return lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=DN, feature_group_count=groups,
                                    precision=lax.Precision.HIGHEST)

  assert _uses_onednn(ours, x, k)
  y, (dx, dk) = _value_and_grads(ours, x, k)
  y_ref, (dx_ref, dk_ref) = _value_and_grads(ref, x, k)
  assert y.shape == y_ref.shape and dx.shape == x.shape and dk.shape == k.shape
  scale = float(jnp.max(jnp.abs(y_ref)))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(dx_ref))))
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(dk_ref))))


@pytest.mark.parametrize("epilogue", [False, True])
def test_padding_beyond_the_kernel_is_applied_to_the_input_first(epilogue, monkeypatch):
  """oneDNN runs a convolution padded by its kernel's extent or more with its GEMM code
  (several times slower); the native calls get at most the extent less one."""
  seen = []
  call = conv._call

  def spy(target, kind, out_shape, x_shape, k_shape, y_shape, strides, dilation, padding,
          *args, **kw):
    seen.append((kind, padding))
    return call(target, kind, out_shape, x_shape, k_shape, y_shape, strides, dilation,
                padding, *args, **kw)

  monkeypatch.setattr(conv, "_call", spy)
  x, k = jnp.asarray(_rand((2, 6, 7, 3), 0)), jnp.asarray(_rand((3, 3, 3, 4), 1))
  b = jnp.asarray(_rand((4,), 2))
  pads = ((100, 100), (3, 2))
  epi = conv.Epilogue(None, b, relu=True) if epilogue else None
  f = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=DN,
                                            epilogue=epi)
  y, (dx, dk) = _value_and_grads(f, x, k)
  y_ref, (dx_ref, dk_ref) = _value_and_grads(
      lambda x, k: (lambda y: jax.nn.relu(y + b) if epilogue else y)(lax.conv_general_dilated(
          x, k, (1, 1), pads, dimension_numbers=DN, precision=lax.Precision.HIGHEST)), x, k)
  assert y.shape == (2, 204, 10, 4)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-4)
  assert {kind for kind, _ in seen} >= {"d", "w"}
  assert all(max(p for pair in padding for p in pair) <= 2 for _, padding in seen), seen
  # beyond 2 (the extent less one) -> half the extent; 2 itself is left as it is
  assert (("q" if epilogue else "f"), ((1, 1), (1, 2))) in seen, seen
  assert conv._pad_beyond_kernel(x, k.shape, (1, 1), ((1, 1), (2, 0)))[1] == ((1, 1), (2, 0))


@pytest.mark.parametrize("kind", ["f", "d", "w"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]])
def test_onednn_picks_an_optimised_implementation(kind, case):
  xs, ks, strides, padding, dilation, groups = case
  y = jax.eval_shape(lambda x, k: lax.conv_general_dilated(
      x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=DN,
      feature_group_count=groups), jnp.zeros(xs), jnp.zeros(ks)).shape
  name = native.onednn_impl(kind, xs, ks, y, strides, dilation, padding, groups)
  assert name and not name.startswith("ref"), name  # 'ref' is oneDNN's slow reference code


@pytest.mark.parametrize("threads,n,kind,oh,cin,want", [
    (2, 4, "f", 8, 4, (1, 2)), (2, 4, "w", 8, 4, (1, 2)), (2, 2, "d", 8, 4, (1, 2)),
    (4, 8, "w", 8, 4, (1, 4)), (4, 12, "d", 8, 4, (1, 4)),  # groups of n / threads images
    (2, 3, "f", 8, 4, (2, 2)),  # 3 images x 2 bands: 3 parts per thread
    (4, 6, "f", 8, 4, (2, 2)), (16, 4, "f", 8, 4, (2, 4)), (2, 1, "f", 8, 4, (2, 2)),
    (16, 1, "f", 5, 4, (2, 5)),  # no more bands than output rows
    (2, 3, "w", 8, 4, (3, 2)),  # odd batches: by output channels
    (2, 1, "w", 8, 4, (2, 2)), (4, 2, "w", 8, 4, (2, 2)),  # fewer images than threads: bands
    (4, 6, "d", 8, 4, (4, 4)), (2, 1, "d", 8, 4, (4, 2)),  # ... and by input channels
    (2, 1, "d", 8, 5, (0, 1)), (2, 3, "w", 8, 5, (0, 1)),  # odd channels: whole, on OpenMP
    (2, 1, "w", 8, 64, (3, 2)),  # one image, a heavy kernel: by channels
    (16, 4, "w", 8, 4, (0, 1)),  # 4 channels, 4 images: no cut gives every thread a part
    (2, 1, "f", 1, 4, (0, 1)),
    (1, 4, "f", 8, 4, (0, 1)),  # one thread
    # a 3x3 cin->cin kernel against one part's input (2 images of 16x8xcin): 9 cin^2 vs 256 cin
    (2, 4, "w", 8, 28, (1, 2)), (2, 4, "w", 8, 30, (3, 2)),
    (2, 4, "w", 8, 29, (1, 2)),  # odd channel count: by images anyway
    (2, 4, "d", 8, 512, (1, 2)), (2, 4, "f", 8, 512, (1, 2)),  # by images whatever the kernel
])
def test_conv_split_cuts_calls_over_xla_threads(threads, n, kind, oh, cin, want, monkeypatch):
  monkeypatch.setattr(conv, "_intra_op_threads", lambda: threads)
  shapes = ((n, 2 * oh, 8, cin), (n, oh, 8, cin), (3, 3, cin, cin))
  assert conv.conv_split(kind, *shapes) == want
  if kind == "f":  # the epilogue forwards are cut as the plain one
    assert all(conv.conv_split(k, *shapes) == want for k in conv.FORWARD_KINDS)
  monkeypatch.setenv("JSEG_CONV_THREADS", "openmp")
  assert conv.conv_split(kind, *shapes) == (0, 1)
  monkeypatch.setenv("JSEG_CONV_THREADS", "tbb")
  with pytest.raises(ValueError, match="JSEG_CONV_THREADS must be one of"):
    conv.conv_split(kind, *shapes)


def test_split_calls_are_in_the_program_and_match_the_whole_call(monkeypatch):
  """The lowered calls carry the split; the parts' results equal one whole call's (the
  kernel gradient up to the grouping of its float32 sum), and a split call's workspace
  holds each part's scratchpad, so it differs from the whole call's."""
  monkeypatch.setattr(conv, "_intra_op_threads", lambda: 2)
  x, k = _rand((4, 12, 12, 8), 0), _rand((3, 3, 8, 16), 1)
  f = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
  out = {}
  for threads in ("xla", "openmp"):
    monkeypatch.setenv("JSEG_CONV_THREADS", threads)
    text = jax.jit(lambda x, k: _value_and_grads(f, x, k)).lower(x, k).as_text()
    calls = [line for line in text.splitlines() if "@JsegConv" in line]
    assert len(calls) == 3
    want = "split = 1 : i64" if threads == "xla" else "split = 0 : i64"
    assert all(want in line for line in calls), calls[0][-300:]
    out[threads] = _value_and_grads(f, x, k)
  y, (dx, dk) = out["xla"]
  y0, (dx0, dk0) = out["openmp"]
  np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dx, dx0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dk, dk0, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(dk0))))
  monkeypatch.setenv("JSEG_CONV_THREADS", "xla")  # the same parts again: the same bits
  again = _value_and_grads(f, x, k)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(out["xla"])))
  geom = ((4, 12, 12, 8), (3, 3, 8, 16), (4, 12, 12, 16), (1, 1), (1, 1), ((1, 1), (1, 1)), 1)
  assert native.onednn_workspace("w", *geom, 1, 2) != native.onednn_workspace("w", *geom)
  assert not native.onednn_impl("w", *geom, 1, 2).startswith("ref")


@pytest.mark.parametrize("kind", ["f", "d", "w"])
def test_split_calls_cut_the_kernel_reorder_and_keep_the_values(kind, monkeypatch):
  """A layer wide enough for oneDNN's blocked kernel layout to hold two blocks reorders its
  kernel in pieces on XLA's threads; values and gradients still match XLA's. 192 channels:
  a whole number of oneDNN's output-channel blocks on AVX-512 (16, 32, 48, 64) and AVX2
  (24; 256 would be padded to 264 there, and a padded kernel is reordered whole)."""
  monkeypatch.setattr(conv, "_intra_op_threads", lambda: 2)
  xs, ks = (2, 4, 4, 192), (3, 3, 192, 192)
  geom = (xs, ks, xs, (1, 1), (1, 1), ((1, 1), (1, 1)), 1)
  split, chunks = conv.conv_split(kind, xs, xs, ks)
  if kind == "w":  # by channels: each part reorders its own channels; by images instead
    assert (split, chunks) == (3, 2)
    monkeypatch.setattr(conv, "KERNEL_SPLIT_RATIO", float("inf"))
    split, chunks = conv.conv_split(kind, xs, xs, ks)
  assert (split, chunks) == (1, 2)
  assert native.onednn_reorder_pieces(kind, *geom, split, chunks) == 2
  x, k = _rand(xs, 0), _rand(ks, 1) * 0.05
  f = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
  ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN,  # noqa: E731
                                             precision=lax.Precision.HIGHEST)
  got, want = _value_and_grads(f, x, k), _value_and_grads(ref, x, k)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_split_call_without_its_workspace_uses_its_own_buffer(monkeypatch):
  """A workspace too small for the parts (here 1 byte) falls back to a buffer of the call's
  own, with the same results."""
  monkeypatch.setattr(conv, "_intra_op_threads", lambda: 2)
  x, k = _rand((2, 10, 10, 8), 2), _rand((3, 3, 8, 8), 3)
  f = lambda x, k: conv.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=DN)  # noqa: E731
  want = _value_and_grads(f, x, k)
  monkeypatch.setattr(native, "onednn_workspace", lambda *args: 1)
  jax.clear_caches()  # the custom VJP's traced calls are cached with their workspace size
  got = _value_and_grads(f, x, k)
  assert "tensor<1xui8>" in jax.jit(f).lower(x, k).as_text()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_a_cut_onednn_cannot_plan_falls_back_to_the_whole_call(monkeypatch):
  """When oneDNN cannot take the chosen cut (row bands whose kernel gradients come in
  different layouts), the call runs whole instead of failing."""
  workspace = native.onednn_workspace

  def no_cuts(*args):
    if args[-2] != 0:
      raise native.NativeBuildError("oneDNN rejected the convolution (workspace query)")
    return workspace(*args)

  monkeypatch.setattr(native, "onednn_workspace", no_cuts)
  jax.clear_caches()
  x, k = _rand((1, 20, 20, 16), 0), _rand((3, 3, 16, 8), 1)
  f = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
  text = jax.jit(lambda x, k: _value_and_grads(f, x, k)).lower(x, k).as_text()
  calls = [line for line in text.splitlines() if "@JsegConv" in line]
  assert len(calls) == 3 and all("split = 0 : i64" in line for line in calls)
  ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
  for a, b in zip(jax.tree.leaves(_value_and_grads(f, x, k)), jax.tree.leaves(_value_and_grads(ref, x, k))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
  jax.clear_caches()


def test_a_split_the_call_cannot_take_is_a_clear_error():
  native.onednn()  # registers the custom calls
  x, k = jnp.asarray(_rand((2, 8, 8, 4), 0)), jnp.asarray(_rand((3, 3, 4, 4), 1))
  call = jax.ffi.ffi_call("JsegConvFwd", (jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32),
                                          jax.ShapeDtypeStruct((1 << 16,), jnp.uint8)))
  for split, chunks in ((1, 3), (2, 9), (3, 2)):  # 3 groups of 2 images; 9 bands of 8 rows
    with pytest.raises(Exception, match="invalid split/chunks"):
      jax.block_until_ready(call(x, k, **conv._attrs((1, 1), (1, 1), ((1, 1), (1, 1)), 1,
                                                      split, chunks)))
  with pytest.raises(native.NativeBuildError, match="rejected"):
    native.onednn_workspace("f", (2, 8, 8, 4), (3, 3, 4, 4), (2, 8, 8, 4), (1, 1), (1, 1),
                            ((1, 1), (1, 1)), 1, 1, 3)


def test_flax_conv_wrapper_has_flax_params_and_values():
  x = _rand((2, 9, 9, 5), 2)
  ours, stock = conv.Conv(7, (3, 3), strides=2, padding="SAME"), nn.Conv(7, (3, 3), strides=2,
                                                                        padding="SAME")
  v = stock.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, v)
  np.testing.assert_allclose(jax.jit(ours.apply)(v, x), jax.jit(stock.apply)(v, x),
                             rtol=1e-5, atol=1e-5)
  assert _uses_onednn(ours.apply, v, x)


@pytest.mark.parametrize("what", ["bf16", "lhs_dilation", "nchw", "env_xla"])
def test_falls_back_to_lax_where_onednn_does_not_apply(what, monkeypatch):
  x, k = _rand((1, 8, 8, 4), 3), _rand((3, 3, 4, 4), 4)
  kw = dict(dimension_numbers=DN)
  if what == "bf16":
    x, k = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  if what == "lhs_dilation":
    kw["lhs_dilation"] = (2, 2)
  if what == "nchw":
    x, k, kw = x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1), {}
  if what == "env_xla":
    monkeypatch.setenv("JSEG_CONV", "xla")

  def ours(x, k):
    return conv.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), **kw)

  def ref(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), **kw)

  assert not _uses_onednn(ours, x, k)
  np.testing.assert_allclose(np.asarray(jax.jit(ours)(x, k), np.float32),
                             np.asarray(jax.jit(ref)(x, k), np.float32), rtol=1e-6, atol=1e-6)


def test_bad_mode_and_forced_unavailable_backend_are_clear_errors(monkeypatch):
  monkeypatch.setenv("JSEG_CONV", "cudnn")
  with pytest.raises(ValueError, match="JSEG_CONV must be one of"):
    conv.conv_mode()
  monkeypatch.setenv("JSEG_CONV", "onednn")
  monkeypatch.setattr(native, "onednn", lambda: None)
  monkeypatch.setattr(native, "onednn_error", lambda: "NativeBuildError: no compiler")
  with pytest.raises(RuntimeError, match="no compiler"):
    conv.onednn_active()
  monkeypatch.setenv("JSEG_CONV", "auto")
  assert conv.onednn_active() is False  # auto: XLA, and the log line says why
  assert conv.conv_backend_summary() == "XLA (oneDNN extension unavailable: " \
      "NativeBuildError: no compiler)"


def test_backend_summary_names_the_choice(monkeypatch):
  assert conv.conv_backend_summary().startswith("oneDNN")
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  # auto: several devices would each run the whole (gathered) batch through the custom call.
  assert not conv.onednn_active()
  assert conv.conv_backend_summary().startswith("XLA (2 devices")
  monkeypatch.setenv("JSEG_CONV", "onednn")
  assert conv.onednn_active()  # the user's explicit choice is kept
  monkeypatch.setenv("JSEG_CONV", "xla")
  assert conv.conv_backend_summary() == "XLA (JSEG_CONV=xla)"


def test_vmap_over_the_custom_call():
  x, k = _rand((3, 2, 6, 6, 4), 5), _rand((3, 3, 4, 2), 6)
  f = lambda x: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
  g = lambda x: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
  np.testing.assert_allclose(jax.jit(jax.vmap(f))(x), jax.jit(jax.vmap(g))(x),
                             rtol=1e-5, atol=1e-5)
  # An epilogue with a residual (its aliased output) under vmap, e.g. ensemble members
  # vmapped over their parameters at evaluation.
  xs, ks = jnp.asarray(_rand((3, 2, 16, 16, 8), 0)), jnp.asarray(_rand((3, 3, 3, 8, 8), 1))
  ss, bs = jnp.asarray(_rand((3, 8), 2)), jnp.asarray(_rand((3, 8), 3))
  rs = jnp.asarray(_rand((3, 2, 16, 16, 8), 4))
  fused = lambda x, k, s, b, r: conv.conv_general_dilated(  # noqa: E731
      x, k, (1, 1), "SAME", dimension_numbers=DN, epilogue=conv.Epilogue(s, b, True, r))
  separate = lambda x, k, s, b, r: conv.Epilogue(s, b, True, r).apply(  # noqa: E731
      lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN))
  assert "JsegConvScaleBiasAdd" in jax.jit(jax.vmap(fused)).lower(xs, ks, ss, bs, rs).as_text()
  np.testing.assert_allclose(jax.jit(jax.vmap(fused))(xs, ks, ss, bs, rs),
                             jax.vmap(separate)(xs, ks, ss, bs, rs), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name,kw", [
    ("deeplabv3plus", dict(width=0.0625, middle_blocks=2, aspp_features=8, decoder_features=8,
                           low_level_features=4)),  # depthwise, strided 1x1, dilated
    ("pspnet", dict(depth=18, width=4, head_features=8, aux_features=4)),  # 7x7/2 stem
])
@pytest.mark.slow
def test_whole_network_loss_and_gradients_equal_under_xla_and_onednn(name, kw, monkeypatch):
  import ml_collections

  from jseg.models import build_model
  from tiny import host_init

  model = build_model(ml_collections.ConfigDict(dict(name=name, num_classes=5, **kw)))
  x = _rand((2, 48, 48, 3), 8)
  v = host_init(model, x, train=False)

  # Evaluation-mode BatchNorm: with training-mode statistics over a 3x3 map of 2 images the
  # two backends' rounding differences grew to 0.6% in one stem kernel gradient.
  def loss(params, x):
    out, aux = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=False)
    return jnp.mean(jnp.sin(out)) + sum(jnp.mean(a) for a in jax.tree.leaves(aux))

  results = {}
  for mode in ("xla", "onednn"):
    monkeypatch.setenv("JSEG_CONV", mode)
    f = lambda p, x: loss(p, x)  # noqa: E731  (a fresh function: traced under this mode)
    assert _uses_onednn(f, v["params"], x) == (mode == "onednn")
    results[mode] = jax.jit(jax.value_and_grad(f))(v["params"], x)
  (l0, g0), (l1, g1) = results["xla"], results["onednn"]
  np.testing.assert_allclose(l1, l0, rtol=1e-4, atol=1e-5)
  # Biases feeding a BatchNorm have ~0 gradients (float noise): tolerance on the global scale.
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("dilation,expect_onednn", [(1, True), (6, None), (12, False), (18, False)])
def test_depthwise_goes_to_onednn_only_where_it_has_no_gemm_fallback(dilation, expect_onednn,
                                                                      monkeypatch):
  """None: depends on the machine's ISA (rate 6: oneDNN 3.2's direct kernels on AVX-512, its
  GEMM forward on AVX2), so the expectation is read from the implementations' names."""
  from jseg.models import layers
  monkeypatch.setenv("JSEG_CONV", "onednn")
  x = _rand((2, 16, 16, 32), 5)
  if expect_onednn is None:
    pad = ((dilation, dilation),) * 2
    names = [native.onednn_impl(k, x.shape, (3, 3, 1, 32), x.shape, (1, 1), (dilation,) * 2, pad,
                                32) for k in "fdw"]
    expect_onednn = not any("gemm" in name for name in names)
  assert conv.onednn_depthwise_without_gemm(x.shape, 3, 1, dilation, dilation) is expect_onednn
  m = layers.DepthwiseConv(3, 1, dilation)
  v = m.init(jax.random.key(0), x)
  assert _uses_onednn(m.apply, v, x) is expect_onednn
  ref = nn.Conv(32, (3, 3), padding=((dilation, dilation),) * 2, kernel_dilation=dilation,
                feature_group_count=32, use_bias=False)
  np.testing.assert_allclose(m.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,stride,dilation,want", [
    (16, 1, 18, (1, 1)),   # ASPP rate 18 on a 16x16 map: only the centre tap is live
    (16, 1, 12, (0, 2)),   # rate 12: every tap reads some of the map
    (16, 1, 16, (1, 1)),   # rate equal to the size: the outer taps start/end in the padding
    (9, 2, 5, (0, 2)),
    (32, 1, 36, (1, 1)),
])
def test_live_taps(size, stride, dilation, want):
  assert conv.live_taps(size, 3, stride, dilation, (dilation, dilation)) == want


@pytest.mark.parametrize("hw,dilation,stride,taps", [
    ((16, 16), 18, 1, (1, 1)), ((16, 20), 16, 1, (1, 3)), ((5, 5), 6, 1, (1, 1)),
    ((32, 32), 36, 1, (1, 1)), ((9, 9), 5, 2, (3, 3)), ((7, 7), 7, 2, (1, 1))])
def test_dead_taps_dropped_with_the_same_values_and_gradients(hw, dilation, stride, taps):
  """trim_dead_taps is exact: a 3x3 atrous convolution whose outer taps read only padding
  equals the trimmed one (oneDNN or XLA) in values and in both gradients, and the dropped
  taps' kernel gradient is zero."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, *hw, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 4, 3)), jnp.float32)
  pads = ((dilation, dilation), (dilation, dilation))
  dn = ("NHWC", "HWIO", "NHWC")
  k2, _ = conv.trim_dead_taps(x.shape, k, (stride, stride), (dilation, dilation), pads)
  assert k2.shape[:2] == taps

  def loss(f, x, k):
    return jnp.sum(jnp.tanh(f(x, k, (stride, stride), pads, None, (dilation, dilation), dn)))

  ref = lambda x, k, *a: lax.conv_general_dilated(x, k, *a, precision=lax.Precision.HIGHEST)
  np.testing.assert_allclose(conv.conv_general_dilated(x, k, (stride, stride), pads, None,
                                                       (dilation, dilation), dn),
                             ref(x, k, (stride, stride), pads, None, (dilation, dilation), dn),
                             rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda x, k: loss(conv.conv_general_dilated, x, k), argnums=(0, 1))(x, k)
  g_ref = jax.grad(lambda x, k: loss(ref, x, k), argnums=(0, 1))(x, k)
  for a, e in zip(g, g_ref):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)
  lo, hi = conv.live_taps(hw[0], 3, stride, dilation, pads[0])
  dead_rows = [t for t in range(3) if not lo <= t <= hi]
  assert all(float(jnp.abs(g[1][t]).max()) == 0.0 for t in dead_rows)


def test_dead_taps_dropped_on_the_xla_path_too():
  """bfloat16 (and every non-oneDNN case with NHWC/HWIO geometry) gets the trimmed kernel."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 16, 16, 8)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((3, 3, 8, 4)), jnp.bfloat16)
  pads = ((18, 18), (18, 18))
  f = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), pads, None, (18, 18), DN)
  convs = [e for e in jax.make_jaxpr(f)(x, k).eqns if e.primitive.name == "conv_general_dilated"]
  assert [tuple(e.invars[1].aval.shape[:2]) for e in convs] == [(1, 1)]
  ref = lax.conv_general_dilated(x, k, (1, 1), pads, None, (18, 18), DN,
                                 preferred_element_type=jnp.float32)
  np.testing.assert_allclose(np.asarray(f(x, k), np.float32), np.asarray(ref), rtol=2e-2, atol=5e-2)


def test_scratchpad_is_an_xla_workspace_output():
  """Each oneDNN call returns a uint8 workspace (its scratchpad and the kernel in oneDNN's
  layout) that XLA allocates with its temporaries, sized by ``native.onednn_workspace``."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 8)), jnp.float32)
  k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 8, 16)), jnp.float32)
  geom = ((2, 16, 16, 8), (3, 3, 8, 16), (2, 16, 16, 16), (1, 1), (1, 1), ((1, 1), (1, 1)), 1)
  sizes = {kind: native.onednn_workspace(kind, *geom, *conv.conv_split(kind, geom[0], geom[2], geom[1]))
           for kind in "fdw"}
  assert all(n >= 4096 and n % 4096 == 0 for n in sizes.values()), sizes
  f = lambda x, k: jnp.sum(conv.onednn_conv(x, k, (1, 1), (1, 1), ((1, 1), (1, 1)), 1) ** 2)
  text = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, k).as_text()
  for target, kind in (("JsegConvFwd", "f"), ("JsegConvBwdData", "d"), ("JsegConvBwdWeights", "w")):
    line = next(line for line in text.splitlines() if f"@{target}(" in line)
    assert f"tensor<{sizes[kind]}xui8>" in line, line[-300:]
  gx, gk = jax.grad(f, argnums=(0, 1))(x, k)
  rx, rk = jax.grad(lambda x, k: jnp.sum(lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN) ** 2),
      argnums=(0, 1))(x, k)
  np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(gk, rk, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("form", ["conv_kernel", "then_conv"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_conv_kernel_and_as_function_equal_the_conv_module(use_bias, form):
  """``ConvKernel`` creates the parameters ``Conv`` would (same path, shape, initialiser and
  key; the bias after the kernel) and ``as_function`` computes what the bound module
  computes."""
  from flax import linen as nn

  from jseg.models.conv import Conv, ConvKernel, as_function, then_conv
  init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  bias_init = nn.initializers.normal(0.5)  # random: the bias's key must match too
  kw = dict(strides=2, padding=((2, 2), (2, 2)), kernel_dilation=2, use_bias=use_bias,
            kernel_init=init, bias_init=bias_init)

  class Module(nn.Module):
    functional: bool

    @nn.compact
    def __call__(self, x):
      if self.functional and form == "then_conv":  # the helper the networks use
        fn, p = then_conv(Conv(6, (3, 3), parent=None, name="c", **kw), x.shape[-1])
        return fn(x, *p)
      if self.functional:
        p = ConvKernel(6, (3, 3), init, use_bias, bias_init, name="c")(x.shape[-1])
        return as_function(Conv(6, (3, 3), parent=None, **kw))(x, *(p if use_bias else (p,)))
      return Conv(6, (3, 3), name="c", **kw)(x)

  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 11, 5)), jnp.float32)
  v_f = Module(True).init(jax.random.key(3), x)
  v_m = Module(False).init(jax.random.key(3), x)
  assert jax.tree.structure(v_f) == jax.tree.structure(v_m)
  assert ("bias" in v_m["params"]["c"]) is use_bias
  for a, b in zip(jax.tree.leaves(v_f), jax.tree.leaves(v_m)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(Module(True).apply(v_f, x), Module(False).apply(v_m, x))


# (input NHWC, kernel HWIO, strides, padding, dilation, groups): outputs that outweigh the
# kernel, so the epilogue runs in the oneDNN call.
EPILOGUE_CASES = [CASES[i] for i in (0, 3, 5, 8, 10, 12, 16, 19)] + [
    ((1, 24, 24, 8), (3, 3, 1, 8), (1, 1), "SAME", (2, 2), 8),  # one image: bands
    ((1, 32, 32, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), (1, 1), 1),  # a stem
]


def _epilogue(ys, seed, relu, residual):
  rng = np.random.default_rng(seed)
  o = ys[-1]
  return conv.Epilogue(jnp.asarray(rng.uniform(-1.5, 1.5, o), jnp.float32),
                       jnp.asarray(rng.standard_normal(o), jnp.float32), relu,
                       jnp.asarray(rng.standard_normal(ys), jnp.float32) if residual else None)


@pytest.mark.parametrize("threads", ["xla", "openmp"])
@pytest.mark.parametrize("relu,residual", [(False, False), (True, False), (False, True),
                                           (True, True)])
@pytest.mark.parametrize("xs,ks,strides,padding,dilation,groups", EPILOGUE_CASES)
def test_epilogue_in_the_call_equals_separate_operations(xs, ks, strides, padding, dilation,
                                                         groups, relu, residual, threads,
                                                         monkeypatch):
  """``relu?(conv * scale + shift [+ residual])`` as one oneDNN call (scale folded into the
  kernel, bias / sum / ReLU post-ops, split or whole) equals the convolution followed by
  ``Epilogue.apply``, in value and in the gradients of every input."""
  monkeypatch.setenv("JSEG_CONV_THREADS", threads)
  monkeypatch.setattr(conv, "_intra_op_threads", lambda: 2)
  x, k = jnp.asarray(_rand(xs, 0)), jnp.asarray(_rand(ks, 1))
  lax_conv = lambda x, k: lax.conv_general_dilated(  # noqa: E731
      x, k, strides, padding, None, dilation, DN, groups)
  ys = jax.eval_shape(lax_conv, x, k).shape
  ep = _epilogue(ys, 2, relu, residual)

  def fused(x, k, scale, shift, res):
    return conv.conv_general_dilated(x, k, strides, padding, None, dilation, DN, groups,
                                     epilogue=conv.Epilogue(scale, shift, relu, res))

  def separate(x, k, scale, shift, res):
    return conv.Epilogue(scale, shift, relu, res).apply(lax_conv(x, k))

  args = (x, k, ep.scale, ep.shift, ep.residual)
  text = jax.jit(fused).lower(*args).as_text()
  assert ("JsegConvScaleBiasAdd" if residual else "JsegConvScaleBias") in text
  r = jnp.asarray(_rand(ys, 3))
  grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * r), argnums=tuple(range(5 if residual else 4)))  # noqa: E731
  np.testing.assert_allclose(jax.jit(fused)(*args), separate(*args), rtol=1e-5, atol=1e-4)
  for a, b in zip(jax.jit(grads(fused))(*args), grads(separate)(*args)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * max(1.0, float(jnp.abs(b).max())))


def test_epilogue_scale_rides_on_the_kernel_reorder_even_where_the_kernel_outweighs_the_output():
  """A kernel larger than the output (deep layers of small maps) is folded too where oneDNN
  reorders it anyway: the scale is applied by that reorder, the same bits as an XLA multiply
  of the kernel before the call."""
  x, k = jnp.asarray(_rand((1, 4, 4, 64), 0)), jnp.asarray(_rand((3, 3, 64, 64), 1))
  ep = _epilogue((1, 4, 4, 64), 2, True, False)
  geom = ("q", (1, 4, 4, 64), (3, 3, 64, 64), (1, 4, 4, 64), (1, 1), (1, 1), ((1, 1), (1, 1)), 1)
  assert native.onednn_kernel_reorder(*geom)  # oneDNN's blocked kernel layouts, every ISA here
  f = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN,  # noqa: E731
                                             epilogue=ep)
  text = jax.jit(f).lower(x, k).as_text()
  assert "JsegConvScaleBias" in text and "JsegConvFwd" not in text
  assert "multiply" not in text  # no pass over the kernel or the output
  ref = ep.apply(lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN))
  np.testing.assert_allclose(jax.jit(f)(x, k), ref, rtol=1e-5, atol=1e-4)
  pads = ((1, 1), (1, 1))
  xla_scaled = jax.jit(lambda x, k: conv._onednn_conv_epilogue(  # noqa: E731
      x, k * ep.scale, None, ep.shift, None, (1, 1), (1, 1), pads, 1, True))
  np.testing.assert_array_equal(jax.jit(f)(x, k), xla_scaled(x, k))


def test_epilogue_not_folded_where_a_kernel_read_as_it_is_outweighs_the_output(monkeypatch):
  """Where oneDNN would read the HWIO kernel as it is, a scaled copy of a kernel larger than
  the output would cost more than the separate pass over the output it saves."""
  monkeypatch.setattr(native, "onednn_kernel_reorder", lambda *args: False)
  x, k = jnp.asarray(_rand((1, 4, 4, 64), 0)), jnp.asarray(_rand((3, 3, 64, 64), 1))
  ep = _epilogue((1, 4, 4, 64), 2, True, False)
  f = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN,  # noqa: E731
                                             epilogue=ep)
  text = jax.jit(f).lower(x, k).as_text()
  assert "JsegConvFwd" in text and "JsegConvScaleBias" not in text
  ref = ep.apply(lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN))
  np.testing.assert_allclose(jax.jit(f)(x, k), ref, rtol=1e-5, atol=1e-4)
  # An output at least as large as the kernel is folded all the same (a scaled copy).
  x = jnp.asarray(_rand((1, 24, 24, 64), 0))
  ep = _epilogue((1, 24, 24, 64), 2, True, False)
  assert "JsegConvScaleBias" in jax.jit(f).lower(x, k).as_text()
  ref = ep.apply(lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN))
  np.testing.assert_allclose(jax.jit(f)(x, k), ref, rtol=1e-5, atol=1e-4)


def test_epilogue_residual_still_read_afterwards_is_not_overwritten():
  """The output is the residual's buffer when XLA can give it (aliasing); a residual that
  is read again afterwards keeps its values (XLA copies it first)."""
  x, k = jnp.asarray(_rand((2, 16, 16, 8), 0)), jnp.asarray(_rand((3, 3, 8, 8), 1))
  ep = _epilogue((2, 16, 16, 8), 2, True, True)

  def f(x, k, res):
    y = conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN,
                                  epilogue=ep._replace(residual=res))
    return y, res * 2.0

  y, twice = jax.jit(f)(x, k, ep.residual)
  ref = ep.apply(lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(twice, ep.residual * 2.0)


def test_epilogue_on_the_xla_path_is_the_separate_pass(monkeypatch):
  monkeypatch.setenv("JSEG_CONV", "xla")
  x, k = jnp.asarray(_rand((2, 9, 11, 8), 0)), jnp.asarray(_rand((3, 3, 8, 16), 1))
  ep = _epilogue((2, 9, 11, 16), 2, True, True)
  f = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN,  # noqa: E731
                                             epilogue=ep)
  assert "JsegConv" not in jax.jit(f).lower(x, k).as_text()
  # Both sides jitted: the same program, so the same fusions and bits (an eager reference
  # rounds differently wherever XLA's compiled fusion contracts a multiply-add).
  ref = lambda x, k: ep.apply(lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                       dimension_numbers=DN))
  np.testing.assert_array_equal(jax.jit(f)(x, k), jax.jit(ref)(x, k))


@pytest.mark.parametrize("kind", ["p", "q", "r", "s", "P", "Q", "R", "S"])
def test_epilogue_kinds_use_optimised_implementations(kind):
  geom = ((1, 32, 32, 16), (3, 3, 16, 16), (1, 32, 32, 16), (1, 1), (1, 1), ((1, 1), (1, 1)), 1)
  for split, chunks in ((0, 1), (2, 2)):
    assert not native.onednn_impl(kind, *geom, split, chunks).startswith("ref")
    assert native.onednn_workspace(kind, *geom, split, chunks) > 0


def test_epilogue_bad_shapes_are_clear_errors():
  x, k = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 8))
  bad = conv.Epilogue(jnp.ones(8), jnp.ones(5))
  with pytest.raises(ValueError, match="shift shape"):
    conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN, epilogue=bad)
  bad = conv.Epilogue(jnp.ones(8), jnp.ones(8), residual=jnp.ones((1, 8, 8, 4)))
  with pytest.raises(ValueError, match="residual shape"):
    conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DN, epilogue=bad)
  with pytest.raises(ValueError, match="residual shape"):  # a broadcastable one too
    conv.Epilogue(jnp.ones(8), jnp.ones(8), residual=jnp.ones((1, 8, 8, 8))).apply(
        jnp.zeros((2, 8, 8, 8)))
  fn = conv.as_function(conv.Conv(8, (3, 3), use_bias=True, parent=None))
  with pytest.raises(ValueError, match="epilogue"):
    fn(x, k, jnp.ones(8), epilogue=conv.Epilogue(jnp.ones(8), jnp.ones(8)))
  assert conv.folds_epilogue(conv.as_function(conv.Conv(8, (3, 3), parent=None)))
  assert not conv.folds_epilogue(conv.as_function(conv.Conv(8, (3, 3), dtype=jnp.bfloat16,
                                                            parent=None)))
  assert not conv.folds_epilogue(conv.as_function(nn.Conv(8, (3, 3), parent=None)))


class _ConvReLU(nn.Module):
  """``conv.conv_relu`` in a module, against the flax Conv + ReLU it replaces."""
  features: int
  bias: bool
  fused: bool

  @nn.compact
  def __call__(self, x):
    c = functools.partial(conv.Conv, self.features, (3, 3), padding=((1, 1), (1, 1)),
                          use_bias=self.bias, bias_init=nn.initializers.normal(1.0), name="c")
    return conv.conv_relu(c(parent=None), x) if self.fused else nn.relu(c()(x))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["auto", "xla"])
def test_conv_relu_equals_conv_then_relu(bias, mode, monkeypatch):
  """Same parameters (paths, initial values), values and every gradient as Conv + nn.relu,
  on oneDNN (bias and ReLU inside the call) and on XLA (the two ops); the pre-activation
  never reaches XLA on oneDNN."""
  monkeypatch.setenv("JSEG_CONV", mode)
  x = jnp.asarray(_rand((2, 9, 11, 8), 0))
  x = x.at[:, :3].set(0.0)  # rows whose pre-activation is exactly the bias (0 without one)
  ours, ref = _ConvReLU(16, bias, True), _ConvReLU(16, bias, False)
  v = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
  for u, w in zip(jax.tree.leaves(v), jax.tree.leaves(ref.init(jax.random.key(0), x))):
    np.testing.assert_array_equal(u, w)
  r = jnp.asarray(_rand((2, 9, 11, 16), 3))

  def run(m):
    return jax.jit(lambda v, x: jax.value_and_grad(
        lambda v, x: jnp.sum(m.apply(v, x) * r), argnums=(0, 1))(v, x))(v, x)

  (a, (gv, gx)), (b, (gv_ref, gx_ref)) = run(ours), run(ref)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)
  for u, w in zip(jax.tree.leaves(gv), jax.tree.leaves(gv_ref)):
    np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-4)
  text = jax.jit(lambda v, x: ours.apply(v, x)).lower(v, x).as_text()
  assert ("JsegConvBias" in text) == (mode == "auto")


def test_conv_relu_keeps_no_pre_activation_for_the_backward():
  """A stack of conv_relu layers needs fewer temporaries in its gradient than Conv + ReLU
  (XLA kept each pre-activation beside the ReLU's output)."""
  x = jnp.asarray(_rand((2, 32, 32, 16), 0))

  class Stack(nn.Module):
    fused: bool

    @nn.compact
    def __call__(self, x):
      for i in range(4):
        c = conv.Conv(16, (3, 3), padding=((1, 1), (1, 1)), name=f"c{i}", parent=None)
        x = conv.conv_relu(c, x) if self.fused else nn.relu(
            conv.Conv(16, (3, 3), padding=((1, 1), (1, 1)), name=f"c{i}")(x))
      return x

  def temps(m):
    v = m.init(jax.random.key(0), x)
    f = jax.jit(jax.grad(lambda v: jnp.sum(jnp.tanh(m.apply(v, x)))))
    return f.lower(v).compile().memory_analysis().temp_size_in_bytes

  ours, before = temps(Stack(True)), temps(Stack(False))
  assert ours < 0.85 * before, (ours, before)


@pytest.mark.parametrize("ci,co,dilation", [(128, 64, 2), (64, 64, 2), (128, 32, 2), (128, 64, 1)])
def test_kernel_gradient_is_xlas_only_where_onednn_has_just_its_gemm(ci, co, dilation,
                                                                     monkeypatch):
  """Where oneDNN's kernel gradient is its GEMM fallback (AVX2: dilated convolutions) and
  the kernel has >= 128 input and >= 64 output channels, XLA's convolution computes it; the
  forward and input gradient stay oneDNN's. Which case is GEMM depends on the machine's ISA,
  so the expectation is read from oneDNN's implementation name."""
  monkeypatch.setenv("JSEG_CONV", "onednn")
  x, k = jnp.asarray(_rand((2, 10, 10, ci), 0)), jnp.asarray(_rand((3, 3, ci, co), 1) * 0.1)
  pad = ((dilation, dilation),) * 2

  def loss(conv_fn):
    return lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k, (1, 1), pad, rhs_dilation=(dilation,) * 2,
                                                dimension_numbers=DN)))

  grads = jax.jit(jax.grad(loss(conv.conv_general_dilated), argnums=(0, 1)))
  y_shape = (2, 10, 10, co)
  name = native.onednn_impl("w", x.shape, k.shape, y_shape, (1, 1), (dilation,) * 2, pad, 1,
                            *conv.conv_split("w", x.shape, y_shape, k.shape))
  on_xla = "gemm" in name and ci >= 128 and co >= 64
  assert conv.kernel_grad_on_xla(x.shape, k.shape, y_shape, (1, 1), (dilation,) * 2, pad,
                                 1) == on_xla
  text = grads.lower(x, k).as_text()
  assert "JsegConvFwd" in text and "JsegConvBwdData" in text
  assert ("JsegConvBwdWeights" in text) == (not on_xla)
  ref = jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, k)
  for a, b in zip(grads(x, k), ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
  monkeypatch.setenv("JSEG_CONV_GEMM_GRAD", "onednn")  # the switch keeps oneDNN's everywhere
  kernel_grad = jax.jit(jax.grad(loss(conv.conv_general_dilated), argnums=1))
  assert "JsegConvBwdWeights" in kernel_grad.lower(x, k).as_text()


@pytest.mark.parametrize("ks,groups", [((3, 3, 64, 96), 1), ((3, 3, 16, 64), 4)])
def test_scaled_kernel_reorder_cut_over_threads_scales_each_piece_by_its_channels(
    ks, groups, monkeypatch):
  """A split call cuts its kernel's reorder into pieces over output channels (groups when
  grouped); each piece must apply its own channels' scales."""
  monkeypatch.setenv("JSEG_CONV_THREADS", "xla")
  monkeypatch.setattr(conv, "_intra_op_threads", lambda: 2)
  xs, ys = (2, 8, 8, 64), (2, 8, 8, ks[3])
  pads = ((1, 1), (1, 1))
  geom = (xs, ks, ys, (1, 1), (1, 1), pads, groups)
  split, chunks = conv.conv_split("Q", xs, ys, ks)
  pieces = native.onednn_reorder_pieces("Q", *geom, split, chunks)
  if pieces < 2:
    pytest.skip(f"oneDNN's kernel layout here is not cut ({pieces} pieces)")
  x, k = jnp.asarray(_rand(xs, 0)), jnp.asarray(_rand(ks, 1))
  ep = _epilogue(ys, 2, True, False)
  scaled = jax.jit(lambda x, k: conv._onednn_conv_epilogue(
      x, k, ep.scale, ep.shift, None, (1, 1), (1, 1), pads, groups, True))
  xla_scaled = jax.jit(lambda x, k: conv._onednn_conv_epilogue(
      x, k * ep.scale, None, ep.shift, None, (1, 1), (1, 1), pads, groups, True))
  np.testing.assert_array_equal(scaled(x, k), xla_scaled(x, k))
  ref = ep.apply(lax.conv_general_dilated(x, k, (1, 1), pads, None, (1, 1), DN, groups))
  np.testing.assert_allclose(scaled(x, k), ref, rtol=1e-5, atol=1e-4)


PARTS_EPILOGUES = {
    "none": None,
    "bias": "bias",
    "bn_fold": lambda c, r: conv.Epilogue(jnp.asarray(1.0 + _rand((c,), 11) ** 2),
                                          jnp.asarray(_rand((c,), 12)), relu=True),
    "residual": lambda c, r: conv.Epilogue(None, jnp.asarray(_rand((c,), 13)), relu=True,
                                           residual=r),
}


@pytest.mark.parametrize("widths", [(8, 16, 8), (4, 12), (12,)])
@pytest.mark.parametrize("epi", list(PARTS_EPILOGUES))
def test_conv_of_parts_equals_conv_of_their_concatenation(widths, epi):
  """``parts_function`` (one oneDNN call per part, chained through the residual post-op)
  against the concatenation then one call: values and every gradient, with a bias, with a
  folded BatchNorm's scale/shift/ReLU, and with a residual; one call per part in the
  program."""
  xs = [jnp.asarray(_rand((2, 9, 11, c), i)) for i, c in enumerate(widths)]
  k = jnp.asarray(0.3 * _rand((3, 3, sum(widths), 16), 5))
  spec = PARTS_EPILOGUES[epi]
  c = conv.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=spec == "bias", parent=None)
  parts, whole = conv.parts_function(c), conv.as_function(c)
  r = jnp.asarray(_rand((2, 9, 11, 16), 6))
  b = jnp.asarray(_rand((16,), 7))

  def call(fn, xs, k, b, r):
    x = xs if fn is parts else jnp.concatenate(xs, -1)
    if spec is None:
      return fn(x, k)
    if spec == "bias":
      return fn(x, k, b)
    e = spec(16, r)
    return fn(x, k, epilogue=e._replace(residual=None if e.residual is None else r))

  g = jnp.asarray(_rand((2, 9, 11, 16), 8))

  def run(fn):
    return jax.jit(lambda xs, k, b, r: jax.vjp(lambda *a: call(fn, *a), xs, k, b, r)[1](g)
                   + (call(fn, xs, k, b, r),))(xs, k, b, r)

  got, want = run(parts), run(whole)
  np.testing.assert_allclose(got[-1], want[-1], rtol=1e-5, atol=1e-5)
  for u, w in zip(jax.tree.leaves(got[:-1]), jax.tree.leaves(want[:-1])):
    np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-4)
  text = jax.jit(lambda xs, k, b, r: call(parts, xs, k, b, r)).lower(xs, k, b, r).as_text()
  assert text.count("@JsegConv") == len(widths) and "concatenate" not in text


def test_conv_of_parts_on_xla_concatenates_and_bad_parts_are_clear_errors(monkeypatch):
  c = conv.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, parent=None)
  xs = [jnp.asarray(_rand((1, 5, 5, 2), 0)), jnp.asarray(_rand((1, 5, 5, 3), 1))]
  k = jnp.asarray(_rand((3, 3, 5, 4), 2))
  fn = conv.parts_function(c)
  monkeypatch.setenv("JSEG_CONV", "xla")
  text = jax.jit(fn).lower(xs, k).as_text()
  assert "concatenate" in text and "JsegConv" not in text
  np.testing.assert_allclose(fn(xs, k), conv.as_function(c)(jnp.concatenate(xs, -1), k),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="do not add up"):
    fn(xs, k[:, :, :4])
  with pytest.raises(ValueError, match="differ outside the channels"):
    fn([xs[0], xs[1][:, :4]], k)
  with pytest.raises(ValueError, match="use_bias=False"):
    fn(xs, k, jnp.zeros((4,)))
