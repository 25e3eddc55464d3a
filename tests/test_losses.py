"""Losses against NumPy references, optax, and hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jseg import losses
from jseg.config import base_config

K = 4
IGNORE = 255


def cfg(**loss_fields):
  c = base_config()
  for k, v in loss_fields.items():
    setattr(c.loss, k, v)
  return c


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 5, K)).astype(np.float32) * 2
  labels = rng.integers(0, K, size=(2, 6, 5)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.2] = IGNORE
  return logits, labels


def np_log_softmax(x):
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_ce(logits, labels, weights=None, eps=0.0, avg_non_ignore=True):
  """Reference: per-pixel loops in float64."""
  logp = np_log_softmax(logits).reshape(-1, logits.shape[-1])
  y = labels.reshape(-1)
  num = den = 0.0
  for i in range(y.size):
    if y[i] == IGNORE:
      continue
    w = 1.0 if weights is None else weights[y[i]]
    q = np.full(logp.shape[1], eps / logp.shape[1])
    q[y[i]] += 1 - eps
    num += w * -(q * logp[i]).sum()
    den += w
  return num / (den if avg_non_ignore else y.size)


def run(config, logits, labels, aux=None):
  fn = losses.build_loss(config)
  return jax.jit(fn)(jnp.asarray(logits), jnp.asarray(labels), aux or {})


def test_cross_entropy_ignore_and_weights(batch):
  logits, labels = batch
  loss, parts = run(cfg(), logits, labels)
  assert loss == pytest.approx(np_ce(logits, labels), rel=1e-5)
  assert set(parts) == {"main"} and parts["main"].dtype == jnp.float32
  w = (0.5, 2.0, 1.0, 3.0)
  loss, _ = run(cfg(class_weights=w), logits, labels)
  assert loss == pytest.approx(np_ce(logits, labels, np.array(w)), rel=1e-5)
  # MMSeg's avg_non_ignore=False: divide by every pixel.
  loss, _ = run(cfg(class_weights=w, avg_non_ignore=False), logits, labels)
  assert loss == pytest.approx(np_ce(logits, labels, np.array(w), avg_non_ignore=False), rel=1e-5)


def test_cross_entropy_gradient_is_softmax_minus_onehot(batch):
  """The one-hot, class-major form differentiates to the textbook gradient."""
  logits, labels = batch
  w = np.array((0.5, 2.0, 1.0, 3.0), np.float32)
  g = jax.grad(lambda z: losses.cross_entropy(z, labels, class_weights=w))(jnp.asarray(logits))
  p = np.exp(np_log_softmax(logits))
  valid = labels != IGNORE
  safe = np.where(valid, labels, 0)
  pix_w = np.where(valid, w[safe], 0.0)
  ref = (p - np.eye(K)[safe]) * (pix_w / pix_w.sum())[..., None]
  np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)


def test_cross_entropy_label_smoothing_matches_optax(batch):
  logits, labels = batch
  loss, _ = run(cfg(label_smoothing=0.1), logits, labels)
  assert loss == pytest.approx(np_ce(logits, labels, eps=0.1), rel=1e-5)
  keep = labels != IGNORE
  targets = optax.smooth_labels(jax.nn.one_hot(labels[keep], K), 0.1)
  ref = optax.softmax_cross_entropy(logits[keep], targets).mean()
  assert loss == pytest.approx(float(ref), rel=1e-5)


def test_bfloat16_logits_computed_in_float32(batch):
  logits, labels = batch
  loss32, _ = run(cfg(), logits.astype(jnp.bfloat16).astype(np.float32), labels)
  loss16, _ = run(cfg(), jnp.asarray(logits, jnp.bfloat16), labels)
  assert loss16.dtype == jnp.float32 and loss16 == pytest.approx(float(loss32), rel=1e-6)


def test_aux_heads_weighted(batch):
  logits, labels = batch
  aux = {"aux": logits[..., ::-1].copy()}
  loss, parts = run(cfg(), logits, labels, aux)
  main, a = np_ce(logits, labels), np_ce(aux["aux"], labels)
  assert parts["main"] == pytest.approx(main, rel=1e-5)
  assert parts["aux/aux"] == pytest.approx(a, rel=1e-5)
  assert loss == pytest.approx(main + 0.4 * a, rel=1e-5)
  c = cfg()
  c.loss.aux_weights = {"aux": 1.0, "other": 0.0}
  loss, _ = run(c, logits, labels, aux)
  assert loss == pytest.approx(main + a, rel=1e-5)


ALL_LOSSES = ["cross_entropy", "focal", "sigmoid_focal", "dice", "lovasz", "ohem", "combo"]


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_all_ignore_batch_zero_loss_finite_grads(name, batch):
  logits, _ = batch
  labels = np.full(logits.shape[:3], IGNORE, np.int32)
  fn = losses.build_loss(cfg(name=name, terms=(("cross_entropy", 1.0), ("dice", 1.0)),
                             class_weights=(1.0, 2.0, 1.0, 1.0)))
  vg = jax.jit(jax.value_and_grad(lambda x: fn(x, labels, {"aux": x}), has_aux=True))
  (loss, _), g = vg(jnp.asarray(logits))
  assert float(loss) == 0.0
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradients_finite_and_ignored_pixels_have_none(name, batch):
  logits, labels = batch
  fn = losses.build_loss(cfg(name=name, terms=(("cross_entropy", 1.0), ("lovasz", 0.5)),
                             ohem_min_kept=10))
  g = np.asarray(jax.jit(jax.grad(lambda x: fn(x, labels, {})[0]))(jnp.asarray(logits)))
  assert np.all(np.isfinite(g))
  assert np.all(g[labels == IGNORE] == 0)
  assert np.any(g[labels != IGNORE] != 0)


def test_sigmoid_focal_matches_optax(batch):
  logits, labels = batch
  keep = labels != IGNORE
  # Multi-class: one-vs-rest sigmoid focal summed over classes, mean over valid pixels.
  loss, _ = run(cfg(name="sigmoid_focal", focal_gamma=2.0, focal_alpha=0.25), logits, labels)
  focal = jax.jit(optax.sigmoid_focal_loss, static_argnames=("alpha", "gamma"))
  ref = focal(logits[keep], np.eye(K, dtype=np.float32)[labels[keep]], alpha=0.25, gamma=2.0)
  assert loss == pytest.approx(float(ref.sum(-1).mean()), rel=1e-5)
  # Binary: one logit channel, labels 0/1.
  bl = np.where(keep, labels % 2, IGNORE).astype(np.int32)
  loss, _ = run(cfg(name="sigmoid_focal", focal_gamma=1.5, focal_alpha=0.6), logits[..., :1], bl)
  ref = focal(logits[..., 0][keep], bl[keep].astype(np.float32), alpha=0.6, gamma=1.5)
  assert loss == pytest.approx(float(ref.mean()), rel=1e-5)


def test_softmax_focal_reference(batch):
  logits, labels = batch
  keep = labels != IGNORE
  p = np.exp(np_log_softmax(logits))[keep]
  py = p[np.arange(p.shape[0]), labels[keep]]
  ref = np.mean(-0.5 * (1 - py) ** 2 * np.log(py))
  loss, _ = run(cfg(name="focal", focal_gamma=2.0, focal_alpha=0.5), logits, labels)
  assert loss == pytest.approx(ref, rel=1e-5)
  # gamma 0, alpha 1 is cross-entropy.
  loss, _ = run(cfg(name="focal", focal_gamma=0.0, focal_alpha=1.0), logits, labels)
  assert loss == pytest.approx(np_ce(logits, labels), rel=1e-5)


def test_dice_reference(batch):
  logits, labels = batch
  keep = labels != IGNORE
  p = np.exp(np_log_softmax(logits))[keep]
  g = np.eye(K)[labels[keep]]
  s = 1.0
  dice = (2 * (p * g).sum(0) + s) / (p.sum(0) + g.sum(0) + s)
  loss, _ = run(cfg(name="dice", dice_smooth=s), logits, labels)
  assert loss == pytest.approx(1 - dice.mean(), rel=1e-5)
  # Binary: a perfect confident prediction gives ~0 loss.
  bl = np.zeros((1, 4, 4), np.int32)
  bl[0, 1:3, 1:3] = 1
  loss, _ = run(cfg(name="dice", dice_smooth=0.0), (bl[..., None] * 40.0 - 20.0).astype(np.float32), bl)
  assert float(loss) < 1e-6


def np_lovasz(probs, labels):
  """Reference Lovász-softmax following Berman et al.'s PyTorch code (flattened, 'present')."""
  keep = labels != IGNORE
  p, y = probs[keep], labels[keep]
  out = []
  for c in range(p.shape[1]):
    fg = (y == c).astype(np.float64)
    if fg.sum() == 0:
      continue
    err = np.abs(fg - p[:, c])
    order = np.argsort(-err, kind="stable")
    fgs = fg[order]
    inter = fgs.sum() - np.cumsum(fgs)
    union = fgs.sum() + np.cumsum(1 - fgs)
    jac = 1 - inter / union
    jac[1:] = jac[1:] - jac[:-1]
    out.append(np.dot(err[order], jac))
  return np.mean(out)


