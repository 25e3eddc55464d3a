"""Data-parallel step: 4 host devices give the same result as 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import xla_flags_with_devices

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from tiny import tiny_pspnet_config
from jseg import trainer, parallel
config = tiny_pspnet_config(dropout=0.1)
run = trainer.setup(config)
rs = np.random.RandomState(0)
state = run.state
losses = []
for _ in range(2):
  batch = {"image": rs.randn(4, 64, 64, 3).astype(np.float32),
           "label": rs.randint(0, 11, (4, 64, 64)).astype(np.int32)}
  batch["label"][:, :8] = 255
  state, m = run.step_fn(state, parallel.shard_batch(batch, run.mesh), run.step_rng)
  losses.append(float(m["loss"]))
leaves = [np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats))]
np.savez(sys.argv[1], *leaves)
print(json.dumps({"devices": jax.device_count(), "losses": losses}))
"""


def _start(devices: int, out: Path) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(devices),
             JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
  try:
    stdout, stderr = proc.communicate(timeout=300)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert proc.returncode == 0, stderr[-3000:]
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_four_devices_match_one(tmp_path):
  # Both processes at once (each mostly compiles on one core): the test's time halves.
  procs = [_start(1, tmp_path / "one.npz"), _start(4, tmp_path / "four.npz")]
  one, four = [_result(p) for p in procs]
  assert one["devices"] == 1 and four["devices"] == 4
  np.testing.assert_allclose(one["losses"], four["losses"], rtol=1e-5)
  a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "four.npz")
  assert len(a.files) == len(b.files) > 0
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_batch_not_divisible_by_devices_is_rejected():
  from jseg import parallel

  class FakeMesh:
    class devices:
      size = 4

  with pytest.raises(ValueError, match="not divisible by the number of devices"):
    parallel.check_batch_size(6, FakeMesh)
