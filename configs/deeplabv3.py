"""DeepLab v3 (Chen et al., arXiv 1706.05587): ResNet-101, multi-grid, ASPP with BN.

Paper settings (Sec. 4.1-4.3): output stride 16 in training and 8 at
evaluation (``model.output_stride`` / ``model.eval_output_stride``), multi-grid
(1, 2, 4), ASPP rates (6, 12, 18) at stride 16 (doubled at 8) with 256
channels and image pooling, batch 16, "poly" learning rate 0.007 with power
0.9, crop 513, random scaling 0.5-2.0 and flipping, 30K iterations. Weight
decay 4e-5 is the reference TF implementation's default (the paper does not
state it). CamVid frames are 360x480, so that is the crop.

CPU-sized run:
  python -m jseg.train --config=configs/deeplabv3.py --config.model.depth=18 \
    --config.model.width=16 --config.model.aspp_features=64 \
    --config.data.crop_size='(96, 128)' --config.batch_size=4 --config.total_steps=200
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 16
  c.total_steps = 30000
  c.eval_every = 2000
  c.checkpoint_every = 2000

  c.model.name = "deeplabv3"
  c.model.num_classes = 11
  c.model.depth = 101
  c.model.width = 64
  c.model.output_stride = 16
  c.model.eval_output_stride = 8
  c.model.multi_grid = (1, 2, 4)
  c.model.aspp_features = 256
  c.model.aspp_rates = (6, 12, 18)
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
