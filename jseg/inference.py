"""Test-time inference: whole image, sliding window, multi-scale with flip.

``predict_logits(apply_fn, images, infer_cfg)`` turns a network's
``apply_fn(batch) -> logits`` into per-pixel **log-probabilities** at each
image's original size, in one of three modes read from ``config.inference``:

- ``whole``: the image goes through the network in one piece.
- ``slide``: overlapping ``crop_size`` windows every ``stride`` pixels (window
  placement as MMSegmentation's ``slide_inference``: the last window in a row
  or column is shifted back to end at the border); overlapping logits are
  blended with equal weights (``blend='average'``) or with a Gaussian centred
  on each window (``blend='gaussian'``, sigma = ``gaussian_sigma`` x crop size,
  nnU-Net's 1/8; Isensee et al. 2021) so window borders, where the network
  sees the least context, count less.
- ``multiscale``: the image is resized by each factor in ``scales`` (e.g.
  0.5-1.75 as in PSPNet/DeepLab evaluation); each pass runs as ``ms_window``
  (``whole`` or ``slide``); logits are resized back to the original size and
  the softmax probabilities of all passes are averaged.

``flip=True`` adds the horizontally flipped image to every pass (flip
test-time augmentation); its output is flipped back before averaging.

Compilation: every shape the network sees is *bucketed*. Images are
zero-padded (zero = the mean colour after standardisation) on the bottom and
right to a multiple of ``bucket`` pixels, sliding windows all have
``crop_size``, and model batches are padded to ``batch_size``; resizes and
flips are matrix products with interpolation matrices built on the host and
zero-padded to the buckets. So a folder of images of many sizes compiles the
network once per bucket, not once per image. Bucketing is off by default
(``bucket=0``: exact sizes, one compilation per distinct size) because padding
changes predictions wherever the network's receptive field reaches the padded
border, and for networks with global context (PSPNet's 1x1 pyramid bin,
DeepLab v3's image pooling) that is every pixel: on the CamVid sample the
default PSPNet run scored mIoU 28.5 exactly and 26.6 with ``bucket=64``
(360 -> 384 rows of padding). Turn it on for folders of many sizes.

Output: ``log p`` with ``p`` the prediction's class probabilities (for a
single pass ``log_softmax(logits)``, else the log of the averaged
probabilities). ``argmax`` gives the label map, ``exp`` the probabilities
(what ``jseg.crf`` and ``jseg.ensembles`` take).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jseg import compiling

ApplyFn = Callable[[jax.Array], jax.Array]

MODES = ("whole", "slide", "multiscale")
BLENDS = ("average", "gaussian")


def default_config() -> ml_collections.ConfigDict:
  """Every field of ``config.inference`` with its default."""
  c = ml_collections.ConfigDict()
  c.mode = "whole"  # whole | slide | multiscale
  c.batch_size = 1  # images or windows per network call (pad the last batch)
  c.bucket = 0  # pad H and W up to a multiple of this (0 = exact sizes; see module doc)
  c.crop_size = (256, 256)  # slide: window (h, w)
  c.stride = (171, 171)  # slide: step between windows (h, w); <= crop_size
  c.blend = "average"  # slide: average | gaussian
  c.gaussian_sigma = 0.125  # slide, gaussian blend: sigma as a fraction of crop size
  c.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # multiscale: resize factors
  c.ms_window = "whole"  # multiscale: how each scaled pass runs (whole | slide)
  c.flip = False  # add horizontal-flip test-time augmentation
  from jseg import crf  # dense CRF post-processing, off by default

  c.crf = crf.default_config()
  return c


@dataclasses.dataclass(frozen=True)
class Settings:
  """Validated inference settings (see ``default_config`` for meanings)."""

  mode: str
  batch_size: int
  bucket: int
  crop_size: tuple[int, int]
  stride: tuple[int, int]
  blend: str
  gaussian_sigma: float
  scales: tuple[float, ...]
  ms_window: str
  flip: bool


def settings(infer_cfg: Any = None) -> Settings:
  """Reads ``config.inference`` (ConfigDict, dict or None), filling defaults and
  raising on values that are not accepted."""
  d = default_config().to_dict()
  if infer_cfg is not None:
    given = infer_cfg.to_dict() if hasattr(infer_cfg, "to_dict") else dict(infer_cfg)
    d.update({k: v for k, v in given.items() if k in d and v is not None})
  if d["mode"] not in MODES:
    raise ValueError(f"config.inference.mode='{d['mode']}' is not one of {', '.join(MODES)}.")
  if d["ms_window"] not in ("whole", "slide"):
    raise ValueError(f"config.inference.ms_window='{d['ms_window']}' is not one of whole, slide.")
  if d["blend"] not in BLENDS:
    raise ValueError(f"config.inference.blend='{d['blend']}' is not one of {', '.join(BLENDS)}.")
  crop, stride = _pair(d["crop_size"], "crop_size"), _pair(d["stride"], "stride")
  if any(s > c for s, c in zip(stride, crop)):
    raise ValueError(
        f"config.inference.stride={stride} is larger than crop_size={crop}: windows would leave gaps."
    )
  if int(d["batch_size"]) < 1:
    raise ValueError(f"config.inference.batch_size={d['batch_size']} must be >= 1.")
  if int(d["bucket"]) < 0:
    raise ValueError(f"config.inference.bucket={d['bucket']} must be >= 0 (0 = no bucketing).")
  scales = tuple(float(s) for s in d["scales"])
  if not scales or min(scales) <= 0:
    raise ValueError(f"config.inference.scales={d['scales']} must be a non-empty list of positive factors.")
  if not d["gaussian_sigma"] > 0:
    raise ValueError(f"config.inference.gaussian_sigma={d['gaussian_sigma']} must be > 0.")
  return Settings(
      mode=d["mode"], batch_size=int(d["batch_size"]), bucket=int(d["bucket"]), crop_size=crop,
      stride=stride, blend=d["blend"], gaussian_sigma=float(d["gaussian_sigma"]), scales=scales,
      ms_window=d["ms_window"], flip=bool(d["flip"]),
  )


def _pair(v: Any, name: str) -> tuple[int, int]:
  t = (int(v), int(v)) if np.isscalar(v) else tuple(int(x) for x in v)
  if len(t) != 2 or min(t) < 1:
    raise ValueError(f"config.inference.{name}={v} must be one positive int or an (h, w) pair.")
  return t


def make_apply_fn(model: Any, variables: Any,
                  compiler_options: dict[str, Any] | None = None) -> ApplyFn:
  """``batch -> logits`` for a jseg model in eval mode, jitted once; the
  variables are an argument (not baked into the compiled program as constants).
  ``compiler_options``: XLA options for each input shape's program
  (``trainer.eval_compiler_options``); None: XLA's defaults."""
  fn = compiling.OnCall(jax.jit(lambda v, x: model.apply(v, x, train=False)[0]), compiler_options)
  return lambda x: fn(variables, x)


