"""Ensemble rules over the probability maps of several segmentation models.

Every rule takes ``probs``: an array ``(M, ..., K)`` (M members, any spatial
and batch dims, K classes; per-pixel probabilities, e.g.
``exp(jseg.inference.predict_logits(...))``) or a list of M such arrays, and
returns per-pixel probabilities or labels. NumPy on the host: the maps are
already computed, and the rules are a few array operations.

- ``average``: mean of probabilities (the usual deep-ensemble rule,
  Lakshminarayanan et al. 2017).
- ``weighted_average``: convex combination with given weights, or weights from
  each member's validation mIoU (``weights_from_miou``).
- ``majority_vote``: a pixel gets the class that *more than half* of the
  members predict; otherwise the ``reject_label`` (use the ignore index so the
  metrics skip it), and the share of rejected pixels is returned.
- ``plurality_vote``: the class with the most votes; ties go to the tied class
  with the highest mean probability (then the lowest index).
- ``Stacker``: a meta-learner (multinomial logistic regression, or a small
  network of 1x1 convolutions = per-pixel dense layers) trained on the
  members' per-pixel probabilities of a *held-out* split (Wolpert 1992). It
  must be evaluated on another split: fit on the split the members were
  selected on, or evaluated on its own fit split, it overfits (it sees the
  members' errors on exactly those pixels), so ``fit_stacker`` warns with
  ``StackingOverfitWarning`` and ``overfit_gap`` compares fit and evaluation
  accuracy.
- Snapshot ensembles (Huang et al., ICLR 2017) are ``average`` over the
  cycle-end checkpoints of one SGDR run; ``jseg.ensemble`` loads them.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np

RULES = ("average", "weighted", "majority", "plurality", "stacking")
STACKERS = ("logreg", "conv1x1")


class StackingOverfitWarning(UserWarning):
  """A stacking meta-learner may be overfitting its fit pixels."""


def as_members(probs: Any) -> np.ndarray:
  """``(M, ..., K)`` float32 array from an array or a list of equal-shape arrays."""
  if isinstance(probs, (list, tuple)):
    shapes = {np.shape(p) for p in probs}
    if len(shapes) != 1:
      raise ValueError(f"Ensemble members have different shapes {sorted(shapes)}; they must be equal.")
    probs = np.stack([np.asarray(p) for p in probs])
  probs = np.asarray(probs, np.float32)
  if probs.ndim < 2 or probs.shape[0] < 1:
    raise ValueError(f"probs must be (M, ..., K) with M >= 1 members; got shape {probs.shape}.")
  return probs


def average(probs: Any) -> np.ndarray:
  """Mean probability over members: ``(..., K)``."""
  return as_members(probs).mean(0)


def weighted_average(probs: Any, weights: Sequence[float]) -> np.ndarray:
  """``sum_m w_m p_m / sum_m w_m`` with non-negative weights, one per member."""
  p = as_members(probs)
  w = np.asarray(weights, np.float64)
  if w.shape != (p.shape[0],):
    raise ValueError(f"{len(w)} weight(s) {w.tolist()} for {p.shape[0]} ensemble members.")
  if np.any(w < 0) or not w.sum() > 0:
    raise ValueError(f"Ensemble weights must be >= 0 with a positive sum; got {w.tolist()}.")
  w = w / w.sum()
  return np.tensordot(w.astype(np.float32), p, axes=(0, 0))


def weights_from_miou(mious: Sequence[float], power: float = 1.0) -> np.ndarray:
  """Weights proportional to ``mIoU ** power`` (validation mIoU of each member),
  normalised to sum 1; ``power`` > 1 favours the better members more."""
  m = np.asarray(mious, np.float64)
  if m.ndim != 1 or len(m) == 0 or np.any(~np.isfinite(m)) or np.any(m < 0):
    raise ValueError(f"mIoUs must be finite and >= 0, one per member; got {list(mious)}.")
  w = m**power
  if not w.sum() > 0:
    raise ValueError(f"All member mIoUs are 0 ({list(mious)}); cannot weight by them.")
  return w / w.sum()


def _votes(labels: np.ndarray, k: int) -> np.ndarray:
  """``(..., K)`` vote counts from member label maps ``(M, ...)``."""
  return (labels[..., None] == np.arange(k)).sum(0)


def member_labels(probs: Any) -> np.ndarray:
  """Each member's argmax label map ``(M, ...)``."""
  return as_members(probs).argmax(-1)


