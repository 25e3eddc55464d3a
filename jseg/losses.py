"""Segmentation losses: pure functions of logits and integer labels, chosen by name.

``build_loss(config)`` returns ``loss_fn(logits, labels, aux) -> (loss, parts)``:

* ``logits`` (N, H, W, K) in any float dtype; every loss casts to float32 first, so
  bfloat16 models lose no precision in the softmax or the reductions.
* ``labels`` int (N, H, W); pixels equal to ``config.data.ignore_index`` (and any
  label outside ``[0, K)``) contribute nothing to the loss or its gradient.
* ``aux``: dict of extra logits (deep-supervision heads, same shape as ``logits``),
  each scored with the same loss and added with weight ``config.loss.aux_weight``
  (PSPNet uses 0.4), or ``config.loss.aux_weights[head]`` when that optional mapping
  names the head (networks with several deep-supervision heads).
* ``parts``: float32 scalars for logging: ``"main"`` (main head, unweighted),
  ``"aux/<head>"`` (each auxiliary head, unweighted) and, for ``combo``,
  ``"main/<term>"`` (each term of the main head, before its combo weight).

Denominator convention (``config.loss.avg_non_ignore``, default ``True``): pixel
losses are averaged over the non-ignored pixels; with class weights ``w`` it is the
weighted mean ``sum_i w[y_i] l_i / sum_i w[y_i]``, exactly what PyTorch's
``CrossEntropyLoss(weight=w, ignore_index=...)`` and MMSegmentation's
``avg_non_ignore=True`` compute. ``avg_non_ignore=False`` gives MMSegmentation's
older default: ``sum_i w[y_i] l_i / (N*H*W)`` (ignored pixels count as zeros in the
mean). A batch in which every pixel is ignored has loss 0 and zero gradients.

Registered losses (``config.loss.name``; all in ``jseg.registry.LOSSES``):
``cross_entropy``, ``focal`` (softmax, multi-class), ``sigmoid_focal`` (binary /
one-vs-rest, RetinaNet form), ``dice``, ``lovasz``, ``ohem`` and ``combo``
(weighted sum of the others given in ``config.loss.terms``).

Class weights: ``config.loss.class_weights`` (a tuple of K floats), or
``config.loss.class_weight_mode`` in ``inverse_frequency``, ``median_frequency``,
``log_inverse_frequency`` computed from ``config.loss.class_frequencies`` (a tuple of
K pixel counts or frequencies, e.g. from ``jseg.data.stats``); see
``class_weights_from_frequencies``.

Config fields (``config.loss.*``, read with defaults so older configs keep working):
``name`` ('cross_entropy'), ``aux_weight`` (0.4), ``aux_weights`` ({} : per-head
override), ``class_weights`` (None), ``class_weight_mode`` ('none'),
``class_frequencies`` (None), ``label_smoothing`` (0.0; cross_entropy, ohem),
``avg_non_ignore`` (True), ``focal_gamma`` (2.0), ``focal_alpha`` (1.0 for ``focal``,
0.25 for ``sigmoid_focal``), ``dice_smooth`` (1.0), ``dice_exclude_absent`` (False),
``lovasz_classes`` ('present'), ``ohem_thresh`` (0.7), ``ohem_min_kept`` (100000),
``terms`` (for ``combo``: ``(('cross_entropy', 1.0), ('dice', 1.0))``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jseg.registry import LOSSES

# A loss term maps float32 logits (N,H,W,K), int labels (N,H,W) to a float32 scalar.
LossTerm = Callable[[jax.Array, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]

WEIGHT_MODES = ("none", "inverse_frequency", "median_frequency", "log_inverse_frequency")


# ----------------------------------------------------------------------------- helpers


def _get(cfg: Any, name: str, default: Any) -> Any:
  """``cfg.get(name, default)`` that also treats an unset placeholder (None) as absent."""
  value = cfg.get(name, default) if cfg is not None else default
  return default if value is None else value


def class_weights_from_frequencies(frequencies: Sequence[float], mode: str) -> np.ndarray:
  """Per-class loss weights from class pixel counts or frequencies.

  * ``inverse_frequency``: ``w_c = 1 / f_c``.
  * ``median_frequency``: ``w_c = median(f) / f_c`` (Eigen & Fergus, ICCV 2015; the
    SegNet weighting). ``f_c`` here is the frequency over the whole set; the paper's
    variant counts only images containing ``c``: pass such frequencies if you have them.
  * ``log_inverse_frequency``: ``w_c = 1 / ln(1.02 + f_c)`` (ENet, Paszke et al. 2016).

  ``f`` is normalised to sum 1; classes with frequency 0 get weight 0 (they never
  occur as labels, so their weight is never used). ``inverse_frequency`` is rescaled so
  the weights of present classes average 1, which keeps the loss scale (and the tuned
  learning rate) close to the unweighted loss.
  """
  f = np.asarray(frequencies, np.float64)
  if f.ndim != 1 or f.size == 0 or np.any(f < 0) or not np.all(np.isfinite(f)) or f.sum() <= 0:
    raise ValueError(
        f"class_frequencies must be a non-empty 1-D sequence of non-negative counts with a "
        f"positive sum; got {frequencies!r}.")
  f = f / f.sum()
  present = f > 0
  w = np.zeros_like(f)
  if mode == "inverse_frequency":
    w[present] = 1.0 / f[present]
    w[present] /= w[present].mean()
  elif mode == "median_frequency":
    w[present] = np.median(f[present]) / f[present]
  elif mode == "log_inverse_frequency":
    w[present] = 1.0 / np.log(1.02 + f[present])
  else:
    raise ValueError(f"Unknown class weight mode '{mode}'. Valid modes: {', '.join(WEIGHT_MODES)}.")
  return w.astype(np.float32)


def resolve_class_weights(loss_cfg: Any) -> np.ndarray | None:
  """The class weights the config asks for (``None`` = unweighted)."""
  given = _get(loss_cfg, "class_weights", None)
  mode = _get(loss_cfg, "class_weight_mode", "none")
  if mode not in WEIGHT_MODES:
    raise ValueError(f"Unknown loss.class_weight_mode '{mode}'. Valid modes: {', '.join(WEIGHT_MODES)}.")
  if given is not None and mode != "none":
    raise ValueError(
        f"Both loss.class_weights={given!r} and loss.class_weight_mode='{mode}' are set; set one.")
  if given is not None:
    w = np.asarray(given, np.float32)
    if w.ndim != 1 or np.any(w < 0) or not np.all(np.isfinite(w)):
      raise ValueError(f"loss.class_weights must be a tuple of non-negative floats; got {given!r}.")
    return w
  if mode == "none":
    return None
  freqs = _get(loss_cfg, "class_frequencies", None)
  if freqs is None:
    raise ValueError(
        f"loss.class_weight_mode='{mode}' needs loss.class_frequencies (a tuple of K pixel "
        f"counts, e.g. from jseg.data.stats).")
  return class_weights_from_frequencies(freqs, mode)


def _valid_and_safe(labels: jax.Array, num_classes: int, ignore_index: int) -> tuple[jax.Array, jax.Array]:
  """Mask of scored pixels and labels with ignored ones replaced by class 0."""
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  return valid, jnp.where(valid, labels, 0)


def _pixel_weights(safe: jax.Array, valid: jax.Array, weights: np.ndarray | None) -> jax.Array:
  """``w[y]`` at valid pixels (1 when unweighted), 0 at ignored ones."""
  if weights is None:
    return valid.astype(jnp.float32)
  return jnp.asarray(weights, jnp.float32)[safe] * valid


def _true_class_log_prob(logits: jax.Array, safe: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(log p_y, mean_c log p_c)`` per pixel, from float32 NHWC logits.

  Computed with the class axis moved next to the batch axis (``layers.resize_logits``
  leaves logits class-major, so the move is free). Forward: elementwise operations over
  the K class planes (max, sum of exponentials, the true class by a per-plane select),
  unrolled for K <= 32 because XLA:CPU's reductions over the class axis cost 10x more
  at 2x512x512x11 than at 4x256x256x11; one reduction above that. Backward (custom
  VJP): the closed form ``g_y (onehot - p) + g_mean (1/K - p)`` as one elementwise pass
  over the class-major logits, where autodiff of the unrolled planes assembled the
  gradient by padding and summing K planes; only the logits and the log-normaliser are
  kept for it. Loss end alone, forward + backward (``experiments/performance/loss_tail.py``,
  2 threads): 2x512x512x11 31.5-41.4 ms vs 41.8-60.4 ms, 4x256x256x11 7.6-10.5 vs
  14.8-17.0 ms. Values and gradients equal ``log_softmax`` + ``take_along_axis``.
  """
  return _class_log_prob(jnp.moveaxis(logits, -1, 1), safe)


