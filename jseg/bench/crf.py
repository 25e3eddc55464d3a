"""Dense CRF timing: ``python -m jseg.bench crf [--out=PATH] [--repeats=N] [--iterations=10]
[--classes=11] [--image=PATH] [--params=deeplab_v2_resnet|deeplab_v2_vgg|deeplab_v1]``.

One 360x480 CamVid validation image (the first in ``samples/camvid/val`` unless
``--image`` is given) with a synthetic unary: ``2 * onehot(label) + N(0, 1.5)``
logits over ``--classes`` classes (the annotation, class 11 = void mapped to a
random class). Reports the lattice build (host, NumPy), the mean-field
iterations (jitted) and their sum, as the median of ``--repeats`` runs after
one warm-up run whose time (with compilation) is reported separately; pixel
accuracy of the unary and of the CRF output against the annotation is printed
as a sanity check, not as a quality figure. Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from jseg import crf
from jseg.config import REPO_ROOT
from jseg.data import read_image, read_mask

PRESETS = {
    "deeplab_v2_resnet": dict(bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0, pos_w=3.0, pos_xy_std=1.0),
    "deeplab_v2_vgg": dict(bi_w=4.0, bi_xy_std=65.0, bi_rgb_std=3.0, pos_w=2.0, pos_xy_std=2.0),
    "deeplab_v1": dict(bi_w=4.0, bi_xy_std=121.0, bi_rgb_std=5.0, pos_w=3.0, pos_xy_std=3.0),
}


def _default_image() -> Path:
  files = sorted((REPO_ROOT / "samples" / "camvid" / "val").glob("*.png"))
  if not files:
    raise FileNotFoundError(f"No CamVid sample images in {REPO_ROOT / 'samples/camvid/val'}; pass --image.")
  return files[0]


def run(image_path: Path, classes: int, iterations: int, repeats: int, preset: str) -> dict:
  img = read_image(image_path)[..., :3]
  h, w = img.shape[:2]
  rng = np.random.default_rng(0)
  ann = image_path.parent.parent / (image_path.parent.name + "annot") / image_path.name
  if ann.is_file():
    label = read_mask(ann).astype(np.int64)
    label = np.where(label < classes, label, rng.integers(0, classes, label.shape))
  else:
    label = rng.integers(0, classes, (h, w))
  logits = 2.0 * np.eye(classes)[label] + rng.normal(0, 1.5, (h, w, classes))
  logits = logits.astype(np.float32)
  cfg = dict(PRESETS[preset], iterations=iterations)
  p = crf.params(cfg)

  def once() -> tuple[float, float, np.ndarray]:
    t0 = time.perf_counter()
    bi = crf.build_lattice(crf._features(img, p.bi_xy_std, p.bi_rgb_std))
    t1 = time.perf_counter()
    out = crf._mean_field(
        jax.numpy.asarray(logits), bi, None, p.bi_w, p.pos_w, p.pos_xy_std, p.iterations,
        p.normalization, p.pos_w != 0,
    )
    out = np.asarray(jax.block_until_ready(out))
    return t1 - t0, time.perf_counter() - t1, out

  t0 = time.perf_counter()
  _, _, out = once()
  first = time.perf_counter() - t0
  builds, fields = [], []
  for _ in range(repeats):
    b, m, out = once()
    builds.append(b)
    fields.append(m)
  total = [b + m for b, m in zip(builds, fields)]
  # The public entry point gives the same answer (checked, not timed).
  np.testing.assert_allclose(crf.dense_crf(logits, img, cfg), out, atol=1e-4)
  lattice = crf.build_lattice(crf._features(img, p.bi_xy_std, p.bi_rgb_std))
  return {
      "suite": "crf",
      "image": str(image_path),
      "height": h, "width": w, "classes": classes, "iterations": iterations,
      "params": cfg, "preset": preset,
      "lattice_points": lattice.num_points,
      "first_call_s": first,
      "lattice_build_s": float(np.median(builds)),
      "mean_field_s": float(np.median(fields)),
      "total_s": float(np.median(total)),
      "total_min_s": float(np.min(total)),
      "repeats": repeats,
      "unary_pixel_acc": float((logits.argmax(-1) == label).mean()),
      "crf_pixel_acc": float((out.argmax(-1) == label).mean()),
      "machine": {
          "platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
      },
  }


def main(argv: list[str]) -> None:
  ap = argparse.ArgumentParser(prog="python -m jseg.bench crf", description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="bench_results/crf.json")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--iterations", type=int, default=10)
  ap.add_argument("--classes", type=int, default=11)
  ap.add_argument("--image", default="")
  ap.add_argument("--params", default="deeplab_v2_resnet", choices=sorted(PRESETS))
  a = ap.parse_args(argv)
  image = Path(a.image) if a.image else _default_image()
  if not image.is_file():
    raise SystemExit(f"--image={a.image} does not exist.")
  res = run(image, a.classes, a.iterations, a.repeats, a.params)
  out = Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(res, indent=2))
  print(f"dense CRF, {res['height']}x{res['width']}, {res['classes']} classes, "
        f"{res['iterations']} iterations, {a.params} ({res['lattice_points']} lattice points)")
  print("| step | median s |")
  print("|---|---|")
  for k in ("lattice_build_s", "mean_field_s", "total_s"):
    print(f"| {k[:-2]} | {res[k]:.3f} |")
  print(f"| first call (with compile) | {res['first_call_s']:.3f} |")
  print(f"pixel acc vs annotation: unary {res['unary_pixel_acc']:.3f}, CRF {res['crf_pixel_acc']:.3f}")
  print(f"wrote {out}")
