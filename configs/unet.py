"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) on ISBI 2012 membranes, 2 classes.

Paper settings: 5 levels from 64 channels, unpadded ("valid") 3x3 convolutions
with the overlap-tile strategy (mirror padding), 2x2 up-convolutions, no
BatchNorm, dropout at the end of the contracting path, SGD with momentum 0.99
and batch size 1 (large tiles instead of large batches). Not reproduced: the
border-emphasising weight map in the loss (w0=10, sigma=5) and the elastic
deformations; the paper gives no learning rate.

Fields marked "CPU-sized" are shrunk for the 2-core CPU; the paper-sized run:

  python -m jseg.train --config=configs/unet.py --config.model.width=64 \
    --config.data.crop_size='(388, 388)' \
    --config.data.root=/path/to/unet/data/membrane --config.total_steps=10000
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 1
  c.total_steps = 300  # CPU-sized
  c.eval_every = 150
  c.checkpoint_every = 50
  c.log_every = 10

  c.model.name = "unet"
  c.model.num_classes = 2
  c.model.depth = 5
  c.model.width = 16  # CPU-sized; paper: 64
  c.model.padding = "valid"
  c.model.upsampling = "transpose"
  c.model.batch_norm = False
  c.model.dropout = 0.5

  c.data.name = "isbi2012"
  c.data.root = "samples/isbi2012_membranes"
  c.data.crop_size = (128, 128)  # CPU-sized; paper: 388x388 output tiles
  c.data.scale_range = (1.0, 1.0)
  c.data.hflip = True

  c.loss.name = "cross_entropy"

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.99
  c.optimizer.weight_decay = 0.0
  c.schedule.name = "constant"
  return c
