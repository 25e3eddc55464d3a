"""jseg.models.norm.BatchNorm against flax.linen.BatchNorm: same variables, values, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jseg.models.norm import BatchNorm

KW = dict(momentum=0.9, epsilon=1e-5)


def _x(shape=(2, 5, 6, 8), seed=0, offset=0.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 2 + offset, jnp.float32)


def _variables(shape, seed=1):
  """Non-trivial parameters and running statistics, shared by both modules."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  return {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
                     "bias": jnp.asarray(rng.standard_normal(c), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.standard_normal(c), jnp.float32),
                          "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)}}


def test_same_variables_as_flax():
  x = _x()
  ours = jax.eval_shape(BatchNorm(use_running_average=False).init, jax.random.key(0), x)
  ref = jax.eval_shape(nn.BatchNorm(use_running_average=False).init, jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(
      lambda a: (a.shape, a.dtype), ref)
  init = BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  np.testing.assert_array_equal(init["params"]["scale"], np.ones(8))
  np.testing.assert_array_equal(init["batch_stats"]["var"], np.ones(8))


@pytest.mark.parametrize("offset", [0.0, 30.0])  # a large mean: the affine form's cancellation
def test_training_values_gradients_and_running_stats_equal_flax(offset):
  x = _x(offset=offset)
  v = _variables(x.shape)
  ours, ref = BatchNorm(use_running_average=False, **KW), nn.BatchNorm(use_running_average=False, **KW)
  y, upd = ours.apply(v, x, mutable=["batch_stats"])
  y_ref, upd_ref = ref.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-5 * (1 + offset))
  # flax's float32 E[x^2] - E[x]^2 loses ~offset^2 * 1e-7 to cancellation (the native
  # kernels sum in double: test_native_variance_is_accurate_at_a_large_mean).
  for k in ("mean", "var"):
    np.testing.assert_allclose(upd["batch_stats"][k], upd_ref["batch_stats"][k], rtol=1e-5,
                               atol=1e-5 + 1e-7 * offset**2)
  w = _x(x.shape, seed=3)

  def loss(m, params, x):
    out, _ = m.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(out) * w)

  g = jax.grad(loss, argnums=(1, 2))(ours, v["params"], x)
  g_ref = jax.grad(loss, argnums=(1, 2))(ref, v["params"], x)
  for a, e in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * (1 + offset))


def test_eval_uses_running_stats_and_matches_flax():
  x = _x()
  v = _variables(x.shape)
  y = BatchNorm(**KW).apply(v, x, use_running_average=True)
  y_ref = nn.BatchNorm(**KW).apply(v, x, use_running_average=True)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  s, b = v["params"]["scale"], v["params"]["bias"]
  m, var = v["batch_stats"]["mean"], v["batch_stats"]["var"]
  np.testing.assert_allclose(y, (x - m) / jnp.sqrt(var + 1e-5) * s + b, rtol=1e-5, atol=1e-5)


def test_bfloat16_output_with_float32_statistics():
  x = _x().astype(jnp.bfloat16)
  m = BatchNorm(use_running_average=False, dtype=jnp.bfloat16, **KW)
  v = m.init(jax.random.key(0), x)
  y, upd = m.apply(v, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16 and upd["batch_stats"]["mean"].dtype == jnp.float32
  y_ref, _ = nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16, **KW).apply(
      v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=0.05)


def test_running_average_must_be_given():
  with pytest.raises(ValueError):
    BatchNorm().init(jax.random.key(0), _x())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("constant_channel", [False, True])