def majority_vote(probs: Any, reject_label: int = 255) -> tuple[np.ndarray, float]:
  """Labels that more than half of the members agree on, else ``reject_label``.

  Returns ``(labels (...,) int32, reject_rate)``: the fraction of pixels rejected.
  """
  p = as_members(probs)
  m, k = p.shape[0], p.shape[-1]
  votes = _votes(p.argmax(-1), k)
  best = votes.argmax(-1)
  accepted = votes.max(-1) * 2 > m
  labels = np.where(accepted, best, reject_label).astype(np.int32)
  return labels, float(1.0 - accepted.mean())


def plurality_vote(probs: Any) -> np.ndarray:
  """The class with the most member votes; a tie goes to the tied class with
  the highest mean probability, then to the lowest class index."""
  p = as_members(probs)
  votes = _votes(p.argmax(-1), p.shape[-1])
  tied = votes == votes.max(-1, keepdims=True)
  score = np.where(tied, p.mean(0), -np.inf)
  return score.argmax(-1).astype(np.int32)


# ----------------------------------------------------------------------------
# Stacking.


def stack_features(probs: Any) -> np.ndarray:
  """Per-pixel meta-features ``(P, M*K)``: the members' probabilities side by side."""
  p = as_members(probs)
  m, k = p.shape[0], p.shape[-1]
  return np.moveaxis(p, 0, -2).reshape(-1, m * k)


@dataclasses.dataclass
class Stacker:
  """A fitted meta-learner; ``predict_proba(probs (M, ..., K)) -> (..., K)``."""

  method: str
  num_classes: int
  num_members: int
  fit_pixels: int
  fit_accuracy: float
  model: Any

  def predict_proba(self, probs: Any) -> np.ndarray:
    p = as_members(probs)
    if p.shape[0] != self.num_members or p.shape[-1] != self.num_classes:
      raise ValueError(
          f"Stacker was fit on {self.num_members} members x {self.num_classes} classes; "
          f"got probs of shape {p.shape}."
      )
    x = stack_features(p)
    out = np.zeros((x.shape[0], self.num_classes), np.float32)
    for s in range(0, len(x), 1 << 18):  # bounded memory on big maps
      out[s : s + (1 << 18)] = self._proba(x[s : s + (1 << 18)])
    return out.reshape(p.shape[1:])

  def _proba(self, x: np.ndarray) -> np.ndarray:
    if self.method == "logreg":
      # sklearn drops classes absent from the fit pixels; put them back as 0.
      out = np.zeros((len(x), self.num_classes), np.float32)
      out[:, self.model.classes_] = self.model.predict_proba(x)
      return out
    params, apply = self.model
    return np.asarray(apply(params, x))


def fit_stacker(
    probs: Any,
    labels: Any,
    method: str = "logreg",
    ignore_index: int = 255,
    max_pixels: int = 200_000,
    seed: int = 0,
    hidden: int = 32,
    steps: int = 300,
    learning_rate: float = 0.01,
    l2: float = 1e-4,
) -> Stacker:
  """Fits a meta-learner on held-out per-pixel member probabilities.

  Args:
    probs: ``(M, N, H, W, K)`` member probabilities on the held-out split.
    labels: ``(N, H, W)`` ground truth; ``ignore_index`` pixels are skipped.
    method: ``logreg`` (scikit-learn multinomial logistic regression, L2 with
      ``C = 1 / (l2 * pixels)``) or ``conv1x1`` (1x1 conv -> ReLU -> 1x1 conv
      with ``hidden`` channels, full-batch Adam for ``steps`` steps in JAX).
    max_pixels: pixels sampled uniformly (without replacement) for fitting.
  """
  if method not in STACKERS:
    raise ValueError(f"Unknown stacking meta-learner '{method}'; choose one of {', '.join(STACKERS)}.")
  p = as_members(probs)
  y = np.asarray(labels).reshape(-1)
  m, k = p.shape[0], p.shape[-1]
  if p.shape[1:-1] != np.shape(labels):
    raise ValueError(f"Stacking labels have shape {np.shape(labels)}; probs give {p.shape[1:-1]}.")
  x = stack_features(p)
  keep = np.flatnonzero((y != ignore_index) & (y >= 0) & (y < k))
  if len(keep) == 0:
    raise ValueError("No labelled pixels to fit the stacking meta-learner on.")
  rng = np.random.default_rng(seed)
  if len(keep) > max_pixels:
    keep = rng.choice(keep, max_pixels, replace=False)
  x, y = x[keep], y[keep].astype(np.int32)
  if method == "logreg":
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=500)
    model.fit(x, y)
  else:
    model = _fit_conv1x1(x, y, k, hidden, steps, learning_rate, l2, seed)
  st = Stacker(method, k, m, len(y), 0.0, model)
  st.fit_accuracy = float((st._proba(x).argmax(-1) == y).mean())
  if len(y) < 50 * m * k:
    warnings.warn(
        f"Stacking meta-learner ({method}) fit on only {len(y)} pixels for {m * k} inputs: "
        "expect overfitting; evaluate it on a split it was not fit on.",
        StackingOverfitWarning, stacklevel=2,
    )
  return st


