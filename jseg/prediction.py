"""Predicting masks for image files: the library side of ``jseg.predict``.

For each input image ``NAME.ext`` it writes ``NAME.png`` (an indexed PNG whose
pixel values are class indices and whose palette is the dataset's) and
``NAME_overlay.png`` (image | mask over image | mask, side by side). Existing
files are never overwritten unless ``overwrite`` is set.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jseg import checkpoint as ckpt_lib
from jseg import data as data_lib
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
                  which: str | int = "best", overwrite: bool = False) -> list[Path]:
  """Writes a mask and an overlay per input image; returns the mask paths."""
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

  @jax.jit
  def predict(variables, image):
    logits, _ = run.model.apply(variables, image, train=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

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
    mask = np.asarray(predict(run.variables, jnp.asarray(image)[None]))[0]
    visualize.save_indexed_png(mask, info.palette, mask_path)
    panel = visualize.side_by_side(
        visualize.to_display(raw),
        visualize.overlay(raw, mask, info.palette, ignore_index=info.ignore_index),
        visualize.colorize(mask, info.palette, info.ignore_index))
    Image.fromarray(panel).save(overlay_path)
    written.append(mask_path)
  return written
