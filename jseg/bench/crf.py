"""Dense CRF timing: ``python -m jseg.bench crf [--out=PATH] [--repeats=N] [--iterations=10]
[--classes=11] [--image=PATH] [--params=deeplab_v2_resnet|deeplab_v2_vgg|deeplab_v1]``,
and quality with ``--workdir=RUN [--split=val] [--max_images=N] [--checkpoint=best]``.

Quality mode: the trained run's predictions on ``--split`` (through
``jseg.inference`` with the run's ``config.inference``) are scored with and
without the CRF (``--params`` preset): mIoU, pixel accuracy and boundary F1
(``jseg.metrics``, 2-pixel tolerance), plus the CRF's time per image.

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
    bi = crf.build_lattice(crf.kernel_features(img, p.bi_xy_std, p.bi_rgb_std))
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
  lattice = crf.build_lattice(crf.kernel_features(img, p.bi_xy_std, p.bi_rgb_std))
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


def evaluate_run(workdir: str, split: str | None, preset: str, iterations: int,
                 max_images: int = 0, which: str = "best") -> dict:
  """Scores a trained run's predictions on ``split`` with and without the CRF."""
  from jseg import checkpoint as ckpt_lib
  from jseg import data as data_lib
  from jseg import inference, metrics

  run = ckpt_lib.load_run(workdir, which)
  config = run.config
  split = split or config.data.eval_split
  info = data_lib.get_info(config.data)
  src = data_lib.make_eval_source(config, split)
  fn = inference.make_apply_fn(run.model, run.variables)
  infer_cfg = config.get("inference", None)
  cfg = dict(PRESETS[preset], iterations=iterations)
  k = info.num_classes
  cms = {"unary": np.zeros((k, k), np.int64), "crf": np.zeros((k, k), np.int64)}
  bcs = {"unary": np.zeros((k, 4), np.int64), "crf": np.zeros((k, 4), np.int64)}
  n = len(src) if not max_images else min(max_images, len(src))
  crf_time = 0.0
  for i in range(n):
    ex, raw = src[i], src.raw(i)
    lp = inference.predict_logits(fn, ex["image"][None], infer_cfg)[0]
    t0 = time.perf_counter()
    refined = crf.dense_crf(lp, raw["image"], cfg)
    crf_time += time.perf_counter() - t0
    for key, out in (("unary", lp), ("crf", refined)):
      pred = out.argmax(-1)
      cms[key] += np.asarray(metrics.confusion_matrix(pred, ex["label"], k, info.ignore_index), np.int64)
      bcs[key] += metrics.boundary_counts(pred, ex["label"], k, info.ignore_index)
  res = {"suite": "crf_quality", "workdir": str(workdir), "step": run.step, "split": split,
         "images": n, "params": cfg, "preset": preset, "crf_s_per_image": crf_time / max(n, 1)}
  for key in cms:
    s = metrics.summarize(cms[key])
    res[key] = {"miou": float(s["miou"]), "pixel_accuracy": float(s["pixel_accuracy"]),
                "mean_bf": float(metrics.boundary_summary(bcs[key])["mean_bf"]),
                "per_class_iou": dict(zip(info.class_names, map(float, s["iou"])))}
  return res


def main(argv: list[str]) -> None:
  ap = argparse.ArgumentParser(prog="python -m jseg.bench crf", description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="bench_results/crf.json")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--iterations", type=int, default=10)
  ap.add_argument("--classes", type=int, default=11)
  ap.add_argument("--image", default="")
  ap.add_argument("--params", default="deeplab_v2_resnet", choices=sorted(PRESETS))
  ap.add_argument("--workdir", default="", help="quality mode: a trained run")
  ap.add_argument("--split", default=None)
  ap.add_argument("--max_images", type=int, default=0)
  ap.add_argument("--checkpoint", default="best")
  a = ap.parse_args(argv)
  if a.workdir:
    res = evaluate_run(a.workdir, a.split, a.params, a.iterations, a.max_images, a.checkpoint)
    out = Path(a.out if a.out != "bench_results/crf.json" else "bench_results/crf_quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"{a.workdir} (step {res['step']}) on '{res['split']}', {res['images']} images, CRF {a.params}, "
          f"{a.iterations} iterations: {res['crf_s_per_image']:.2f} s/image")
    print("| | mIoU | pixel acc | boundary F1 |")
    print("|---|---|---|---|")
    for key in ("unary", "crf"):
      r = res[key]
      print(f"| {'without CRF' if key == 'unary' else 'with CRF'} | {100 * r['miou']:.2f} | "
            f"{100 * r['pixel_accuracy']:.2f} | {100 * r['mean_bf']:.2f} |")
    print(f"wrote {out}")
    return
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
