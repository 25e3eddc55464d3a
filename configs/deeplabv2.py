"""DeepLab v2 (Chen et al., TPAMI 2017): ResNet-101 + ASPP-L on CamVid.

Paper settings (Sec. 4): dilated ResNet-101 at output stride 8, ASPP-L with
rates 6, 12, 18, 24 (branch logits summed), mini-batch 10, SGD momentum 0.9,
weight decay 5e-4, "poly" learning rate with power 0.9, 20K iterations,
random scaling 0.5-1.5 and mirroring, 321x321 crops on PASCAL VOC (here whole
360x480 CamVid frames). The base rate 2.5e-4 is the released ResNet-101
solver's value.

CPU-sized run:
  python -m jseg.train --config=configs/deeplabv2.py --config.model.depth=18 \
    --config.model.width=16 --config.data.crop_size='(96, 128)' \
    --config.batch_size=4 --config.total_steps=200
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 10
  c.total_steps = 20000
  c.eval_every = 2000
  c.checkpoint_every = 2000

  c.model.name = "deeplabv2"
  c.model.num_classes = 11
  c.model.depth = 101
  c.model.width = 64
  c.model.output_stride = 8
  c.model.aspp_rates = (6, 12, 18, 24)

  c.data.crop_size = (360, 480)
  c.data.scale_range = (0.5, 1.5)
  c.data.hflip = True

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 2.5e-4
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "poly"
  c.schedule.power = 0.9
  return c
