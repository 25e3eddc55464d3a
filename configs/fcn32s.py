"""FCN-32s (Long et al., CVPR 2015): FCN-8s's settings, no skips (one 32x upsampling)."""

from pathlib import Path

from jseg.config import load_config


def get_config():
  c = load_config(str(Path(__file__).with_name("fcn8s.py")))
  c.model.name = "fcn32s"
  return c
