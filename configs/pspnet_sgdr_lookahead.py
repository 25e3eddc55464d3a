"""PSPNet on CamVid with SGDR warm restarts (Loshchilov & Hutter 2017) and Lookahead
(Zhang et al. 2019): the snapshot-ensemble recipe.

Cycles of 100, 200 steps (cycle_mult=2) within 300 steps; the trainer saves a
snapshot at each cycle end (``<workdir>/snapshots/``), which
``python -m jseg.ensemble --snapshots=<workdir>`` combines. Lookahead keeps slow
weights (k=5, alpha=0.5) that evaluation uses. Everything else is ``configs/pspnet.py``.
"""

from pathlib import Path

from jseg.config import load_config


def get_config():
  c = load_config(str(Path(__file__).with_name("pspnet.py")))
  c.schedule.name = "sgdr"
  c.schedule.cycle_steps = 100
  c.schedule.cycle_mult = 2.0
  c.schedule.warmup_steps = 0
  c.optimizer.lookahead_k = 5
  c.optimizer.lookahead_alpha = 0.5
  return c
