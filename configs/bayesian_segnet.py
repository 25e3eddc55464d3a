"""Bayesian SegNet (Kendall, Badrinarayanan & Cipolla, BMVC 2017) on CamVid.

SegNet's settings plus dropout p=0.5 after the central encoder and decoder
units; the reference solver (``bayesian_segnet_solver.prototxt``) is SGD lr
0.001, momentum 0.9, weight decay 5e-4, 60000 iterations. At test time
``inference.mc_samples`` Monte-Carlo dropout passes are averaged
(``jseg.models.segnet.mc_predict``; the paper uses 50).
"""

from pathlib import Path

from jseg.config import load_config


def get_config():
  c = load_config(str(Path(__file__).with_name("segnet.py")))
  c.model.name = "bayesian_segnet"
  c.model.dropout = 0.5
  c.inference.mc_samples = 50
  return c