def _class_log_prob_fwd(z: jax.Array, safe: jax.Array):
  """Forward of ``_class_log_prob`` on class-major ``z`` (N, K, H, W), with residuals."""
  k = z.shape[1]
  if z.dtype == jnp.float32 and z.ndim >= 3 and loss_native_active():
    # The kernels see z as (N*K, H, 1, W), the shape of layers.resize_logits' oneDNN output
    # (for 4-D z), so that no reshape separates them from it: XLA copies an in-place
    # operand reached through a reshape. z comes back through the forward call (aliased) so
    # that the backward, which writes the gradient over it, is its only reader.
    n = z.shape[0]
    view = jnp.reshape(z, (n * k, z.shape[2], 1, z.shape[3]) if z.ndim == 4 else (n * k, -1))
    pix = jax.ShapeDtypeStruct(safe.shape, jnp.float32)
    lp_y, lp_mean, lse, view = jax.ffi.ffi_call(
        "JsegLogProbFwd", (pix, pix, pix, jax.ShapeDtypeStruct(view.shape, jnp.float32)),
        vmap_method="sequential", input_output_aliases={0: 3})(
            view, safe.astype(jnp.int32), n=np.int64(n), k=np.int64(k))
    return (lp_y, lp_mean), (view, lse, safe, jnp.zeros((0,), jnp.float32))
  if k > 32:  # many classes: one reduction beats a long chain of planes
    lse = jax.nn.logsumexp(z, axis=1)
    z_y = jnp.sum(jnp.where(_onehot(safe, k), z, 0.0), axis=1)
    z_mean = jnp.mean(z, axis=1)
  else:
    planes = [z[:, i] for i in range(k)]
    m = planes[0]
    for p in planes[1:]:
      m = jnp.maximum(m, p)
    lse = m + jnp.log(sum(jnp.exp(p - m) for p in planes))
    z_y = sum(jnp.where(safe == i, p, 0.0) for i, p in enumerate(planes))
    z_mean = sum(planes) / k
  return (z_y - lse, z_mean - lse), (z, lse, safe, None)


