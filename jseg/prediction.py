"""Predicting masks for image files: the library side of ``jseg.predict``.

For each input image ``NAME.ext`` it writes ``NAME.png`` (an indexed PNG whose
pixel values are class indices and whose palette is the dataset's) and
``NAME_overlay.png`` (image | mask over image | mask, side by side); with
Monte-Carlo dropout also ``NAME_entropy.png``, ``NAME_variance.png`` and
``NAME_uncertainty.npz``. Existing files are never overwritten unless
``overwrite`` is set.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jseg import checkpoint as ckpt_lib
from jseg import data as data_lib
from jseg import compiling, inference
from jseg import visualize

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")


def collect_inputs(path: str | Path) -> list[Path]:
  """An image file, or every image file (sorted) directly inside a folder."""
  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(f"Input '{path}' does not exist.")
  if p.is_file():
    return [p]
  files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
  if not files:
    raise FileNotFoundError(
        f"Input folder '{path}' holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
  return files


def predict_files(workdir: str | Path, inputs: str | Path, output: str | Path,
                  which: str | int = "best", overwrite: bool = False,
                  mc_samples: int | None = None) -> list[Path]:
  """Writes a mask and an overlay per input image; returns the mask paths.

  Inference follows the run's ``config.inference`` (whole, sliding window,
  multi-scale, flip, CRF). ``mc_samples`` > 0 runs Monte-Carlo dropout
  (Bayesian SegNet) and also writes uncertainty maps; default: 20 samples
  (``inference.mc_samples``) for ``bayesian_segnet`` runs, none otherwise.
  """
  files = collect_inputs(inputs)
  out_dir = Path(output)
  out_dir.mkdir(parents=True, exist_ok=True)
  targets = [(f, out_dir / f"{f.stem}.png", out_dir / f"{f.stem}_overlay.png") for f in files]
  if not overwrite:
    clash = [str(p) for _, m, o in targets for p in (m, o) if p.exists()]
    if clash:
      raise FileExistsError(
          f"{len(clash)} output file(s) already exist, e.g. {clash[0]}. Choose another "
          "--output or pass --overwrite.")
  run = ckpt_lib.load_run(workdir, which)
  info = data_lib.get_info(run.config.data)
  infer = run.config.inference
  options = compiling.fusion_emitter_options(run.config, "eval_fusion_emitters")
  apply_fn = inference.make_apply_fn(run.model, run.variables, options)
  mc = mc_samples if mc_samples is not None else (
      run.config.inference.get("mc_samples", 20) if run.config.model.name == "bayesian_segnet" else 0)
  mc_fn = None
  if mc and run.config.model.name not in ("segnet", "bayesian_segnet"):
    raise ValueError(
        f"Monte-Carlo dropout needs a SegNet-family run; '{workdir}' trained "
        f"'{run.config.model.name}'.")
  if mc:
    from jseg.models.segnet import mc_predict

    mc_fn = compiling.OnCall(jax.jit(functools.partial(
        mc_predict, run.model, num_samples=mc, chunk_size=min(mc, 8))), options)

  written = []
  for src, mask_path, overlay_path in targets:
    raw = data_lib.read_image(src)
    channels = 1 if raw.ndim == 2 else raw.shape[-1]
    if channels != info.channels:
      raise ValueError(
          f"Image '{src}' has {channels} channel(s); the model was trained on {info.channels}.")
    image = data_lib.normalize(raw, info, run.config.data)
    if image.ndim == 2:
      image = image[..., None]
    if mc_fn is not None:
      out = mc_fn(run.variables, jnp.asarray(image)[None], jax.random.PRNGKey(run.config.seed))
      mask = np.asarray(jnp.argmax(out["mean"][0], -1)).astype(np.uint8)
      _write_uncertainty(out_dir / f"{src.stem}", np.asarray(out["entropy"][0]),
                         np.asarray(out["variance"][0]), mask, info.num_classes)
    else:
      raw_list = [raw if raw.ndim == 3 else raw[..., None]] if inference.crf_enabled(infer) else None
      mask = inference.predict_labels(apply_fn, [image], infer, raw_list)[0].astype(np.uint8)
    visualize.save_indexed_png(mask, info.palette, mask_path)
    panel = visualize.side_by_side(
        visualize.to_display(raw),
        visualize.overlay(raw, mask, info.palette, ignore_index=info.ignore_index),
        visualize.colorize(mask, info.palette, info.ignore_index))
    Image.fromarray(panel).save(overlay_path)
    written.append(mask_path)
  return written


def _write_uncertainty(stem: Path, entropy: np.ndarray, variance: np.ndarray, mask: np.ndarray,
                       num_classes: int) -> None:
  """MC-dropout maps: ``_entropy.png`` (predictive entropy / log K, white = uncertain),
  ``_variance.png`` (variance of the predicted class's probability, scaled by its
  maximum 0.25) and ``_uncertainty.npz`` (entropy and per-class variance, float16)."""
  ent = np.clip(entropy / np.log(num_classes), 0, 1)
  Image.fromarray((ent * 255).round().astype(np.uint8)).save(f"{stem}_entropy.png")
  var_pred = np.take_along_axis(variance, mask[..., None].astype(np.int64), -1)[..., 0]
  Image.fromarray((np.clip(var_pred / 0.25, 0, 1) * 255).round().astype(np.uint8)).save(
      f"{stem}_variance.png")
  np.savez_compressed(f"{stem}_uncertainty.npz", entropy=entropy.astype(np.float16),
                      variance=variance.astype(np.float16))