def test_training_vjp_equals_autodiff_of_its_forward(dtype, constant_channel):
  """The written-out backward of the training forward (all three outputs: y, mean, var)
  against JAX's autodiff of the same forward, incl. a constant channel (variance exactly
  0: jnp.maximum's tie, where autodiff takes half)."""
  from jseg.models import norm

  x = np.random.default_rng(0).standard_normal((2, 4, 4, 6)).astype(np.float32) * 2 + 1
  if constant_channel:
    x[..., 2] = 2.0  # sums 64 and 128 over 32 pixels are exact: var_raw == 0
  x = jnp.asarray(x, dtype)
  rng = np.random.default_rng(1)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(6), jnp.float32)
  cts = (jnp.asarray(rng.standard_normal(x.shape), dtype),
         jnp.asarray(rng.standard_normal(6), jnp.float32),
         jnp.asarray(rng.standard_normal(6), jnp.float32))
  if constant_channel:
    assert float(norm._moments(x)[1][2]) == 0.0
  fwd = lambda x, s, b: norm._batch_norm_train_fwd(x, s, b, 1e-5, dtype)[0]
  custom = lambda x, s, b: norm._batch_norm_train(x, s, b, 1e-5, dtype)
  out, vjp = jax.vjp(custom, x, scale, bias)
  out_ref, vjp_ref = jax.vjp(fwd, x, scale, bias)
  for a, e in zip(out, out_ref):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(e, np.float32))
  # bfloat16: autodiff adds the input's three cotangent terms in bfloat16, ours in float32
  # then rounds once, so they differ by a few bfloat16 steps of the largest value.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, e in zip(vjp(cts), vjp_ref(cts)):
    assert a.dtype == e.dtype
    e = np.asarray(e, np.float32)
    np.testing.assert_allclose(np.asarray(a, np.float32), e, rtol=tol,
                               atol=tol * max(1.0, float(np.abs(e).max())))


@pytest.mark.parametrize("use_scale,use_bias", [(False, True), (True, False), (False, False)])
def test_without_scale_or_bias_matches_flax(use_scale, use_bias):
  x = _x()
  kw = dict(KW, use_running_average=False, use_scale=use_scale, use_bias=use_bias)
  v = nn.BatchNorm(**kw).init(jax.random.key(0), x)
  assert jax.tree.structure(BatchNorm(**kw).init(jax.random.key(0), x)) == jax.tree.structure(v)
  w = _x(x.shape, seed=3)

  def loss(m, x):
    out, upd = m.apply(v, x, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(out) * w), upd

  (l, upd), g = jax.value_and_grad(loss, argnums=1, has_aux=True)(BatchNorm(**kw), x)
  (l_ref, upd_ref), g_ref = jax.value_and_grad(loss, argnums=1, has_aux=True)(nn.BatchNorm(**kw), x)
  np.testing.assert_allclose(l, l_ref, rtol=1e-5)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), upd, upd_ref)


# --- The native CPU kernels (JSEG_BN): the same values and gradients as the XLA form. ---

def _needs_native():
  from jseg.models import norm
  try:
    ok = norm.bn_native_active()
  except RuntimeError:
    ok = False
  if not ok:
    pytest.skip("jseg.native's kernels are not active here")


def _bn_vjp(monkeypatch, mode, x, relu, cts, v, residual=None):
  """(outputs, cotangents of x/scale/bias[/residual]) of one training BatchNorm under
  JSEG_BN=mode."""
  monkeypatch.setenv("JSEG_BN", mode)
  m = BatchNorm(use_running_average=False, relu=relu, **KW)

  def f(x, params, residual):
    y, upd = m.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                     residual=residual, mutable=["batch_stats"])
    return y, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

  out, vjp = jax.vjp(jax.jit(f), x, v["params"], residual)
  return out, jax.tree.leaves(vjp(cts))