def _class_log_prob_bwd(res, g):
  z, lse, safe, native_marker = res
  g_y, g_mean = g
  if native_marker is not None:  # z is the kernels' (N*K, ...) view (see the forward)
    n = lse.shape[0]
    k = z.size // lse.size
    # One native pass written over z (its last use): the gradient takes z's buffer.
    dz = jax.ffi.ffi_call(
        "JsegLogProbBwd", jax.ShapeDtypeStruct(z.shape, jnp.float32), vmap_method="sequential",
        input_output_aliases={0: 0})(
            z, lse, safe.astype(jnp.int32), g_y.astype(jnp.float32),
            g_mean.astype(jnp.float32), n=np.int64(n), k=np.int64(k))
    return dz.reshape((n, k) + lse.shape[1:]), None
  k = z.shape[1]
  p = jnp.exp(z - lse[:, None])
  dz = (jnp.where(_onehot(safe, k), g_y[:, None], 0.0) + (g_mean / k)[:, None]
        - (g_y + g_mean)[:, None] * p)
  return dz, None  # labels: no gradient


def loss_native_active() -> bool:
  """Whether the class log-probabilities' backward, traced now, runs as ``jseg.native``'s
  kernel (``JSEG_LOSS`` = ``auto`` | ``native`` | ``xla``).

  ``auto`` (default): where the oneDNN convolutions run (one CPU device, the extension
  built, ``JSEG_CONV`` not ``xla``). The kernel writes the logits' gradient over the
  full-size logits, so one of the two full-size arrays of the loss end is never allocated
  (XLA:CPU keeps both), and skips the K-plane maximum XLA recomputes for each class.
  ``native``: raise if the extension is unavailable or the backend is not CPU.
  """
  from jseg import native  # noqa: PLC0415
  from jseg.models import conv  # noqa: PLC0415 - the models package imports this module's users
  return native.kernels_active("JSEG_LOSS", conv.onednn_active)


