"""FCN-8s (Long, Shelhamer & Darrell, CVPR 2015) on CamVid (SegNet's 11-class split).

Paper settings kept here: VGG-16 with fc6/fc7 as convolutions (4096 channels),
dropout 0.5, learnable bilinear-initialised upsampling, SGD with momentum 0.9
and weight decay 5e-4 at a fixed learning rate, whole images. The paper scores
PASCAL VOC's 21 classes (``--config.model.num_classes=21`` with a VOC
``folder`` dataset); here the dataset is CamVid, 11 classes. The paper's lr
1e-4 (batch 20) is for a loss summed over pixels; our loss is the per-pixel
mean, hence the larger lr. The paper initialises from ImageNet VGG-16
(``jseg.models.pretrained.load_pretrained(variables, 'vgg16.pth')``) and
trains 32s -> 16s -> 8s in stages.

Fields marked "CPU-sized" are shrunk for the 2-core CPU; the paper-sized run:

  python -m jseg.train --config=configs/fcn8s.py --config.model.width=64 \
    --config.model.fc_features=4096 --config.batch_size=20 \
    --config.data.crop_size='(360, 480)' --config.data.root=/path/to/CamVid \
    --config.total_steps=20000
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 4  # CPU-sized; paper: 20
  c.total_steps = 300  # CPU-sized
  c.eval_every = 150
  c.checkpoint_every = 50
  c.log_every = 10

  c.model.name = "fcn8s"
  c.model.num_classes = 11
  c.model.width = 16  # CPU-sized; paper: 64
  c.model.fc_features = 256  # CPU-sized; paper: 4096
  c.model.dropout = 0.5
  c.model.batch_norm = False

  c.data.name = "camvid"
  c.data.root = "samples/camvid"
  c.data.crop_size = (192, 256)  # CPU-sized; paper: whole images
  c.data.scale_range = (1.0, 1.0)
  c.data.hflip = True

  c.loss.name = "cross_entropy"

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "constant"
  return c
