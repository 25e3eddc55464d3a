"""UNet++ with deep supervision (Zhou et al., DLMIA 2018) on ISBI 2012 membranes.

Paper settings: L4 (four downsamplings), 32-64-128-256-512 channels, 2x2
up-convolutions, deep supervision with a head on every X[0][j], the hybrid
loss 0.5 * cross-entropy + Dice summed over the heads (``aux_weight`` 1, as
the reference Keras model sums its outputs' losses), Adam with lr 3e-4. The
paper's datasets (nuclei, polyps, liver, lung nodules) are not shipped;
ISBI 2012 is the binary EM task here (softmax over 2 classes). Pruned
inference: ``--config.model.prune_level=1..3`` at evaluation.

Fields marked "CPU-sized" are shrunk for the 2-core CPU; the paper-sized run:

  python -m jseg.train --config=configs/unetpp.py --config.model.width=32 \
    --config.data.crop_size='(512, 512)' \
    --config.data.root=/path/to/unet/data/membrane --config.total_steps=10000
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 2
  c.total_steps = 300  # CPU-sized
  c.eval_every = 150
  c.checkpoint_every = 50
  c.log_every = 10

  c.model.name = "unetpp"
  c.model.num_classes = 2
  c.model.depth = 4
  c.model.width = 8  # CPU-sized; paper: 32
  c.model.batch_norm = True
  c.model.deep_supervision = True
  c.model.prune_level = 0

  c.data.name = "isbi2012"
  c.data.root = "samples/isbi2012_membranes"
  c.data.crop_size = (128, 128)  # CPU-sized; paper: whole images
  c.data.scale_range = (1.0, 1.0)
  c.data.hflip = True

  c.loss.name = "combo"
  c.loss.terms = (("cross_entropy", 0.5), ("dice", 1.0))
  c.loss.aux_weight = 1.0

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-4
  c.optimizer.weight_decay = 0.0
  c.schedule.name = "constant"
  return c
