"""Segmentation metrics, all derived from one confusion matrix.

``confusion_matrix`` (jittable) counts pixels per (ground truth, prediction) pair;
matrices add across batches, devices (``jax.lax.psum``) and hosts, so a whole
evaluation is one matrix and every metric is computed once from it by
``summarize`` (never an average of per-batch scores).

Absent classes: every per-class ratio is NaN when its denominator is 0 (IoU and F1
of a class absent from both ground truth and prediction; recall/accuracy of a class
with no ground-truth pixels; precision of a class never predicted), and class means
(mIoU, mean accuracy, ...) are NaN-excluded means. This is MMSegmentation's
convention (``total_area_to_metrics`` + ``np.nanmean``). ``absent="zero"`` instead
counts undefined ratios as 0 and includes them in the means, which is scikit-learn's
``jaccard_score``/``f1_score``/... with ``labels=range(K), average='macro',
zero_division=0``.

``boundary_counts``/``boundary_f1``: the boundary F1 (BF) score of Csurka et al.
(BMVC 2013) with a tolerance in pixels, in NumPy/SciPy on the host.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CLASS_KEYS = ("iou", "accuracy", "precision", "recall", "f1", "tp", "fp", "fn", "tn", "support")


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int, ignore_index: int = 255,
                     method: str = "bincount") -> jax.Array:
  """(K, K) int32 pixel counts; rows are ground truth, columns predictions.

  ``pred`` is a class map with the shape of ``label`` (any leading dims), or scores
  with one extra trailing axis of size K (argmax is taken). Pixels whose label is
  ``ignore_index`` or outside ``[0, K)``, or whose prediction is outside ``[0, K)``,
  are not counted. ``method``: ``bincount`` (one scatter-add of ``K*y + p``) or
  ``onehot`` (``onehot(y)^T @ onehot(p)`` as a bf16 matmul with float32 accumulation,
  exact below 2^24 pixels per call; for accelerators whose scatter-add is slow).
  Counts are int32: add per-batch matrices into an int64 NumPy array on the
  host when an evaluation covers more than 2^31 pixels.
  """
  k = int(num_classes)
  if k < 1:
    raise ValueError(f"num_classes must be >= 1; got {num_classes}.")
  if pred.ndim == label.ndim + 1 and pred.shape[-1] == k:
    pred = jnp.argmax(pred, axis=-1)
  if tuple(pred.shape) != tuple(label.shape):
    raise ValueError(
        f"confusion_matrix: pred shape {tuple(pred.shape)} does not match label shape "
        f"{tuple(label.shape)} (pred may also be scores with a trailing axis of {k}).")
  pred = pred.astype(jnp.int32).reshape(-1)
  label = label.astype(jnp.int32).reshape(-1)
  valid = (label != ignore_index) & (label >= 0) & (label < k) & (pred >= 0) & (pred < k)
  if method == "bincount":
    idx = jnp.where(valid, label * k + pred, k * k)
    return jnp.bincount(idx, length=k * k + 1)[: k * k].reshape(k, k).astype(jnp.int32)
  if method == "onehot":
    # float32 accumulation counts exactly up to 2^24, so larger inputs are refused.
    if label.size >= 2**24:
      raise ValueError(
          f"confusion_matrix method 'onehot' counts exactly only below 2^24 pixels per call; got "
          f"{label.size}. Use method='bincount' or split the batch.")
    y = jax.nn.one_hot(jnp.where(valid, label, -1), k, dtype=jnp.bfloat16)
    p = jax.nn.one_hot(pred, k, dtype=jnp.bfloat16)
    cm = jnp.einsum("pi,pj->ij", y, p, preferred_element_type=jnp.float32)
    return cm.astype(jnp.int32)
  raise ValueError(f"Unknown confusion_matrix method '{method}'. Valid methods: bincount, onehot.")


def _ratio(num: np.ndarray, den: np.ndarray, absent: str) -> np.ndarray:
  with np.errstate(divide="ignore", invalid="ignore"):
    r = num / den
  return np.where(den > 0, r, np.nan if absent == "nan" else 0.0)


def summarize(cm: Any, absent: str = "nan") -> dict[str, Any]:
  """Every metric from a (K, K) confusion matrix (rows = ground truth).

  Returns floats ``pixel_accuracy``, ``mean_accuracy`` (class-averaged recall),
  ``fw_accuracy`` (frequency-weighted accuracy ``sum_c f_c acc_c`` with ``f_c`` the
  ground-truth share of class c: algebraically the pixel accuracy, kept because
  papers report it), ``miou``, ``fwiou`` (``sum_c f_c IoU_c``, Long et al. CVPR 2015),
  ``mean_precision``, ``mean_recall``, ``mean_f1`` (= ``mean_dice``: per-pixel F1 and
  Dice are the same number), ``total`` (pixels counted) and ``num_classes``; and
  per-class float64 arrays ``iou, accuracy (= recall), precision, recall, f1`` and int64
  ``tp, fp, fn, tn, support``. See the module doc for ``absent`` (``"nan"`` or
  ``"zero"``). An empty matrix gives NaN scalars.
  """
  if absent not in ("nan", "zero"):
    raise ValueError(f"summarize: absent must be 'nan' or 'zero'; got {absent!r}.")
  cm = np.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"summarize: confusion matrix must be (K, K); got shape {cm.shape}.")
  cm = cm.astype(np.int64)
  total = int(cm.sum())
  tp = np.diag(cm)
  support = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
  fp = predicted - tp
  fn = support - tp
  tn = total - tp - fp - fn
  f = lambda a: a.astype(np.float64)
  iou = _ratio(f(tp), f(tp + fp + fn), absent)
  recall = _ratio(f(tp), f(support), absent)
  precision = _ratio(f(tp), f(predicted), absent)
  f1 = _ratio(2.0 * tp, f(2 * tp + fp + fn), absent)

  def mean(a):
    return float(np.nanmean(a)) if np.any(~np.isnan(a)) else float("nan")

  freq = f(support) / total if total else np.full(cm.shape[0], np.nan)
  have = support > 0
  pixel_acc = float(tp.sum() / total) if total else float("nan")
  return {
      "pixel_accuracy": pixel_acc,
      "mean_accuracy": mean(recall),
      "fw_accuracy": float(np.sum(freq[have] * recall[have])) if total else float("nan"),
      "miou": mean(iou),
      "fwiou": float(np.sum(freq[have] * iou[have])) if total else float("nan"),
      "mean_precision": mean(precision),
      "mean_recall": mean(recall),
      "mean_f1": mean(f1),
      "mean_dice": mean(f1),
      "total": total,
      "num_classes": int(cm.shape[0]),
      "iou": iou,
      "accuracy": recall,
      "precision": precision,
      "recall": recall,
      "f1": f1,
      "tp": tp,
      "fp": fp,
      "fn": fn,
      "tn": tn,
      "support": support,
  }


def _pct(x: float) -> str:
  return "   -  " if np.isnan(x) else f"{100.0 * x:6.2f}"


def format_table(summary: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
  """Per-class table (IoU, accuracy, precision, F1 in %, support) and the summary lines.

  NaN entries (undefined for an absent class) print as ``-``.
  """
  k = int(summary["num_classes"])
  if class_names is None:
    class_names = [str(i) for i in range(k)]
  if len(class_names) != k:
    raise ValueError(f"format_table: {len(class_names)} class names for {k} classes.")
  w = max(5, max(len(str(n)) for n in class_names))
  head = f"{'class':<{w}}  {'IoU':>6}  {'Acc':>6}  {'Prec':>6}  {'F1':>6}  {'support':>12}"
  lines = [head, "-" * len(head)]
  for i, name in enumerate(class_names):
    lines.append(
        f"{str(name):<{w}}  {_pct(summary['iou'][i])}  {_pct(summary['accuracy'][i])}  "
        f"{_pct(summary['precision'][i])}  {_pct(summary['f1'][i])}  {int(summary['support'][i]):>12d}")
  lines.append("-" * len(head))
  for key, label in (("miou", "mIoU"), ("mean_accuracy", "mean accuracy"),
                     ("pixel_accuracy", "pixel accuracy"), ("fwiou", "FWIoU"),
                     ("mean_f1", "mean F1 (Dice)"), ("mean_precision", "mean precision")):
    lines.append(f"{label:<16}{_pct(summary[key])}")
  lines.append(f"{'pixels':<16}{int(summary['total']):>6d}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- boundary F1


def _boundary(mask: np.ndarray) -> np.ndarray:
  """Pixels of ``mask`` with a 4-neighbour outside it (image border is not a boundary)."""
  m = np.pad(mask, 1, mode="edge")
  inner = m[1:-1, 1:-1]
  return inner & ~(m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:])


def boundary_counts(pred: Any, label: Any, num_classes: int, ignore_index: int = 255,
                    tolerance: float = 2.0) -> np.ndarray:
  """Additive (K, 4) boundary counts ``[pred_matched, pred_total, gt_matched, gt_total]``.

  For each image and class c the boundary of ``pred == c`` and of ``label == c`` are
  found (pixels with a 4-neighbour of another value). A predicted boundary pixel is
  matched when a ground-truth boundary pixel of c lies within ``tolerance`` pixels
  (Euclidean), and vice versa. Predicted boundary pixels on ignored ground truth are
  not counted (they cannot be judged). ``pred``/``label``: (H, W) or (N, H, W).
  Sum the counts over batches, then call ``boundary_summary``.
  """
  from scipy import ndimage

  pred = np.asarray(pred)
  label = np.asarray(label)
  if pred.shape != label.shape or pred.ndim not in (2, 3):
    raise ValueError(
        f"boundary_counts: pred {pred.shape} and label {label.shape} must be equal (H, W) or (N, H, W).")
  if pred.ndim == 2:
    pred, label = pred[None], label[None]
  out = np.zeros((num_classes, 4), np.int64)
  for p_img, y_img in zip(pred, label):
    judged = y_img != ignore_index
    for c in np.union1d(np.unique(p_img[judged]), np.unique(y_img[judged])):
      if c < 0 or c >= num_classes:
        continue
      pb = _boundary(p_img == c) & judged
      gb = _boundary(y_img == c)
      n_p, n_g = int(pb.sum()), int(gb.sum())
      if n_p and n_g:
        near_g = ndimage.distance_transform_edt(~gb) <= tolerance
        near_p = ndimage.distance_transform_edt(~pb) <= tolerance
        out[c] += (int((pb & near_g).sum()), n_p, int((gb & near_p).sum()), n_g)
      else:
        out[c] += (0, n_p, 0, n_g)
  return out


def boundary_summary(counts: Any) -> dict[str, Any]:
  """Per-class boundary precision/recall/F1 and their NaN-excluded means from counts."""
  c = np.asarray(counts, np.float64)
  precision = _ratio(c[:, 0], c[:, 1], "nan")
  recall = _ratio(c[:, 2], c[:, 3], "nan")
  with np.errstate(invalid="ignore"):
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
  # A class with boundaries on one side only scores 0; with none on either side, NaN.
  f1 = np.where((c[:, 1] + c[:, 3]) > 0, np.nan_to_num(f1), np.nan)
  mean = float(np.nanmean(f1)) if np.any(~np.isnan(f1)) else float("nan")
  return {"bf_precision": precision, "bf_recall": recall, "bf_f1": f1, "mean_bf": mean}


def boundary_f1(pred: Any, label: Any, num_classes: int, ignore_index: int = 255,
                tolerance: float = 2.0) -> dict[str, Any]:
  """Boundary F1 (BF score, Csurka et al. BMVC 2013) pooled over the given images."""
  return boundary_summary(boundary_counts(pred, label, num_classes, ignore_index, tolerance))