def loss_backend_summary() -> str:
  """One line for logs: where the class log-probabilities of traced losses run now."""
  if loss_native_active():
    return "jseg.native kernels (CPU)"
  from jseg import native  # noqa: PLC0415
  return "XLA" + (" (JSEG_LOSS=xla)" if native.env_mode("JSEG_LOSS", native.KERNEL_MODES) == "xla" else "")


def _onehot(safe: jax.Array, k: int) -> jax.Array:
  """``safe[:, None] == class`` as a (N, K, ...) mask."""
  return safe[:, None] == jnp.arange(k, dtype=safe.dtype).reshape((1, k) + (1,) * (safe.ndim - 1))


_class_log_prob = jax.custom_vjp(lambda z, safe: _class_log_prob_fwd(z, safe)[0])
_class_log_prob.defvjp(_class_log_prob_fwd, _class_log_prob_bwd)


def _reduce(pixel_loss: jax.Array, pixel_weight: jax.Array, avg_non_ignore: bool) -> jax.Array:
  """Weighted mean of per-pixel losses under the module's denominator convention."""
  num = jnp.sum(pixel_loss * pixel_weight)
  if avg_non_ignore:
    den = jnp.sum(pixel_weight)
  else:
    den = jnp.asarray(pixel_loss.size, jnp.float32)
  safe_den = jnp.where(den > 0, den, 1.0)
  return jnp.where(den > 0, num / safe_den, 0.0)


def _check_weights(weights: np.ndarray | None, num_classes: int, loss: str) -> None:
  if weights is not None and weights.shape[0] != num_classes:
    raise ValueError(
        f"{loss}: {weights.shape[0]} class weights given but the logits have {num_classes} "
        f"classes; give one weight per class.")


def _check_shapes(logits: jax.Array, labels: jax.Array, where: str) -> None:
  if logits.ndim != 4:
    raise ValueError(f"{where}: logits must be (N, H, W, K); got shape {tuple(logits.shape)}.")
  if tuple(labels.shape) != tuple(logits.shape[:3]):
    raise ValueError(
        f"{where}: labels shape {tuple(labels.shape)} does not match logits shape "
        f"{tuple(logits.shape)}; labels must be (N, H, W) at the logits' resolution.")


# ----------------------------------------------------------------------------- losses


def cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255,
                  class_weights: np.ndarray | None = None, label_smoothing: float = 0.0,
                  avg_non_ignore: bool = True) -> jax.Array:
  """Softmax cross-entropy with ignore index, class weights and label smoothing.

  Label smoothing uses the target ``(1 - eps) * onehot(y) + eps / K`` (Szegedy et al.,
  CVPR 2016). With class weights each pixel's smoothed loss is weighted by ``w[y]``
  (PyTorch instead weights each target class inside the smoothing sum; the two agree
  when ``eps = 0`` or the weights are uniform).
  """
  logits = logits.astype(jnp.float32)
  k = logits.shape[-1]
  _check_weights(class_weights, k, "cross_entropy")
  valid, safe = _valid_and_safe(labels, k, ignore_index)
  logp_y, mean_logp = _true_class_log_prob(logits, safe)
  nll = -logp_y
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * mean_logp
  return _reduce(nll, _pixel_weights(safe, valid, class_weights), avg_non_ignore)


