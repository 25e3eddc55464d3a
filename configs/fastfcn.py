"""FastFCN (Wu et al., 2019): ResNet-101 + JPU + FCN head on CamVid.

Settings of the reference implementation (wuhuikai/FastFCN, built on
PyTorch-Encoding): JPU with 512-channel branches and dilations 1/2/4/8 on a
stride-32 ResNet, FCN head, auxiliary FCN head on layer3 with weight 0.2,
SGD momentum 0.9, weight decay 1e-4, "poly" learning rate with power 0.9
(0.004 at batch 16, the street-scene (Cityscapes) value of that code base),
random scaling 0.5-2.0 and flipping. ``model.head`` selects ``fcn``, ``psp``
or ``aspp``; ``model.jpu=False`` is the dilated-ResNet baseline (see
experiments/fastfcn_jpu_vs_dilated/).

CPU-sized run:
  python -m jseg.train --config=configs/fastfcn.py --config.model.depth=18 \
    --config.model.width=16 --config.model.jpu_features=32 \
    --config.model.head_features=32 --config.model.aux_features=16 \
    --config.data.crop_size='(96, 128)' --config.batch_size=4 --config.total_steps=200
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 16
  c.total_steps = 30000
  c.eval_every = 2000
  c.checkpoint_every = 2000

  c.model.name = "fastfcn"
  c.model.num_classes = 11
  c.model.depth = 101
  c.model.width = 64
  c.model.jpu = True
  c.model.output_stride = 8
  c.model.jpu_features = 512
  c.model.head = "fcn"
  c.model.head_features = 512
  c.model.aux_head = True
  c.model.aux_features = 256
  c.model.dropout = 0.1

  c.data.crop_size = (360, 480)
  c.data.scale_range = (0.5, 2.0)
  c.data.hflip = True

  c.loss.aux_weight = 0.2
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.004
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "poly"
  c.schedule.power = 0.9
  return c
