"""PSPNet with ResNet-18 on CamVid: configs/pspnet_r101.py with a ResNet-18.

ResNet-18 is not in the PSPNet paper; the head sizes follow MMSegmentation's
``pspnet_r18-d8`` (128-channel 3x3 conv, 64-channel auxiliary head, three-conv
stem, output stride 8); training settings are the paper's (see pspnet_r101.py).

CPU-sized run: configs/pspnet.py is this network at width 16, or
  python -m jseg.train --config=configs/pspnet_r18.py --config.model.width=16 \
    --config.data.crop_size='(96, 128)' --config.batch_size=4 --config.total_steps=200
"""

from jseg.config import load_config


def get_config():
  c = load_config("configs/pspnet_r101.py")
  c.model.depth = 18
  c.model.head_features = 128
  c.model.aux_features = 64
  return c