def predict_logits(
    apply_fn: ApplyFn,
    images: np.ndarray | Sequence[np.ndarray],
    infer_cfg: Any = None,
    raw_images: np.ndarray | Sequence[np.ndarray] | None = None,
) -> np.ndarray | list[np.ndarray]:
  """Per-pixel log-probabilities of ``images`` at their original size.

  Args:
    apply_fn: ``(B, h, w, C) float32 -> (B, h, w, K)`` logits, e.g. from
      ``make_apply_fn``; called only with ``B = batch_size`` and bucketed h, w.
    images: normalised float images, one ``(N, H, W, C)`` array or a list of
      ``(H, W, C)`` arrays of any sizes (grouped by size internally).
    infer_cfg: ``config.inference`` (see ``default_config``) or None.
    raw_images: the same images unnormalised (0..255), needed only when
      ``infer_cfg.crf.enabled``: the dense CRF (``jseg.crf``) then refines
      each prediction and its log-marginals are returned.

  Returns:
    float32 NumPy log-probabilities, ``(N, H, W, K)`` for an array input or a
    list of ``(H, W, K)`` for a list input.
  """
  s = settings(infer_cfg)
  crf_cfg = _crf_block(infer_cfg)
  if crf_cfg is not None:
    if raw_images is None:
      raise ValueError(
          "config.inference.crf.enabled is True: pass raw_images (the unnormalised images) "
          "to predict_logits so the CRF can use their colours.")
    from jseg import crf

    out = predict_logits(apply_fn, images, {k: v for k, v in _as_dict(infer_cfg).items() if k != "crf"})
    cfg = {k: v for k, v in crf_cfg.items() if k != "enabled"}
    refined = [crf.dense_crf(lp, raw, cfg) for lp, raw in zip(out, raw_images)]
    return refined if isinstance(out, list) else np.stack(refined)
  if isinstance(images, (list, tuple)):
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
      if np.ndim(im) != 3:
        raise ValueError(f"images[{i}] has shape {np.shape(im)}; expected (H, W, C).")
      groups.setdefault(tuple(np.shape(im)), []).append(i)
    out: list[Any] = [None] * len(images)
    for idx in groups.values():
      res = _predict_same_size(apply_fn, np.stack([np.asarray(images[i]) for i in idx]), s)
      for j, i in enumerate(idx):
        out[i] = res[j]
    return out
  if np.ndim(images) != 4:
    raise ValueError(f"images has shape {np.shape(images)}; expected (N, H, W, C) or a list of (H, W, C).")
  return _predict_same_size(apply_fn, np.asarray(images), s)