def focal(logits: jax.Array, labels: jax.Array, *, gamma: float = 2.0, alpha: float = 1.0,
          ignore_index: int = 255, class_weights: np.ndarray | None = None,
          avg_non_ignore: bool = True) -> jax.Array:
  """Multi-class (softmax) focal loss ``-alpha (1 - p_y)^gamma log p_y`` (Lin et al., ICCV 2017).

  ``gamma = 0, alpha = 1`` is cross-entropy. Per-class balancing (the paper's
  ``alpha_t``) goes through the class weights.
  """
  logits = logits.astype(jnp.float32)
  k = logits.shape[-1]
  _check_weights(class_weights, k, "focal")
  valid, safe = _valid_and_safe(labels, k, ignore_index)
  logp, _ = _true_class_log_prob(logits, safe)
  pixel = -alpha * (-jnp.expm1(logp)) ** gamma * logp
  return _reduce(pixel, _pixel_weights(safe, valid, class_weights), avg_non_ignore)


def sigmoid_focal(logits: jax.Array, labels: jax.Array, *, gamma: float = 2.0, alpha: float = 0.25,
                  ignore_index: int = 255, class_weights: np.ndarray | None = None,
                  avg_non_ignore: bool = True) -> jax.Array:
  """Binary focal loss (RetinaNet form, ``optax.sigmoid_focal_loss``).

  With K = 1 the single channel is the foreground logit and labels are 0/1. With
  K > 1 every class is an independent one-vs-rest sigmoid on ``onehot(y)`` (as
  MMSegmentation's ``FocalLoss(use_sigmoid=True)``); the per-pixel loss is the sum
  over classes, then reduced over pixels like every other loss. ``alpha`` weights
  positives, ``1 - alpha`` negatives; ``alpha < 0`` disables it.
  """
  logits = logits.astype(jnp.float32)
  k = logits.shape[-1]
  if k == 1:
    valid, safe = _valid_and_safe(labels, 2, ignore_index)
    targets = safe[..., None].astype(jnp.float32)
    if class_weights is not None and class_weights.shape[0] != 2:
      raise ValueError(
          f"sigmoid_focal with one logit channel takes 2 class weights (background, "
          f"foreground); got {class_weights.shape[0]}.")
  else:
    _check_weights(class_weights, k, "sigmoid_focal")
    valid, safe = _valid_and_safe(labels, k, ignore_index)
    targets = jax.nn.one_hot(safe, k, dtype=jnp.float32)
  a = None if alpha is None or alpha < 0 else alpha
  pixel = jnp.sum(optax.sigmoid_focal_loss(logits, targets, alpha=a, gamma=gamma), axis=-1)
  return _reduce(pixel, _pixel_weights(safe, valid, class_weights), avg_non_ignore)