def test_lovasz_reference(batch):
  logits, labels = batch
  probs = np.exp(np_log_softmax(logits))
  loss, _ = run(cfg(name="lovasz"), logits, labels)
  assert loss == pytest.approx(np_lovasz(probs, labels), rel=1e-5)


def test_ohem_keeps_hard_pixels(batch):
  logits, labels = batch
  keep = labels != IGNORE
  logp = np_log_softmax(logits)[keep]
  nll = -logp[np.arange(keep.sum()), labels[keep]]
  prob = np.exp(-nll)
  # min_kept small: only pixels with p_y <= 0.7 count.
  loss, _ = run(cfg(name="ohem", ohem_thresh=0.7, ohem_min_kept=1), logits, labels)
  assert loss == pytest.approx(nll[prob <= 0.7].mean(), rel=1e-5)
  # min_kept above the count below thresh: the min_kept hardest pixels count.
  m = int((prob <= 0.7).sum()) + 5
  loss, _ = run(cfg(name="ohem", ohem_thresh=0.7, ohem_min_kept=m), logits, labels)
  assert loss == pytest.approx(np.sort(nll)[::-1][:m].mean(), rel=1e-5)


def test_combo_and_parts(batch):
  logits, labels = batch
  c = cfg(name="combo", terms=(("cross_entropy", 1.0), ("dice", 0.5)))
  loss, parts = run(c, logits, labels)
  ce, _ = run(cfg(), logits, labels)
  dl, _ = run(cfg(name="dice"), logits, labels)
  assert parts["main/cross_entropy"] == pytest.approx(float(ce), rel=1e-6)
  assert parts["main/dice"] == pytest.approx(float(dl), rel=1e-6)
  assert loss == pytest.approx(float(ce) + 0.5 * float(dl), rel=1e-6)