def _as_dict(cfg: Any) -> dict:
  if cfg is None:
    return {}
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _crf_block(infer_cfg: Any) -> dict | None:
  """``config.inference.crf`` as a dict when present and enabled, else None."""
  block = _as_dict(infer_cfg).get("crf")
  if block is None:
    return None
  block = _as_dict(block)
  return block if block.get("enabled", False) else None


def crf_enabled(infer_cfg: Any) -> bool:
  """Whether ``config.inference`` turns the dense CRF on."""
  return _crf_block(infer_cfg) is not None


def needs_host_inference(infer_cfg: Any) -> bool:
  """True unless inference is a plain whole-image pass (which the trainer's
  on-device evaluator does without this module)."""
  if infer_cfg is None:
    return False
  d = _as_dict(infer_cfg)
  return d.get("mode", "whole") != "whole" or bool(d.get("flip", False)) or crf_enabled(infer_cfg)


def predict_labels(apply_fn: ApplyFn, images: Any, infer_cfg: Any = None, raw_images: Any = None) -> Any:
  """``argmax`` of ``predict_logits``: int32 label maps in the same structure."""
  lp = predict_logits(apply_fn, images, infer_cfg, raw_images)
  if isinstance(lp, list):
    return [np.argmax(x, -1).astype(np.int32) for x in lp]
  return np.argmax(lp, -1).astype(np.int32)


def passes(s: Settings) -> list[tuple[float, bool]]:
  """The (scale, flipped) passes a setting runs."""
  scales = s.scales if s.mode == "multiscale" else (1.0,)
  flips = (False, True) if s.flip else (False,)
  return [(sc, f) for sc in scales for f in flips]


