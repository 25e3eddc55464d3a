"""4-cascaded RefineNet-101 (Lin et al., CVPR 2017) on CamVid.

The paper states the augmentation (random scaling, cropping, horizontal
flipping) but not the optimiser; the values here are the authors' group's
released PyTorch recipe (DrSleep/light-weight-refinenet ``src/config.py``):
SGD momentum 0.9, weight decay 1e-5, batch 6, crop 500, scale 0.5-2.0, three
equal stages with the learning rate halved after each. That recipe uses 5e-4
for the pretrained encoder and 10x for the decoder; with one learning rate
for the whole (from-scratch) network we take the encoder's.

CPU-sized run:
  python -m jseg.train --config=configs/refinenet.py --config.model.depth=18 \
    --config.model.width=16 --config.model.features=32 \
    --config.data.crop_size='(96, 128)' --config.batch_size=4 --config.total_steps=300 \
    --config.schedule.boundaries='(100, 200)'
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 6
  c.total_steps = 18000
  c.eval_every = 2000
  c.checkpoint_every = 2000

  c.model.name = "refinenet"
  c.model.num_classes = 11
  c.model.depth = 101
  c.model.width = 64
  c.model.features = 256
  c.model.rcu_blocks = 2
  c.model.crp_stages = 4
  c.model.out_rcu_blocks = 3
  c.model.dropout = 0.5

  c.data.crop_size = (360, 480)
  c.data.scale_range = (0.5, 2.0)
  c.data.hflip = True

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 5e-4
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-5
  c.schedule.name = "step"
  c.schedule.boundaries = (6000, 12000)
  c.schedule.factor = 0.5
  return c