def test_class_weight_modes():
  freqs = (0.5, 0.25, 0.2, 0.05, 0.0)
  med = losses.class_weights_from_frequencies(freqs, "median_frequency")
  np.testing.assert_allclose(med, [0.45, 0.9, 1.125, 4.5, 0.0], rtol=1e-6)  # median of present = 0.225
  inv = losses.class_weights_from_frequencies([50, 25, 20, 5, 0], "inverse_frequency")
  raw = np.array([2, 4, 5, 20.0])
  np.testing.assert_allclose(inv[:4], raw / raw.mean(), rtol=1e-6)
  assert inv[4] == 0
  enet = losses.class_weights_from_frequencies(freqs, "log_inverse_frequency")
  np.testing.assert_allclose(enet[0], 1 / np.log(1.52), rtol=1e-6)
  c = cfg(class_weight_mode="median_frequency", class_frequencies=(10, 30, 20, 40))
  np.testing.assert_allclose(losses.resolve_class_weights(c.loss), [2.5, 5 / 6, 1.25, 0.625], rtol=1e-6)


def test_errors_name_bad_values(batch):
  logits, labels = batch
  with pytest.raises(KeyError, match="cross_entropy"):
    losses.build_loss(cfg(name="hinge"))
  with pytest.raises(ValueError, match="3 class weights"):
    run(cfg(class_weights=(1.0, 1.0, 1.0)), logits, labels)
  with pytest.raises(ValueError, match="labels shape"):
    losses.build_loss(cfg())(jnp.asarray(logits), jnp.asarray(labels[:, :3]), {})
  with pytest.raises(ValueError, match="class_frequencies"):
    losses.build_loss(cfg(class_weight_mode="median_frequency"))
  with pytest.raises(ValueError, match="Valid modes"):
    losses.build_loss(cfg(class_weight_mode="sqrt"))
  with pytest.raises(ValueError, match="loss.terms"):
    losses.build_loss(cfg(name="combo"))