@pytest.mark.parametrize("shape", [(2, 5, 6, 8), (3, 7, 5, 13), (37, 5), (4, 1, 1, 70), (2, 33, 65, 64)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_native_kernels_equal_the_xla_form(monkeypatch, shape, relu, residual):
  """All three outputs (y, new running mean and var) and the cotangents of x, scale and
  bias (and of the residual added before the ReLU), with cotangents on every output (the
  statistics' included), at odd channel counts, 2-D inputs and a shape large enough to run
  on both threads."""
  _needs_native()
  x = _x(shape, offset=0.5)
  v = _variables(shape)
  rng = np.random.default_rng(2)
  c = shape[-1]
  cts = (jnp.asarray(rng.standard_normal(shape), jnp.float32),
         jnp.asarray(rng.standard_normal(c), jnp.float32),
         jnp.asarray(rng.standard_normal(c), jnp.float32))
  r = _x(shape, seed=5) if residual else None
  out, grads = _bn_vjp(monkeypatch, "native", x, relu, cts, v, r)
  out_ref, grads_ref = _bn_vjp(monkeypatch, "xla", x, relu, cts, v, r)
  assert len(grads) == len(grads_ref) == 3 + residual
  for a, e in zip([*out, *grads], [*out_ref, *grads_ref]):
    e = np.asarray(e)
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(e).max())))
  if relu:
    assert float(jnp.min(out[0])) == 0.0 and float(jnp.mean(out[0] == 0)) > 0.2


def test_native_kernels_at_a_constant_channel(monkeypatch):
  """Variance exactly 0 (jnp.maximum's tie: half the variance's cotangent reaches var_raw)
  and a channel whose ReLU output is all zero."""
  _needs_native()
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 6)).astype(np.float32) * 2 + 1
  x[..., 2] = 2.0
  x = jnp.asarray(x)
  v = _variables(x.shape)
  v["params"]["bias"] = v["params"]["bias"].at[4].set(-100.0)  # channel 4: ReLU output all 0
  rng = np.random.default_rng(3)
  cts = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
         jnp.asarray(rng.standard_normal(6), jnp.float32),
         jnp.asarray(rng.standard_normal(6), jnp.float32))
  out, grads = _bn_vjp(monkeypatch, "native", x, True, cts, v)
  out_ref, grads_ref = _bn_vjp(monkeypatch, "xla", x, True, cts, v)
  np.testing.assert_array_equal(out[0][..., 4], 0.0)
  for a, e in zip([*out, *grads], [*out_ref, *grads_ref]):
    e = np.asarray(e)
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(e).max())))


@pytest.mark.parametrize("mode", ["native", "xla"])
def test_relu_option_equals_relu_after_batchnorm(monkeypatch, mode):
  """``BatchNorm(relu=True)`` is ``nn.relu(BatchNorm())``: values, gradients, statistics, and
  in evaluation."""
  if mode == "native":
    _needs_native()
  monkeypatch.setenv("JSEG_BN", mode)
  x, v = _x(offset=0.3), _variables((2, 5, 6, 8))
  w = _x(x.shape, seed=4)

  def loss(relu_inside, params, x):
    m = BatchNorm(use_running_average=False, relu=relu_inside, **KW)
    y, upd = m.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
    y = y if relu_inside else nn.relu(y)
    return jnp.sum(y * w), (y, upd)

  (l1, (y1, u1)), g1 = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(True, v["params"], x)
  (l2, (y2, u2)), g2 = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(False, v["params"], x)
  assert float(jnp.mean(y1 == 0)) > 0.2  # the ReLU is active on part of the output
  for a, e in zip(jax.tree.leaves((l1, y1, u1, g1)), jax.tree.leaves((l2, y2, u2, g2))):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(e).max())))
  y_eval = BatchNorm(relu=True, **KW).apply(v, x, use_running_average=True)
  np.testing.assert_array_equal(y_eval, nn.relu(BatchNorm(**KW).apply(v, x, use_running_average=True)))