def _bucket(n: int, b: int) -> int:
  return n if b <= 0 else -(-n // b) * b


def _predict_same_size(apply_fn: ApplyFn, x: np.ndarray, s: Settings) -> np.ndarray:
  n, H, W, C = x.shape
  HB, WB = _bucket(H, s.bucket), _bucket(W, s.bucket)
  xb = np.zeros((n, HB, WB, C), np.float32)
  xb[:, :H, :W] = x
  xb = jnp.asarray(xb)
  window = {"whole": "whole", "slide": "slide", "multiscale": s.ms_window}[s.mode]
  todo = passes(s)
  acc = None
  for scale, flip in todo:
    h, w = max(1, int(H * scale + 0.5)), max(1, int(W * scale + 0.5))
    hb, wb = _bucket(h, s.bucket), _bucket(w, s.bucket)
    if window == "slide":
      hb, wb = max(hb, s.crop_size[0]), max(wb, s.crop_size[1])
    same = (h, w, hb, wb) == (H, W, HB, WB) and not flip
    xs = xb if same else _matmul_resize(
        xb, interp_matrix(H, h, HB, hb), interp_matrix(W, w, WB, wb, flip))
    if window == "whole":
      logits = _run_batched(apply_fn, xs, s.batch_size)
    else:
      logits = _run_slide(apply_fn, xs, (h, w), s)
    if not same:
      # Back to the original size; the flip back is folded into the matrix.
      logits = _matmul_resize(
          logits, interp_matrix(h, H, hb, HB), interp_matrix(w, W, wb, WB, flip_out=flip))
    if len(todo) == 1:
      return np.asarray(_log_softmax(logits))[:, :H, :W]
    acc = _add_softmax(acc, logits) if acc is not None else _softmax(logits)
  return np.asarray(_log_mean(acc, float(len(todo))))[:, :H, :W]


def interp_matrix(
    n_in: int, n_out: int, pad_in: int | None = None, pad_out: int | None = None,
    flip: bool = False, flip_out: bool = False,
) -> np.ndarray:
  """``(pad_out, pad_in)`` matrix M with ``M[:n_out, :n_in] @ v`` = bilinear
  resize of ``v`` from ``n_in`` to ``n_out`` samples.

  Same weights as ``jax.image.resize(..., 'bilinear', antialias=False)``
  (half-pixel centres; ``torch`` ``align_corners=False``); rows and columns
  beyond ``n_out``/``n_in`` are zero, so padding is ignored and stays zero.
  ``flip`` mirrors the input (``v[::-1]`` first); ``flip_out`` mirrors the output.
  """
  pad_in = n_in if pad_in is None else pad_in
  pad_out = n_out if pad_out is None else pad_out
  inv = n_in / n_out
  sample = (np.arange(n_out, dtype=np.float64) + 0.5) * inv - 0.5
  wts = np.maximum(0.0, 1.0 - np.abs(sample[:, None] - np.arange(n_in, dtype=np.float64)[None, :]))
  tot = wts.sum(1, keepdims=True)
  wts = np.where(tot > 1000 * np.finfo(np.float32).eps, wts / np.where(tot != 0, tot, 1), 0.0)
  wts = np.where(((sample >= -0.5) & (sample <= n_in - 0.5))[:, None], wts, 0.0)
  if flip:
    wts = wts[:, ::-1]
  if flip_out:
    wts = wts[::-1, :]
  m = np.zeros((pad_out, pad_in), np.float32)
  m[:n_out, :n_in] = wts
  return m


@jax.jit
def _matmul_resize(x: jax.Array, mh: jax.Array, mw: jax.Array) -> jax.Array:
  x = jnp.einsum("wW,nHWc->nHwc", mw, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("hH,nHwc->nhwc", mh, x, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _softmax(x: jax.Array) -> jax.Array:
  return jax.nn.softmax(x.astype(jnp.float32), axis=-1)


@jax.jit
def _add_softmax(acc: jax.Array, x: jax.Array) -> jax.Array:
  return acc + jax.nn.softmax(x.astype(jnp.float32), axis=-1)


@jax.jit
def _log_softmax(x: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)


@jax.jit
def _log_mean(acc: jax.Array, count: float) -> jax.Array:
  # Clamp so a class whose probability underflowed in every pass stays finite.
  return jnp.log(jnp.maximum(acc / count, jnp.finfo(jnp.float32).tiny))


def _run_batched(apply_fn: ApplyFn, x: jax.Array, batch_size: int) -> jax.Array:
  """``apply_fn`` over ``x`` in chunks of exactly ``batch_size`` (last one padded)."""
  n = x.shape[0]
  pad = (-n) % batch_size
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  outs = [apply_fn(x[i : i + batch_size]) for i in range(0, n + pad, batch_size)]
  if outs[0].ndim != 4 or tuple(outs[0].shape[:3]) != (batch_size,) + tuple(x.shape[1:3]):
    raise ValueError(
        f"apply_fn returned logits of shape {outs[0].shape} for input {x[:batch_size].shape}; "
        "expected (B, H, W, K) at the input resolution."
    )
  return jnp.concatenate(outs).astype(jnp.float32)[:n]


def slide_positions(
    h: int, w: int, crop: tuple[int, int], stride: tuple[int, int]
) -> np.ndarray:
  """Top-left corners ``(P, 2)`` of the windows covering an ``h x w`` image
  (MMSegmentation's ``slide_inference`` grid; windows start at 0 when the
  image is smaller than the crop)."""
  ch, cw = crop
  sh, sw = stride
  hg = max(h - ch + sh - 1, 0) // sh + 1
  wg = max(w - cw + sw - 1, 0) // sw + 1
  pos = []
  for i in range(hg):
    for j in range(wg):
      y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
      pos.append((max(y2 - ch, 0), max(x2 - cw, 0)))
  return np.asarray(pos, np.int32)


def blend_weights(crop: tuple[int, int], blend: str, sigma: float = 0.125) -> np.ndarray:
  """``(ch, cw)`` window weights: ones, or a separable Gaussian with peak 1
  and standard deviation ``sigma * crop`` along each axis."""
  if blend == "average":
    return np.ones(crop, np.float32)
  if blend != "gaussian":
    raise ValueError(f"blend='{blend}' is not one of {', '.join(BLENDS)}.")
  g = [np.exp(-0.5 * ((np.arange(c) - (c - 1) / 2) / (sigma * c)) ** 2) for c in crop]
  return np.outer(g[0], g[1]).astype(np.float32)


def _run_slide(apply_fn: ApplyFn, x: jax.Array, hw: tuple[int, int], s: Settings) -> jax.Array:
  n = x.shape[0]
  pos = slide_positions(hw[0], hw[1], s.crop_size, s.stride)
  p = len(pos)
  crops = _extract(x, jnp.asarray(pos), s.crop_size)  # (n * P, ch, cw, C), image-major
  logits = _run_batched(apply_fn, crops, s.batch_size)
  k = logits.shape[-1]
  logits = logits.reshape(n, p, s.crop_size[0], s.crop_size[1], k)
  # Pad the window count to a multiple of 8 with zero-weight windows so
  # images of nearby sizes share one compiled stitching program.
  p_pad = -(-p // 8) * 8
  valid = np.zeros(p_pad, np.float32)
  valid[:p] = 1
  pos = np.concatenate([pos, np.zeros((p_pad - p, 2), np.int32)])
  logits = jnp.pad(logits, ((0, 0), (0, p_pad - p), (0, 0), (0, 0), (0, 0)))
  wts = jnp.asarray(blend_weights(s.crop_size, s.blend, s.gaussian_sigma))
  return _stitch(logits, jnp.asarray(pos), jnp.asarray(valid), wts, x.shape[1:3])


@partial(jax.jit, static_argnums=(2,))
def _extract(x: jax.Array, pos: jax.Array, crop: tuple[int, int]) -> jax.Array:
  def one(p):
    return jax.lax.dynamic_slice(x, (0, p[0], p[1], 0), (x.shape[0], crop[0], crop[1], x.shape[3]))

  crops = jax.vmap(one, out_axes=1)(pos)  # (n, P, ch, cw, C)
  return crops.reshape((-1,) + crops.shape[2:])


@partial(jax.jit, static_argnums=(4,))
def _stitch(
    logits: jax.Array, pos: jax.Array, valid: jax.Array, wts: jax.Array, size: tuple[int, int]
) -> jax.Array:
  """Weighted average of window logits ``(n, P, ch, cw, K)`` placed at ``pos``."""
  n, p, ch, cw, k = logits.shape
  out = jnp.zeros((n, size[0], size[1], k), jnp.float32)
  norm = jnp.zeros((size[0], size[1]), jnp.float32)

  def body(i, carry):
    out, norm = carry
    y, x = pos[i, 0], pos[i, 1]
    w = wts * valid[i]
    cur = jax.lax.dynamic_slice(out, (0, y, x, 0), (n, ch, cw, k))
    out = jax.lax.dynamic_update_slice(out, cur + logits[:, i] * w[None, :, :, None], (0, y, x, 0))
    cur_n = jax.lax.dynamic_slice(norm, (y, x), (ch, cw))
    norm = jax.lax.dynamic_update_slice(norm, cur_n + w, (y, x))
    return out, norm

  out, norm = jax.lax.fori_loop(0, p, body, (out, norm))
  return out / jnp.where(norm > 0, norm, 1.0)[None, :, :, None]


def count_compiles_hint(sizes: Sequence[tuple[int, int]], infer_cfg: Any = None) -> int:
  """Number of distinct network input shapes ``predict_logits`` would use for
  images of ``sizes`` (each bucket compiles once)."""
  s = settings(infer_cfg)
  window = {"whole": "whole", "slide": "slide", "multiscale": s.ms_window}[s.mode]
  shapes = set()
  for H, W in sizes:
    for scale, _ in passes(s):
      h, w = max(1, int(H * scale + 0.5)), max(1, int(W * scale + 0.5))
      shapes.add(s.crop_size if window == "slide" else (_bucket(h, s.bucket), _bucket(w, s.bucket)))
  return len(shapes)


__all__ = [
    "default_config", "settings", "make_apply_fn", "predict_logits", "predict_labels",
    "interp_matrix", "slide_positions", "blend_weights", "passes", "count_compiles_hint",
]