@pytest.mark.parametrize("k", [5, 40])  # unrolled over class planes / one reduction (K > 32)
def test_true_class_log_prob_equals_log_softmax_both_forms(k):
  rng = np.random.default_rng(k)
  logits = jnp.asarray(rng.standard_normal((2, 7, 9, k)) * 3, jnp.float32)
  safe = jnp.asarray(rng.integers(0, k, (2, 7, 9)), jnp.int32)
  log_p_y, mean_log_p = losses._true_class_log_prob(logits, safe)
  ref = jax.nn.log_softmax(logits, axis=-1)
  np.testing.assert_allclose(log_p_y, jnp.take_along_axis(ref, safe[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean_log_p, ref.mean(-1), rtol=1e-5, atol=1e-5)
  # The custom VJP against autodiff of the reference, both outputs weighted per pixel.
  wy = jnp.asarray(rng.standard_normal((2, 7, 9)), jnp.float32)
  wm = jnp.asarray(rng.standard_normal((2, 7, 9)), jnp.float32)

  def ours(z):
    a, b = losses._true_class_log_prob(z, safe)
    return (wy * a + wm * b).sum()

  def ref_fn(z):
    lp = jax.nn.log_softmax(z, -1)
    return (wy * jnp.take_along_axis(lp, safe[..., None], -1)[..., 0] + wm * lp.mean(-1)).sum()

  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref_fn)(logits), rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda z: losses._true_class_log_prob(z, safe)[0].sum())(logits)
  g_ref = jax.grad(lambda z: jnp.take_along_axis(
      jax.nn.log_softmax(z, -1), safe[..., None], -1).sum())(logits)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(ours))(logits), jax.grad(ref_fn)(logits),
                             rtol=1e-5, atol=1e-5)


# --- The native CPU kernels (JSEG_LOSS): the same values and gradients as the XLA form. ---

def _needs_native_loss():
  try:
    ok = losses.loss_native_active()
  except RuntimeError:
    ok = False
  if not ok:
    pytest.skip("jseg.native's kernels are not active here")


def _upsampled_ce(monkeypatch, mode, x, labels, **kw):
  """(loss, d loss / d low-resolution logits) through layers.resize_logits, JSEG_LOSS=mode."""
  from jseg.models import layers
  monkeypatch.setenv("JSEG_LOSS", mode)
  size = labels.shape[1:]
  f = lambda x: losses.cross_entropy(layers.resize_logits(x, size), labels, **kw)  # noqa: E731
  return jax.jit(jax.value_and_grad(f))(x)