def test_native_kernels_replace_the_fusions(monkeypatch):
  """The native form compiles a BatchNorm layer's forward and backward into custom calls:
  far fewer XLA kernels (each costs compiler memory) for a stack of three layers."""
  _needs_native()

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(3):
        x = BatchNorm(use_running_average=False, relu=True, **KW)(nn.Dense(8)(x))
      return x

  x = _x((2, 6, 6, 8))
  v = Stack().init(jax.random.key(0), x)

  def fusions(mode):
    monkeypatch.setenv("JSEG_BN", mode)
    f = lambda p: jnp.sum(Stack().apply({**v, "params": p}, x, mutable=["batch_stats"])[0] ** 2)
    text = jax.jit(jax.grad(f)).lower(v["params"]).compile().as_text()
    return text.count(" fusion("), text.count("JsegBnFwd"), text.count("JsegBnBwd")

  xla, native = fusions("xla"), fusions("native")
  assert xla[1:] == (0, 0) and native[1] >= 3 and native[2] >= 3
  assert native[0] < xla[0] - 10, (native, xla)


def test_bn_mode_is_checked(monkeypatch):
  from jseg import native
  from jseg.models import norm
  monkeypatch.setenv("JSEG_BN", "cudnn")
  with pytest.raises(ValueError, match="JSEG_BN must be one of"):
    norm.bn_native_active()
  monkeypatch.setenv("JSEG_BN", "xla")
  assert norm.bn_native_active() is False
  assert norm.bn_backend_summary() == "XLA (JSEG_BN=xla)"
  monkeypatch.setenv("JSEG_BN", "native")
  monkeypatch.setattr(native, "onednn", lambda: None)
  monkeypatch.setattr(native, "onednn_error", lambda: "NativeBuildError: no compiler")
  with pytest.raises(RuntimeError, match="JSEG_BN=native, but the extension is unavailable"):
    norm.bn_native_active()
  monkeypatch.setenv("JSEG_BN", "auto")
  assert norm.bn_native_active() is False  # auto falls back to XLA's form


def test_residual_is_added_before_the_relu_and_checked():
  x, v = _x(), _variables((2, 5, 6, 8))
  r = _x(seed=6)
  m = BatchNorm(relu=True, **KW)
  y = m.apply(v, x, use_running_average=True, residual=r)
  np.testing.assert_array_equal(y, nn.relu(BatchNorm(**KW).apply(v, x, use_running_average=True) + r))
  with pytest.raises(ValueError, match="residual shape"):
    m.apply(v, x, use_running_average=False, residual=r[:1], mutable=["batch_stats"])


_BITS_SCRIPT = """
import os, sys
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:int(sys.argv[1])])  # XLA's pool size
import hashlib, jax, jax.numpy as jnp, numpy as np
from jseg.models.norm import BatchNorm, bn_native_active
assert bn_native_active()
x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 40, 40, 48)) + 1, jnp.float32)
m = BatchNorm(use_running_average=False, relu=True)
v = m.init(jax.random.key(0), x)
f = lambda p, x: jnp.sum(m.apply({**v, "params": p}, x, mutable=["batch_stats"])[0] ** 2)
out = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(v["params"], x)
print(hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in jax.tree.leaves(out))).hexdigest())
"""


