"""U-Net on ISBI 2012 trained with sigmoid focal + soft Dice: the imbalanced-binary recipe.

Membranes are ~22% of pixels, so a plain cross-entropy favours "cell"; focal
loss (Lin et al. 2017, gamma=2, alpha=0.25) down-weights easy pixels and soft
Dice (Milletari et al. 2016) optimises overlap directly. Everything else is
``configs/unet.py``.
"""

from pathlib import Path

from jseg.config import load_config


def get_config():
  c = load_config(str(Path(__file__).with_name("unet.py")))
  c.loss.name = "combo"
  c.loss.terms = (("sigmoid_focal", 1.0), ("dice", 1.0))
  c.loss.focal_gamma = 2.0
  c.loss.dice_smooth = 1.0
  return c
