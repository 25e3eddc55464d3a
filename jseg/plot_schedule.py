"""Draws a config's learning-rate schedule to a PNG.

  python -m jseg.plot_schedule --config=configs/pspnet.py --out=lr.png

The curve is ``jseg.optim.build_schedule(config)`` evaluated at every optimiser step
(subsampled to the image width); SGDR snapshot steps (``jseg.optim.snapshot_steps``)
are drawn as dashed vertical lines. Drawn with Pillow, so no plotting library is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jseg import optim
from jseg.config import load_config


def schedule_values(config, num: int = 2000) -> tuple[np.ndarray, np.ndarray]:
  """(steps, learning rates) at up to ``num`` evenly spaced steps in ``[0, total_steps]``."""
  total = int(config.total_steps)
  steps = np.unique(np.linspace(0, total, min(num, total + 1)).round().astype(np.int64))
  # Keep the exact snapshot steps and the one before each, so restarts show as vertical jumps.
  extra = [s + d for s in optim.snapshot_steps(config, total) for d in (-1, 0)]
  steps = np.unique(np.concatenate([steps, np.asarray(extra, np.int64)]))
  steps = steps[(steps >= 0) & (steps <= total)]
  sched = optim.build_schedule(config)
  lrs = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(steps, jnp.int32)), np.float64)
  return steps, lrs


def _nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
  if hi <= lo:
    return np.array([lo])
  raw = (hi - lo) / n
  mag = 10 ** np.floor(np.log10(raw))
  step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
  return np.arange(np.ceil(lo / step) * step, hi + step * 1e-9, step)


def draw(steps: np.ndarray, lrs: np.ndarray, snapshots: list[int], title: str,
         size: tuple[int, int] = (900, 450)) -> Image.Image:
  """A line plot of ``lrs`` against ``steps`` with axes, ticks and snapshot markers."""
  w, h = size
  left, right, top, bottom = 90, 20, 40, 50
  img = Image.new("RGB", size, "white")
  d = ImageDraw.Draw(img)
  font = ImageFont.load_default()
  x_max = max(int(steps[-1]), 1)
  y_max = float(lrs.max()) * 1.05 if lrs.max() > 0 else 1.0
  px = lambda s: left + (w - left - right) * s / x_max
  py = lambda v: h - bottom - (h - top - bottom) * v / y_max
  for t in _nice_ticks(0, y_max):
    y = py(t)
    d.line([(left, y), (w - right, y)], fill=(230, 230, 230))
    d.text((5, y - 6), f"{t:.3g}", fill="black", font=font)
  for t in _nice_ticks(0, x_max):
    x = px(t)
    d.line([(x, top), (x, h - bottom)], fill=(230, 230, 230))
    d.text((x - 12, h - bottom + 6), f"{int(t)}", fill="black", font=font)
  for s in snapshots:
    x = px(s)
    for y0 in range(top, h - bottom, 8):
      d.line([(x, y0), (x, min(y0 + 4, h - bottom))], fill=(220, 80, 60))
  d.rectangle([left, top, w - right, h - bottom], outline="black")
  d.line([(px(s), py(v)) for s, v in zip(steps, lrs)], fill=(31, 119, 180), width=2)
  d.text((left, 12), title, fill="black", font=font)
  d.text(((w - left) // 2 + left - 15, h - 20), "step", fill="black", font=font)
  return img


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="config file with get_config()")
  parser.add_argument("--out", default="lr.png", help="PNG to write")
  parser.add_argument("--width", type=int, default=900)
  parser.add_argument("--height", type=int, default=450)
  args = parser.parse_args(argv)
  config = load_config(args.config)
  steps, lrs = schedule_values(config, num=4 * args.width)
  snaps = optim.snapshot_steps(config, int(config.total_steps))
  sc = config.schedule
  title = (f"{config.optimizer.name} lr={config.optimizer.learning_rate:g}  schedule={sc.name}  "
           f"warmup={sc.get('warmup_steps', 0)}  steps={config.total_steps}"
           + (f"  snapshots at {snaps}" if snaps else ""))
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  draw(steps, lrs, snaps, title, (args.width, args.height)).save(out)
  print(f"Wrote {out}: lr from {lrs[0]:.3g} (step 0) to {lrs[-1]:.3g} (step {steps[-1]}), "
        f"max {lrs.max():.3g}" + (f"; SGDR snapshots at {snaps}" if snaps else ""))


if __name__ == "__main__":
  main(sys.argv[1:])