def dice(logits: jax.Array, labels: jax.Array, *, smooth: float = 1.0, ignore_index: int = 255,
         class_weights: np.ndarray | None = None, exclude_absent: bool = False) -> jax.Array:
  """Soft Dice loss ``1 - mean_c (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)``.

  Milletari et al. (V-Net, 3DV 2016) with the additive smoothing ``s`` of
  segmentation_models_pytorch. Sums run over all non-ignored pixels of the batch. K = 1:
  binary Dice of ``sigmoid(logit)`` against 0/1 labels; K > 1: softmax probabilities,
  one Dice per class, averaged (weighted by the class weights if given).
  ``exclude_absent=True`` averages only over classes present in the batch's labels
  (smp zeroes absent classes instead; with ``s > 0`` keeping them teaches the network
  not to predict them). Not a pixel mean, so ``avg_non_ignore`` does not apply.
  """
  logits = logits.astype(jnp.float32)
  k = logits.shape[-1]
  if k == 1:
    valid, safe = _valid_and_safe(labels, 2, ignore_index)
    probs = jax.nn.sigmoid(logits)
    onehot = safe[..., None].astype(jnp.float32)
    if class_weights is not None:
      raise ValueError("dice with one logit channel has a single class; class weights do not apply.")
  else:
    _check_weights(class_weights, k, "dice")
    valid, safe = _valid_and_safe(labels, k, ignore_index)
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(safe, k, dtype=jnp.float32)
  m = valid[..., None].astype(jnp.float32)
  inter = jnp.sum(probs * onehot * m, axis=(0, 1, 2))
  card = jnp.sum((probs + onehot) * m, axis=(0, 1, 2))
  den = card + smooth
  score = jnp.where(den > 0, (2.0 * inter + smooth) / jnp.where(den > 0, den, 1.0), 1.0)
  w = jnp.ones_like(score) if class_weights is None else jnp.asarray(class_weights, jnp.float32)
  if exclude_absent:
    w = w * (jnp.sum(onehot * m, axis=(0, 1, 2)) > 0)
  wsum = jnp.sum(w)
  # All-ignore batch: score is 1 everywhere (or w sums to 0), so the loss is 0.
  return jnp.where(wsum > 0, jnp.sum(w * (1.0 - score)) / jnp.where(wsum > 0, wsum, 1.0), 0.0)


def _lovasz_grad(fg_sorted: jax.Array) -> jax.Array:
  """Gradient of the Lovász extension of the Jaccard loss (Berman et al., Alg. 1)."""
  gts = jnp.sum(fg_sorted)
  inter = gts - jnp.cumsum(fg_sorted)
  union = gts + jnp.cumsum(1.0 - fg_sorted)
  jac = 1.0 - inter / union
  return jnp.concatenate([jac[:1], jac[1:] - jac[:-1]])


def lovasz_softmax(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255,
                   classes: str = "present", class_weights: np.ndarray | None = None) -> jax.Array:
  """Lovász-softmax loss (Berman, Rannen Triki & Blaschko, CVPR 2018), batch-level.

  For each class the pixel errors ``|[y = c] - p_c|`` are sorted in decreasing order
  and dotted with the gradient of the Lovász extension of the Jaccard loss; the class
  losses are averaged over ``classes='present'`` (classes in the labels, the paper's
  default) or ``'all'``. Ignored pixels are sorted last and masked out, so the
  function keeps a static shape under jit. One sort of N*H*W values per class.
  """
  logits = logits.astype(jnp.float32)
  k = logits.shape[-1]
  if classes not in ("present", "all"):
    raise ValueError(f"lovasz: classes must be 'present' or 'all'; got {classes!r}.")
  _check_weights(class_weights, k, "lovasz")
  valid, safe = _valid_and_safe(labels, k, ignore_index)
  probs = jax.nn.softmax(logits, axis=-1).reshape(-1, k).T        # (K, P)
  fg = jax.nn.one_hot(safe.reshape(-1), k, dtype=jnp.float32).T   # (K, P)
  v = valid.reshape(-1).astype(jnp.float32)
  fg = fg * v

  def per_class(p_c, fg_c):
    err = jnp.abs(fg_c - p_c) * v
    order = jnp.argsort(-jnp.where(v > 0, err, -1.0))
    return jnp.sum(err[order] * _lovasz_grad(fg_c[order]))

  losses = jax.vmap(per_class)(probs, fg)
  w = jnp.ones((k,), jnp.float32) if class_weights is None else jnp.asarray(class_weights, jnp.float32)
  if classes == "present":
    w = w * (jnp.sum(fg, axis=1) > 0)
  wsum = jnp.sum(w)
  return jnp.where(wsum > 0, jnp.sum(w * losses) / jnp.where(wsum > 0, wsum, 1.0), 0.0)