def _fit_conv1x1(x, y, k, hidden, steps, lr, l2, seed):
  import jax
  import jax.numpy as jnp
  import optax
  from flax import linen as nn

  class Meta(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv on per-pixel features (a per-pixel MLP)."""

    @nn.compact
    def __call__(self, f):
      f = f[:, None, None, :]  # pixels as a batch of 1x1 images
      f = nn.relu(nn.Conv(hidden, (1, 1), name="conv1")(f))
      return nn.Conv(k, (1, 1), name="conv2")(f)[:, 0, 0]

  net = Meta()
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  params = net.init(jax.random.PRNGKey(seed), xj[:1])
  tx = optax.adamw(lr, weight_decay=l2)

  @jax.jit
  def train(params):
    def loss(pr):
      return optax.softmax_cross_entropy_with_integer_labels(net.apply(pr, xj), yj).mean()

    def step(carry, _):
      pr, st = carry
      g = jax.grad(loss)(pr)
      upd, st = tx.update(g, st, pr)
      return (optax.apply_updates(pr, upd), st), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params

  params = train(params)
  apply = jax.jit(lambda pr, f: jax.nn.softmax(net.apply(pr, f), -1))
  return params, apply


def overfit_gap(stacker: Stacker, eval_accuracy: float, tolerance: float = 0.02) -> float:
  """``fit_accuracy - eval_accuracy``; warns (``StackingOverfitWarning``) when the
  meta-learner is more than ``tolerance`` better on its fit pixels."""
  gap = stacker.fit_accuracy - float(eval_accuracy)
  if gap > tolerance:
    warnings.warn(
        f"Stacking meta-learner: pixel accuracy {100 * stacker.fit_accuracy:.2f}% on its fit split "
        f"vs {100 * eval_accuracy:.2f}% on the evaluation split ({100 * gap:.2f} points): overfitting.",
        StackingOverfitWarning, stacklevel=2,
    )
  return gap


def combine(rule: str, probs: Any, weights: Sequence[float] | None = None,
            stacker: Stacker | None = None, reject_label: int = 255) -> tuple[np.ndarray, dict]:
  """Applies ``rule`` and returns ``(labels, extras)``; ``extras`` holds the
  ``reject_rate`` for ``majority``."""
  if rule == "average":
    return average(probs).argmax(-1).astype(np.int32), {}
  if rule == "weighted":
    if weights is None:
      raise ValueError("Ensemble rule 'weighted' needs weights (given, or from validation mIoU).")
    return weighted_average(probs, weights).argmax(-1).astype(np.int32), {}
  if rule == "majority":
    labels, rate = majority_vote(probs, reject_label)
    return labels, {"reject_rate": rate}
  if rule == "plurality":
    return plurality_vote(probs), {}
  if rule == "stacking":
    if stacker is None:
      raise ValueError("Ensemble rule 'stacking' needs a fitted Stacker (fit_stacker).")
    return stacker.predict_proba(probs).argmax(-1).astype(np.int32), {}
  raise ValueError(f"Unknown ensemble rule '{rule}'; choose one of {', '.join(RULES)}.")


# ----------------------------------------------------------------------------
# Evaluating an ensemble of networks over a split (the library side of
# ``python -m jseg.ensemble``).


def member_probs(apply_fns: Sequence[Any], image: np.ndarray, infer_cfg: Any) -> np.ndarray:
  """``(M, H, W, K)`` probabilities of one normalised image ``(H, W, C)`` from
  each member's ``apply_fn`` through ``jseg.inference.predict_logits``."""
  from jseg import inference

  return np.stack([np.exp(inference.predict_logits(f, image[None], infer_cfg)[0]) for f in apply_fns])


def _cm(pred: np.ndarray, label: np.ndarray, k: int, ignore_index: int) -> np.ndarray:
  from jseg import metrics

  return np.asarray(metrics.confusion_matrix(np.asarray(pred), np.asarray(label), k, ignore_index), np.int64)


def evaluate_ensemble(
    apply_fns: Sequence[Any],
    eval_examples: Any,
    num_classes: int,
    ignore_index: int = 255,
    rules: Sequence[str] = ("average", "weighted", "majority", "plurality"),
    infer_cfg: Any = None,
    fit_examples: Any = None,
    weights: Sequence[float] | None = None,
    stacker: str = "logreg",
    max_fit_pixels: int = 200_000,
    seed: int = 0,
) -> dict[str, Any]:
  """Confusion matrices of every member and every rule on ``eval_examples``.

  ``fit_examples`` (a held-out split; examples ``{"image", "label"}``) are used
  to fit the stacking meta-learner and, when ``weights`` is None, to weight
  members by their mIoU there. Returns ``{"members": [cm, ...], "rules": {rule:
  cm}, "reject_rate": float, "weights": [...], "fit_member_miou": [...],
  "stacking": {fit_accuracy, eval_accuracy, gap}}`` (int64 matrices).
  """
  from jseg import metrics

  for r in rules:
    if r not in RULES:
      raise ValueError(f"Unknown ensemble rule '{r}'; choose from {', '.join(RULES)}.")
  m, k = len(apply_fns), num_classes
  out: dict[str, Any] = {}
  need_fit = "stacking" in rules or ("weighted" in rules and weights is None)
  st = None
  if need_fit:
    if fit_examples is None:
      raise ValueError("Rules 'stacking' and 'weighted' without weights need a held-out fit split.")
    rng = np.random.default_rng(seed)
    fit_cms = [np.zeros((k, k), np.int64) for _ in range(m)]
    xs, ys = [], []
    examples = list(fit_examples) if not hasattr(fit_examples, "__len__") else fit_examples
    per_image = max(1, max_fit_pixels // max(len(examples), 1))
    for ex in examples:
      p = member_probs(apply_fns, ex["image"], infer_cfg)
      y = np.asarray(ex["label"])
      for i in range(m):
        fit_cms[i] += _cm(p[i].argmax(-1), y, k, ignore_index)
      if "stacking" in rules:
        idx = np.flatnonzero(y.reshape(-1) != ignore_index)
        idx = rng.choice(idx, min(per_image, len(idx)), replace=False)
        xs.append(p.reshape(m, -1, k)[:, idx])
        ys.append(y.reshape(-1)[idx])
    out["fit_member_miou"] = [float(metrics.summarize(c)["miou"]) for c in fit_cms]
    if weights is None and "weighted" in rules:
      weights = list(weights_from_miou(out["fit_member_miou"]))
    if "stacking" in rules:
      st = fit_stacker(np.concatenate(xs, axis=1), np.concatenate(ys), stacker,
                       ignore_index, max_fit_pixels, seed)
  out["weights"] = None if weights is None else [float(w) for w in weights]
  member_cms = [np.zeros((k, k), np.int64) for _ in range(m)]
  rule_cms = {r: np.zeros((k, k), np.int64) for r in rules}
  rejected = total = 0
  for ex in eval_examples:
    p = member_probs(apply_fns, ex["image"], infer_cfg)
    y = np.asarray(ex["label"])
    for i in range(m):
      member_cms[i] += _cm(p[i].argmax(-1), y, k, ignore_index)
    for r in rules:
      labels, extra = combine(r, p, weights, st, reject_label=ignore_index)
      rule_cms[r] += _cm(labels, y, k, ignore_index)
      if r == "majority":
        rejected += extra["reject_rate"] * y.size
        total += y.size
  out["members"] = member_cms
  out["rules"] = rule_cms
  if "majority" in rules:
    out["reject_rate"] = rejected / max(total, 1)
  if st is not None:
    ev_acc = float(metrics.summarize(rule_cms["stacking"])["pixel_accuracy"])
    out["stacking"] = {"method": st.method, "fit_pixels": st.fit_pixels,
                       "fit_accuracy": st.fit_accuracy, "eval_accuracy": ev_acc,
                       "gap": overfit_gap(st, ev_acc)}
  return out