def test_native_kernels_give_the_same_bits_on_any_thread_count():
  """Sums are added in fixed chunks of rows, in order: the process on 1 or 2 cores (XLA's
  intra-op pool, which the kernels run on, has that many threads), same bits."""
  import os
  import subprocess
  import sys
  _needs_native()
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs 2 cores")
  digests = []
  for threads in ("1", "2"):
    env = dict(os.environ, JSEG_BN="native")
    proc = subprocess.run([sys.executable, "-c", _BITS_SCRIPT, threads], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    digests.append(proc.stdout.strip().splitlines()[-1])
  assert digests[0] == digests[1] and len(digests[0]) == 64


def test_native_variance_is_accurate_at_a_large_mean(monkeypatch):
  """Summed in double, the batch variance at mean 30 (E[x^2] ~ 200x the variance) is within
  1e-5 of float64's, relatively (the squares' own float32 rounding: ~3e-6); XLA's float32
  sums are ~1e-4 off there (3.6e-4 absolute on 2.6-5.5 for this input)."""
  _needs_native()
  monkeypatch.setenv("JSEG_BN", "native")
  x = _x((2, 5, 6, 8), offset=30.0)
  m = BatchNorm(use_running_average=False, momentum=0.0, epsilon=1e-5)
  _, upd = m.apply(m.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  ref = np.asarray(x, np.float64).reshape(-1, 8).var(0)
  np.testing.assert_allclose(upd["batch_stats"]["var"], ref, rtol=1e-5, atol=0)


# --- `then`: a function of the output (the next convolution), output recomputed in the
# backward on the native kernels. ---

def _conv3x3(y, k):
  from jseg.models.conv import conv_general_dilated
  return conv_general_dilated(y, k, (1, 1), ((1, 1), (1, 1)),
                              dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _then_vjp(monkeypatch, mode, x, relu, k, cts, v, use_then):
  monkeypatch.setenv("JSEG_BN", mode)
  m = BatchNorm(use_running_average=False, relu=relu, **KW)

  def f(x, params, k):
    if use_then:
      out, upd = m.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                         then=(_conv3x3, (k,)), mutable=["batch_stats"])
    else:
      y, upd = m.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                       mutable=["batch_stats"])
      out = _conv3x3(y, k)
    return out, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

  out, vjp = jax.vjp(jax.jit(f), x, v["params"], k)
  return [*out, *jax.tree.leaves(vjp(cts))]


@pytest.mark.parametrize("mode", ["native", "xla"])
@pytest.mark.parametrize("relu", [False, True])
def test_then_equals_the_function_of_the_output(monkeypatch, mode, relu):
  """Outputs, running statistics and the cotangents of x, scale, bias and the function's
  arguments equal applying the function to the output; bit for bit on the native kernels
  (the recomputed output is the forward's)."""
  if mode == "native":
    _needs_native()
  shape = (2, 9, 7, 12)
  x = _x(shape, offset=0.5)
  v = _variables(shape)
  rng = np.random.default_rng(4)
  k = jnp.asarray(rng.standard_normal((3, 3, 12, 5)) * 0.3, jnp.float32)
  out_shape = shape[:3] + (5,)
  cts = (jnp.asarray(rng.standard_normal(out_shape), jnp.float32),
         jnp.asarray(rng.standard_normal(12), jnp.float32),
         jnp.asarray(rng.standard_normal(12), jnp.float32))
  got = _then_vjp(monkeypatch, mode, x, relu, k, cts, v, True)
  ref = _then_vjp(monkeypatch, mode, x, relu, k, cts, v, False)
  assert len(got) == len(ref) == 7
  for a, e in zip(got, ref):
    if mode == "native":
      np.testing.assert_array_equal(a, e)
    else:
      np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
  # Evaluation: the function of the running-statistics output.
  y_eval = BatchNorm(use_running_average=True, relu=relu, **KW).apply(v, x, then=(_conv3x3, (k,)))
  y_ref = _conv3x3(BatchNorm(use_running_average=True, relu=relu, **KW).apply(v, x), k)
  np.testing.assert_array_equal(y_eval, y_ref)


def test_then_recomputes_the_output_in_the_backward(monkeypatch):
  """On the native kernels the output is recomputed after the backward reaches it
  (``JsegBnApply``), so the forward's output is not kept: XLA's temporaries for a stack of
  BatchNorm + convolution layers shrink by about one activation per layer."""
  _needs_native()
  monkeypatch.setenv("JSEG_BN", "native")
  shape = (2, 32, 32, 16)
  rng = np.random.default_rng(0)
  ks = [jnp.asarray(rng.standard_normal((3, 3, 16, 16)) * 0.1, jnp.float32) for _ in range(4)]
  x = _x(shape)
  temps = {}
  for use_then in (False, True):
    bns = [BatchNorm(use_running_average=False, relu=True, **KW) for _ in ks]
    vs = [bn.init(jax.random.key(0), x) for bn in bns]

    def loss(ks, x):
      for bn, v, k in zip(bns, vs, ks):
        if use_then:
          x, _ = bn.apply(v, x, then=(_conv3x3, (k,)), mutable=["batch_stats"])
        else:
          y, _ = bn.apply(v, x, mutable=["batch_stats"])
          x = _conv3x3(y, k)
      return jnp.sum(x * x)

    c = jax.jit(jax.grad(loss)).lower(ks, x).compile()
    temps[use_then] = c.memory_analysis().temp_size_in_bytes
    assert ("JsegBnApply" in c.as_text()) == use_then
  act = 2 * 32 * 32 * 16 * 4
  assert temps[True] <= temps[False] - 2.5 * act, (temps, act)
  with pytest.raises(ValueError, match="then"):
    BatchNorm(use_running_average=False).apply(vs[0], x, residual=x, then=(_conv3x3, (ks[0],)))


def _conv_pair(features, in_features, use_bias=False, name="conv"):
  """A module creating a conv's parameters (``then_conv``) and returning the pair."""
  from jseg.models.conv import Conv, then_conv
  return lambda: then_conv(Conv(features, (3, 3), padding="SAME", use_bias=use_bias,
                                bias_init=nn.initializers.normal(0.5), parent=None,
                                name=name), in_features)


class _ConvBN(nn.Module):
  """conv -> BatchNorm, either as ``BatchNorm(conv=...)`` or applied one after the other."""
  relu: bool
  use_bias: bool
  folded_form: bool

  @nn.compact
  def __call__(self, x, train, residual=None):
    fn, p = _conv_pair(6, x.shape[-1], self.use_bias)()
    bn = BatchNorm(use_running_average=not train, relu=self.relu, name="bn", **KW)
    if self.folded_form:
      return bn(x, conv=(fn, p), residual=residual)
    return bn(fn(x, *p), residual=residual)


def _trained_variables(m, x):
  v = m.init(jax.random.key(0), x, False)
  rng = np.random.default_rng(5)
  stats = {"mean": jnp.asarray(rng.standard_normal(6), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)}
  params = dict(v["params"], bn={"scale": jnp.asarray(rng.uniform(-1.5, 1.5, 6), jnp.float32),
                                 "bias": jnp.asarray(rng.standard_normal(6), jnp.float32)})
  return {"params": params, "batch_stats": {"bn": stats}}


@pytest.mark.parametrize("relu,residual,use_bias", [(True, False, False), (False, True, False),
                                                    (True, True, True)])
def test_conv_folds_into_the_convolution_at_evaluation(relu, residual, use_bias):
  """``BatchNorm(conv=(fn, params))``: at evaluation the layer is the convolution's
  epilogue (one oneDNN call, a conv bias folded into the shift), equal to the convolution
  followed by the layer; in training the same computation as applying them in turn (bits),
  running statistics included. Same variables either way."""
  from jseg import native
  x = _x((2, 9, 7, 5), offset=0.3)
  res = _x((2, 9, 7, 6), seed=3) if residual else None
  folded, separate = (_ConvBN(relu, use_bias, f) for f in (True, False))
  v = _trained_variables(folded, x)
  assert jax.tree.structure(v) == jax.tree.structure(_trained_variables(separate, x))
  y = jax.jit(lambda v, x, r: folded.apply(v, x, False, r))(v, x, res)
  np.testing.assert_allclose(y, separate.apply(v, x, False, res), rtol=1e-5, atol=1e-5)
  text = jax.jit(lambda v, x, r: folded.apply(v, x, False, r)).lower(v, x, res).as_text()
  if native.onednn() is not None:
    assert ("JsegConvScaleBiasAdd" if residual else "JsegConvScaleBias") in text
  train = lambda m: jax.jit(lambda v, x, r: m.apply(v, x, True, r, mutable=["batch_stats"]))  # noqa: E731
  for a, b in zip(jax.tree.leaves(train(folded)(v, x, res)), jax.tree.leaves(train(separate)(v, x, res))):
    np.testing.assert_array_equal(a, b)


def test_conv_is_not_folded_off_onednn(monkeypatch):
  monkeypatch.setenv("JSEG_CONV", "xla")
  x = _x((2, 9, 7, 5))
  folded, separate = _ConvBN(True, False, True), _ConvBN(True, False, False)
  v = _trained_variables(folded, x)
  text = jax.jit(lambda v, x: folded.apply(v, x, False)).lower(v, x).as_text()
  assert "JsegConv" not in text
  np.testing.assert_array_equal(jax.jit(lambda v, x: folded.apply(v, x, False))(v, x),
                                jax.jit(lambda v, x: separate.apply(v, x, False))(v, x))


class _ConvBNAddBefore(nn.Module):
  folded_form: bool

  @nn.compact
  def __call__(self, x, train, add=None, residual=None):
    fn, p = _conv_pair(6, x.shape[-1], False)()
    bn = BatchNorm(use_running_average=not train, relu=True, name="bn", **KW)
    if self.folded_form:
      return bn(x, conv=(fn, p), add_before=add, residual=residual)
    return bn(fn(x, *p) + (0 if add is None else add), residual=residual)


@pytest.mark.parametrize("residual", [False, True])
def test_add_before_is_normalised_with_the_convolution_output(residual):
  """``add_before`` joins the convolution's output before the normalisation: at evaluation
  (folded: ``scale * add_before`` in the epilogue's residual) and in training, equal to
  adding it to the output first; a wrong shape is named."""
  x = _x((2, 9, 7, 5), offset=0.3)
  add = _x((2, 9, 7, 6), seed=4)
  res = _x((2, 9, 7, 6), seed=3) if residual else None
  folded, separate = _ConvBNAddBefore(True), _ConvBNAddBefore(False)
  v = _trained_variables(folded, x)
  for train in (False, True):
    f = lambda m: jax.jit(lambda v, x, a, r: m.apply(v, x, train, a, r, mutable=["batch_stats"]))  # noqa: E731
    (y, _), (y_ref, _) = f(folded)(v, x, add, res), f(separate)(v, x, add, res)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(y - f(folded)(v, x, add * 0, res)[0]).max()) > 0.1
  with pytest.raises(ValueError, match="add_before shape"):
    BatchNorm(**KW).apply(_variables((2, 9, 7, 6)), _x((2, 9, 7, 6)), use_running_average=True,
                          add_before=add[:1])


