"""PSPNet with ResNet-101 (Zhao et al., CVPR 2017) on CamVid: the paper's network.

Paper settings (Sec. 4.1): dilated ResNet-101 with the three-conv stem
(``deep_stem``), output stride 8, pyramid pooling bins (1, 2, 3, 6) each
reduced to 512 channels, a 3x3 conv of 512 channels, auxiliary loss on layer3
with weight 0.4, batch 16, "poly" learning rate 0.01 with power 0.9, momentum
0.9, weight decay 1e-4, random mirror and resize 0.5-2.0 (Gaussian blur only
for ImageNet/VOC, not for street scenes), 90K iterations on Cityscapes; here
whole 360x480 CamVid frames.

CPU-sized run: see configs/pspnet.py (ResNet-18 at width 16), or
  python -m jseg.train --config=configs/pspnet_r101.py --config.model.depth=18 \
    --config.model.width=16 --config.model.head_features=64 \
    --config.model.aux_features=32 --config.data.crop_size='(96, 128)' \
    --config.batch_size=4 --config.total_steps=200
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 16
  c.total_steps = 90000
  c.eval_every = 5000
  c.checkpoint_every = 5000

  c.model.name = "pspnet"
  c.model.num_classes = 11
  c.model.depth = 101
  c.model.width = 64
  c.model.deep_stem = True
  c.model.output_stride = 8
  c.model.bins = (1, 2, 3, 6)
  c.model.head_features = 512
  c.model.aux_head = True
  c.model.aux_features = 256
  c.model.dropout = 0.1

  c.data.crop_size = (360, 480)
  c.data.scale_range = (0.5, 2.0)
  c.data.hflip = True
  c.data.blur = False

  c.loss.aux_weight = 0.4
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "poly"
  c.schedule.power = 0.9
  return c
