"""One convolution layer, forward and forward+backward: XLA vs jseg's oneDNN custom call vs torch.

  python experiments/performance/onednn_layers.py [--threads=2] [--out=onednn_layers.json]
  python experiments/performance/onednn_layers.py --cases=vgg --xla=no   # VGG-16's layers

Same shapes as the networks' layers (batch 4). XLA is ``lax.conv_general_dilated`` with
jseg's shipped XLA flags; oneDNN is ``jseg.models.conv.onednn_conv``; torch is
``torch.nn.functional.conv2d`` (NCHW, its default). Median of 10 timed calls after one
warm-up, milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from timing import median_ms  # noqa: E402

import jseg  # noqa: E402,F401  (XLA flags)
from jseg.models.conv import onednn_conv  # noqa: E402

# name, input NHWC, kernel HWIO, strides, dilation, groups
CASES = [
    ("3x3 256^2 c32", (4, 256, 256, 32), (3, 3, 32, 32), (1, 1), (1, 1), 1),
    ("3x3 128^2 c64", (4, 128, 128, 64), (3, 3, 64, 64), (1, 1), (1, 1), 1),
    ("3x3 32^2 c256", (4, 32, 32, 256), (3, 3, 256, 256), (1, 1), (1, 1), 1),
    ("3x3 32^2 c256 d2", (4, 32, 32, 256), (3, 3, 256, 256), (1, 1), (2, 2), 1),
    ("1x1 64^2 c256->64", (4, 64, 64, 256), (1, 1, 256, 64), (1, 1), (1, 1), 1),
    ("7x7/2 256^2 c3->64", (4, 256, 256, 3), (7, 7, 3, 64), (2, 2), (1, 1), 1),
    ("3x3/2 64^2 c64->128", (4, 64, 64, 64), (3, 3, 64, 128), (2, 2), (1, 1), 1),
    ("dw3x3 64^2 c128", (4, 64, 64, 128), (3, 3, 1, 128), (1, 1), (1, 1), 128),
    ("dw3x3 32^2 c256 d2", (4, 32, 32, 256), (3, 3, 1, 256), (1, 1), (2, 2), 256),
]
# VGG-16's 3x3 layers at 256^2 batch 4 (FCN, SegNet, CNN+RNN's encoder, U-Net-like widths).
VGG_CASES = [
    ("vgg conv1_1 256^2 3->64", (4, 256, 256, 3), (3, 3, 3, 64), (1, 1), (1, 1), 1),
    ("vgg conv1_2 256^2 c64", (4, 256, 256, 64), (3, 3, 64, 64), (1, 1), (1, 1), 1),
    ("vgg conv2_1 128^2 64->128", (4, 128, 128, 64), (3, 3, 64, 128), (1, 1), (1, 1), 1),
    ("vgg conv2_2 128^2 c128", (4, 128, 128, 128), (3, 3, 128, 128), (1, 1), (1, 1), 1),
    ("vgg conv3_2 64^2 c256", (4, 64, 64, 256), (3, 3, 256, 256), (1, 1), (1, 1), 1),
    ("vgg conv4_2 32^2 c512", (4, 32, 32, 512), (3, 3, 512, 512), (1, 1), (1, 1), 1),
]


def _pads(ks, strides, dilation):
  return tuple(((ks[i] - 1) * dilation[i] // 2,) * 2 for i in range(2))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--out", default="")
  p.add_argument("--cases", default="default", choices=("default", "vgg"))
  p.add_argument("--xla", default="yes", choices=("yes", "no"), help="no: skip XLA's own convolution")
  a = p.parse_args()
  import torch  # noqa: PLC0415
  torch.set_num_threads(a.threads)
  rng = np.random.default_rng(0)
  rows = []
  for name, xs, ks, s, d, g in (VGG_CASES if a.cases == "vgg" else CASES):
    pads = _pads(ks, s, d)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    k = jnp.asarray(0.1 * rng.standard_normal(ks), jnp.float32)
    ref = lambda x, k: lax.conv_general_dilated(  # noqa: E731
        x, k, s, pads, rhs_dilation=d, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=g)
    ours = lambda x, k: onednn_conv(x, k, s, d, pads, g)  # noqa: E731
    row = {"layer": name}
    for label, fn in ((("xla", ref),) if a.xla == "yes" else ()) + (("onednn", ours),):
      fwd = jax.jit(fn)
      vjp = jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k) ** 2), (0, 1)))
      row[f"{label}_fwd_ms"] = round(median_ms(lambda: fwd(x, k).block_until_ready()), 2)
      row[f"{label}_fwd_bwd_ms"] = round(
          median_ms(lambda: jax.block_until_ready(vjp(x, k))), 2)
    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), requires_grad=True)
    kt = torch.tensor(np.asarray(k).transpose(3, 2, 0, 1).copy(), requires_grad=True)
    tp = (pads[0][0], pads[1][0])

    def tf():
      with torch.no_grad():
        torch.nn.functional.conv2d(xt, kt, None, s, tp, d, g)

    def tb():
      (torch.nn.functional.conv2d(xt, kt, None, s, tp, d, g) ** 2).sum().backward()

    row["torch_fwd_ms"] = round(median_ms(tf), 2)
    row["torch_fwd_bwd_ms"] = round(median_ms(tb), 2)
    rows.append(row)
    print(f"{name:22s} fwd xla {row.get('xla_fwd_ms', float('nan')):7.1f} "
          f"onednn {row['onednn_fwd_ms']:7.1f} "
          f"torch {row['torch_fwd_ms']:7.1f} | fwd+bwd xla {row.get('xla_fwd_bwd_ms', float('nan')):7.1f} "
          f"onednn {row['onednn_fwd_bwd_ms']:7.1f} torch {row['torch_fwd_bwd_ms']:7.1f}",
          flush=True)
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"command": " ".join(sys.argv), "threads": a.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
