"""DeepLab v1 (DeepLab-LargeFOV, Chen et al., ICLR 2015) on CamVid.

Paper settings (Sec. 4): VGG-16 with atrous conv5 (rate 2) and fc6 as a 3x3
conv with rate 12 and 1024 channels; mini-batch 20, SGD momentum 0.9, weight
decay 5e-4, learning rate 1e-3 multiplied by 0.1 every 2000 iterations,
6000 iterations. (The paper also uses a 10x rate on the classifier and a
dense CRF afterwards: neither is part of this config.) CamVid crops are the
full 360x480 frames.

CPU-sized run (about the size of the tests):
  python -m jseg.train --config=configs/deeplabv1.py --config.model.width=8 \
    --config.model.fc_features=64 --config.data.crop_size='(96, 128)' \
    --config.batch_size=4 --config.total_steps=200 \
    --config.schedule.boundaries='(100, 150)'
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 20
  c.total_steps = 6000
  c.eval_every = 1000
  c.checkpoint_every = 1000

  c.model.name = "deeplabv1"
  c.model.num_classes = 11
  c.model.width = 64
  c.model.fc_features = 1024
  c.model.fc6_dilation = 12
  c.model.dropout = 0.5

  c.data.crop_size = (360, 480)
  c.data.scale_range = (1.0, 1.0)
  c.data.hflip = True

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "step"
  c.schedule.boundaries = (2000, 4000)
  c.schedule.factor = 0.1
  return c