def ohem_cross_entropy(logits: jax.Array, labels: jax.Array, *, thresh: float = 0.7,
                       min_kept: int = 100000, ignore_index: int = 255,
                       class_weights: np.ndarray | None = None, label_smoothing: float = 0.0,
                       avg_non_ignore: bool = True) -> jax.Array:
  """Cross-entropy over hard pixels only (online hard example mining).

  MMSegmentation's ``OHEMPixelSampler``: a valid pixel is kept when the softmax
  probability of its true class is below ``max(thresh, p_(min_kept))``, where
  ``p_(min_kept)`` is the ``min_kept``-th smallest true-class probability in the batch,
  so at least ``min_kept`` pixels (or all valid ones) always stay. The selection is
  not differentiated through (Shrivastava et al., CVPR 2016).
  """
  logits = logits.astype(jnp.float32)
  k = logits.shape[-1]
  _check_weights(class_weights, k, "ohem")
  valid, safe = _valid_and_safe(labels, k, ignore_index)
  logp, mean_logp = _true_class_log_prob(logits, safe)
  prob = jax.lax.stop_gradient(jnp.where(valid, jnp.exp(logp), jnp.inf)).reshape(-1)
  n_valid = jnp.sum(valid)
  idx = jnp.clip(jnp.minimum(min_kept, n_valid) - 1, 0, prob.size - 1)
  kth = jnp.sort(prob)[idx]
  threshold = jnp.maximum(kth, thresh)
  keep = valid & (jax.lax.stop_gradient(jnp.exp(logp)) <= threshold)
  nll = -logp
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * mean_logp
  return _reduce(nll, _pixel_weights(safe, keep, class_weights), avg_non_ignore)


# ----------------------------------------------------------------------------- registry
# Each entry: build(config, class_weights) -> LossTerm. ``config`` is the full config
# (``config.loss`` for loss fields, ``config.data.ignore_index``).


def _ignore(config: Any) -> int:
  data = config.get("data", None)
  return int(_get(data, "ignore_index", 255))


@LOSSES.register("cross_entropy")
def _build_ce(config: Any, weights: np.ndarray | None) -> LossTerm:
  lc = config.loss
  kw = dict(ignore_index=_ignore(config), class_weights=weights,
            label_smoothing=float(_get(lc, "label_smoothing", 0.0)),
            avg_non_ignore=bool(_get(lc, "avg_non_ignore", True)))
  return lambda logits, labels: cross_entropy(logits, labels, **kw)


@LOSSES.register("focal")
def _build_focal(config: Any, weights: np.ndarray | None) -> LossTerm:
  lc = config.loss
  kw = dict(gamma=float(_get(lc, "focal_gamma", 2.0)), alpha=float(_get(lc, "focal_alpha", 1.0)),
            ignore_index=_ignore(config), class_weights=weights,
            avg_non_ignore=bool(_get(lc, "avg_non_ignore", True)))
  return lambda logits, labels: focal(logits, labels, **kw)


@LOSSES.register("sigmoid_focal")
def _build_sigmoid_focal(config: Any, weights: np.ndarray | None) -> LossTerm:
  lc = config.loss
  kw = dict(gamma=float(_get(lc, "focal_gamma", 2.0)), alpha=float(_get(lc, "focal_alpha", 0.25)),
            ignore_index=_ignore(config), class_weights=weights,
            avg_non_ignore=bool(_get(lc, "avg_non_ignore", True)))
  return lambda logits, labels: sigmoid_focal(logits, labels, **kw)


@LOSSES.register("dice")
def _build_dice(config: Any, weights: np.ndarray | None) -> LossTerm:
  lc = config.loss
  kw = dict(smooth=float(_get(lc, "dice_smooth", 1.0)), ignore_index=_ignore(config),
            class_weights=weights, exclude_absent=bool(_get(lc, "dice_exclude_absent", False)))
  return lambda logits, labels: dice(logits, labels, **kw)


@LOSSES.register("lovasz")
def _build_lovasz(config: Any, weights: np.ndarray | None) -> LossTerm:
  lc = config.loss
  kw = dict(ignore_index=_ignore(config), classes=str(_get(lc, "lovasz_classes", "present")),
            class_weights=weights)
  return lambda logits, labels: lovasz_softmax(logits, labels, **kw)


