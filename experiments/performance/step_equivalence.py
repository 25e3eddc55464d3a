"""Are two checkouts' training steps the same function? Three PSPNet steps, saved for comparison.

  PYTHONPATH=<old checkout> python experiments/performance/step_equivalence.py old.npz
  python experiments/performance/step_equivalence.py new.npz
  python experiments/performance/step_equivalence.py --compare old.npz new.npz

Runs ``configs/pspnet.py``'s real step three times on one fixed random batch (256^2, some
pixels ignored) and saves the losses and the parameters after. Measured 2026-11-30,
``21cee36`` against ``d6978ad`` (class-major logits and loss, separable max pool): losses
3.619929 / 3.6197896 / 3.6170549 against 3.619929 / 3.6197891 / 3.6170545, largest
parameter difference 2.8e-7.
"""
import sys

import jax
import numpy as np

from jseg import parallel, trainer
from jseg.config import load_config


def compare(a_path: str, b_path: str) -> None:
  a, b = np.load(a_path), np.load(b_path)
  for k in sorted(a.files):
    if k.startswith("loss"):
      print(k, float(a[k]), float(b[k]))
  diffs = sorted(((float(np.abs(a[k] - b[k]).max()), k) for k in a.files if k.startswith("p/")), reverse=True)
  print("largest parameter differences:", diffs[:3])


def run(out_path: str) -> None:
  cfg = load_config("configs/pspnet.py")
  setup = trainer.setup(cfg)
  rng = np.random.default_rng(0)
  h, w = 256, 256
  img = rng.standard_normal((cfg.batch_size, h, w, 3)).astype(np.float32)
  lab = rng.integers(0, 11, (cfg.batch_size, h, w)).astype(np.int32)
  lab[:, :20] = 255
  state = setup.state
  out = {}
  for i in range(3):
    batch = parallel.shard_batch({"image": img, "label": lab}, setup.mesh)
    state, m = setup.step_fn(state, batch, setup.step_rng)
    out[f"loss{i}"] = np.asarray(m["loss"])
  flat = jax.tree_util.tree_leaves_with_path(state.params)
  for p, v in flat:
    out["p/" + jax.tree_util.keystr(p)] = np.asarray(v)
  np.savez(out_path, **out)
  print({k: float(v) for k, v in out.items() if k.startswith("loss")})


if __name__ == "__main__":
  if sys.argv[1] == "--compare":
    compare(sys.argv[2], sys.argv[3])
  else:
    run(sys.argv[1])