class _Chain(nn.Module):
  explicit: bool

  @nn.compact
  def __call__(self, x, train, res):
    from jseg.models.norm import conv_bn_chain
    convs = [_conv_pair(6, x.shape[-1], name="c1")(), _conv_pair(6, 6, name="c2")()]
    bns = [BatchNorm(use_running_average=not train, relu=True, name=f"bn{i}", **KW)
           for i in (1, 2)]
    if self.explicit:
      (f1, p1), (f2, p2) = convs
      return bns[1](f2(bns[0](f1(x, *p1)), *p2), residual=res)
    return conv_bn_chain(x, convs, bns, train, residual=lambda: res)


def test_conv_bn_chain_equals_the_layers_in_turn():
  """Training (each BatchNorm feeding the next conv through ``then``) gives the bits of
  the layers applied in turn; evaluation (each folded into its conv) their values."""
  from jseg.models.norm import conv_bn_chain
  x, res = _x((2, 8, 8, 4)), _x((2, 8, 8, 6), seed=2)
  chain, explicit = _Chain(False), _Chain(True)
  v = chain.init(jax.random.key(1), x, False, res)
  assert jax.tree.structure(v) == jax.tree.structure(explicit.init(jax.random.key(1), x, False, res))
  for a, b in zip(jax.tree.leaves(chain.apply(v, x, True, res, mutable=["batch_stats"])),
                  jax.tree.leaves(explicit.apply(v, x, True, res, mutable=["batch_stats"]))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(jax.jit(lambda v, x: chain.apply(v, x, False, res))(v, x),
                             explicit.apply(v, x, False, res), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="2 convolutions for 1 BatchNorms"):
    conv_bn_chain(x, [None, None], [None], True)