@LOSSES.register("ohem")
def _build_ohem(config: Any, weights: np.ndarray | None) -> LossTerm:
  lc = config.loss
  kw = dict(thresh=float(_get(lc, "ohem_thresh", 0.7)), min_kept=int(_get(lc, "ohem_min_kept", 100000)),
            ignore_index=_ignore(config), class_weights=weights,
            label_smoothing=float(_get(lc, "label_smoothing", 0.0)),
            avg_non_ignore=bool(_get(lc, "avg_non_ignore", True)))
  return lambda logits, labels: ohem_cross_entropy(logits, labels, **kw)


def _combo_terms(loss_cfg: Any) -> list[tuple[str, float]]:
  terms = _get(loss_cfg, "terms", None)
  if not terms:
    raise ValueError(
        "loss.name='combo' needs loss.terms, e.g. (('cross_entropy', 1.0), ('dice', 1.0)).")
  out = []
  for t in terms:
    if not (isinstance(t, (tuple, list)) and len(t) == 2 and isinstance(t[0], str)):
      raise ValueError(f"Each loss.terms entry must be (loss_name, weight); got {t!r}.")
    if t[0] == "combo":
      raise ValueError("loss.terms cannot contain 'combo'.")
    LOSSES.get(t[0])  # unknown names raise, listing the valid ones
    if any(t[0] == n for n, _ in out):
      raise ValueError(f"loss.terms names '{t[0]}' twice; give each loss once with its total weight.")
    out.append((t[0], float(t[1])))
  return out


@LOSSES.register("combo")
def _build_combo(config: Any, weights: np.ndarray | None) -> LossTerm:
  """Weighted sum of the losses in ``config.loss.terms``; ``.parts`` gives each term."""
  terms = [(n, w, LOSSES.get(n)(config, weights)) for n, w in _combo_terms(config.loss)]

  def parts(logits, labels):
    return {n: fn(logits, labels) for n, _, fn in terms}

  def combo(logits, labels):
    return sum(w * v for (_, w, _), v in zip(terms, parts(logits, labels).values()))

  combo.parts = parts
  combo.weights = {n: w for n, w, _ in terms}
  return combo


def build_term(config: Any) -> LossTerm:
  """The per-head loss ``term(logits, labels) -> scalar`` named by ``config.loss.name``."""
  return LOSSES.get(_get(config.loss, "name", "cross_entropy"))(config, resolve_class_weights(config.loss))


def build_loss(config: ml_collections.ConfigDict) -> LossFn:
  """``loss_fn(logits, labels, aux) -> (loss, parts)`` for ``config`` (see module doc)."""
  term = build_term(config)
  combo_weights = getattr(term, "weights", None)
  aux_weight = float(_get(config.loss, "aux_weight", 0.4))
  per_head = dict(_get(config.loss, "aux_weights", {}))

  def weight_for(head: str) -> float:
    return float(per_head.get(head, aux_weight))

  def loss_fn(logits: jax.Array, labels: jax.Array,
              aux: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    _check_shapes(logits, labels, "loss (main head)")
    parts: dict[str, jax.Array] = {}
    if combo_weights is not None:
      # Log each term and recombine them rather than evaluating every term twice.
      for n, v in term.parts(logits, labels).items():
        parts[f"main/{n}"] = v
      main = sum(w * parts[f"main/{n}"] for n, w in combo_weights.items())
    else:
      main = term(logits, labels)
    parts["main"] = main
    total = main
    for head, head_logits in sorted((aux or {}).items()):
      _check_shapes(head_logits, labels, f"loss (aux head '{head}')")
      value = term(head_logits, labels)
      parts[f"aux/{head}"] = value
      total = total + weight_for(head) * value
    return total.astype(jnp.float32), {k: v.astype(jnp.float32) for k, v in parts.items()}

  return loss_fn