@pytest.mark.parametrize("k,kw", [
    (11, {}),
    (11, {"label_smoothing": 0.1, "class_weights": np.linspace(0.5, 2.0, 11)}),
    (40, {"avg_non_ignore": False}),  # the XLA form reduces over classes above 32
])
def test_native_loss_kernels_equal_the_xla_form(monkeypatch, k, kw):
  _needs_native_loss()
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.standard_normal((2, 8, 12, k)) * 4, jnp.float32)
  labels = rng.integers(0, k, (2, 32, 48)).astype(np.int32)
  labels[0, :5] = 255  # ignored pixels
  labels = jnp.asarray(labels)
  loss_x, g_x = _upsampled_ce(monkeypatch, "xla", x, labels, **kw)
  loss_n, g_n = _upsampled_ce(monkeypatch, "native", x, labels, **kw)
  np.testing.assert_allclose(loss_n, loss_x, rtol=1e-6)
  np.testing.assert_allclose(g_n, g_x, rtol=1e-5, atol=1e-6 * float(jnp.abs(g_x).max()))
  # Direct call, class-major logits not from resize_logits (XLA copies them first).
  safe = jnp.asarray(rng.integers(0, k, (2, 5, 3)), jnp.int32)
  z = jnp.asarray(rng.standard_normal((2, 5, 3, k)) * 30, jnp.float32)  # large magnitudes
  wy, wm = (jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32) for _ in range(2))

  def f(z):
    a, b = losses._true_class_log_prob(z, safe)
    return (wy * a + wm * b).sum()

  monkeypatch.setenv("JSEG_LOSS", "native")
  v_n, g_n = jax.jit(jax.value_and_grad(f))(z)
  monkeypatch.setenv("JSEG_LOSS", "xla")
  v_x, g_x = jax.jit(jax.value_and_grad(f))(z)
  np.testing.assert_allclose(v_n, v_x, rtol=1e-6)
  np.testing.assert_allclose(g_n, g_x, rtol=1e-5, atol=1e-6)


def test_native_loss_writes_the_gradient_over_the_logits(monkeypatch):
  """The full-size logits' gradient takes the logits' buffer, so XLA's temporaries shrink
  (here by 0.55 of a full-size array, 0.64 at 4x256x256x11: the width upsampling's
  input-sized buffers stay)."""
  _needs_native_loss()
  from jseg.models import layers
  x = jnp.zeros((2, 16, 16, 11), jnp.float32)
  labels = jnp.zeros((2, 128, 128), jnp.int32)
  full = 2 * 11 * 128 * 128 * 4
  temps = {}
  for mode in ("xla", "native"):
    monkeypatch.setenv("JSEG_LOSS", mode)
    f = lambda x: losses.cross_entropy(layers.resize_logits(x, (128, 128)), labels)  # noqa: E731
    c = jax.jit(jax.grad(f)).lower(x).compile()
    temps[mode] = c.memory_analysis().temp_size_in_bytes
    text = c.as_text()
    assert ("JsegLogProbBwd" in text) == (mode == "native")
  assert temps["native"] <= temps["xla"] - 0.5 * full, temps


def test_native_loss_propagates_nan_and_checks_its_mode(monkeypatch):
  _needs_native_loss()
  monkeypatch.setenv("JSEG_LOSS", "native")
  z = jnp.zeros((1, 4, 4, 3), jnp.float32).at[0, 1, 1, 2].set(jnp.nan)
  labels = jnp.zeros((1, 4, 4), jnp.int32)
  loss, g = jax.value_and_grad(lambda z: losses.cross_entropy(z, labels))(z)
  assert np.isnan(float(loss)) and np.isnan(np.asarray(g)).any()
  monkeypatch.setenv("JSEG_LOSS", "fast")
  with pytest.raises(ValueError, match="JSEG_LOSS"):
    losses.loss_native_active()


def test_loss_backend_summary_names_the_mode(monkeypatch):
  monkeypatch.setenv("JSEG_LOSS", "xla")
  assert losses.loss_backend_summary() == "XLA (JSEG_LOSS=xla)"
  monkeypatch.setenv("JSEG_LOSS", "auto")
  assert losses.loss_backend_summary() == (
      "jseg.native kernels (CPU)" if losses.loss_native_active() else "XLA")
