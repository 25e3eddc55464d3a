"""DeepLab v3+ (Chen et al., ECCV 2018): aligned Xception-65 + ASPP + decoder.

Paper settings (Sec. 4): the v3 training protocol (batch 16, "poly" learning
rate 0.007, power 0.9, crop 513, random scaling 0.5-2.0 and flipping, output
stride 16 in training), decoder with 48-channel low-level projection and two
3x3 convs of 256 channels, depthwise-separable convs in the backbone, ASPP
and decoder. Evaluation at output stride 8 is a config switch
(``model.eval_output_stride=8``); the paper reports both. Weight decay 4e-5 is
the reference TF implementation's default. ResNet-101 instead of Xception:
``--config.model.backbone=resnet --config.model.width=64``.

CPU-sized run:
  python -m jseg.train --config=configs/deeplabv3plus.py --config.model.width=0.125 \
    --config.model.middle_blocks=2 --config.model.aspp_features=32 \
    --config.model.decoder_features=32 --config.model.low_level_features=16 \
    --config.data.crop_size='(96, 128)' --config.batch_size=4 --config.total_steps=200
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 16
  c.total_steps = 30000
  c.eval_every = 2000
  c.checkpoint_every = 2000

  c.model.name = "deeplabv3plus"
  c.model.num_classes = 11
  c.model.backbone = "xception65"
  c.model.width = 1.0
  c.model.middle_blocks = 16
  c.model.scan_middle = True
  c.model.output_stride = 16
  c.model.eval_output_stride = 16
  c.model.multi_grid = (1, 1, 1)
  c.model.aspp_features = 256
  c.model.aspp_rates = (6, 12, 18)
  c.model.decoder_features = 256
  c.model.low_level_features = 48
  c.model.separable = True
  c.model.dropout = 0.1

  c.data.crop_size = (360, 480)
  c.data.scale_range = (0.5, 2.0)
  c.data.hflip = True

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.007
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 4e-5
  c.schedule.name = "poly"
  c.schedule.power = 0.9
  return c
