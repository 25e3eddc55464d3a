"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017) on CamVid, 11 classes.

Paper settings: VGG-16-BN encoder and mirrored decoder with pooling-index
unpooling, whole 360x480 images, cross-entropy with SegNet's median-frequency
class weights (class 11 "Unlabelled" is ignored), SGD with momentum 0.9 at a
fixed learning rate. The TPAMI paper states lr 0.1 and mini-batch 12; the
reference Caffe solver (SegNet-Tutorial ``segnet_solver.prototxt``) uses
lr 0.001 and weight decay 5e-4, which is what this config uses. The paper
initialises the encoder from ImageNet VGG-16
(``load_pretrained(variables, 'vgg16_bn.pth')``).

Fields marked "CPU-sized" are shrunk for the 2-core CPU; the paper-sized run:

  python -m jseg.train --config=configs/segnet.py --config.model.width=64 \
    --config.batch_size=12 --config.data.crop_size='(360, 480)' \
    --config.data.root=/path/to/CamVid --config.total_steps=40000
"""

from jseg.config import base_config

# SegNet's median-frequency weights for CamVid classes 0-10 (its training prototxt).
CAMVID_CLASS_WEIGHTS = (
    0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614,
)


def get_config():
  c = base_config()
  c.batch_size = 4  # CPU-sized; paper: 12
  c.total_steps = 300  # CPU-sized; reference solver: 40000
  c.eval_every = 150
  c.checkpoint_every = 50
  c.log_every = 10

  c.model.name = "segnet"
  c.model.num_classes = 11
  c.model.width = 16  # CPU-sized; paper: 64

  c.data.name = "camvid"
  c.data.root = "samples/camvid"
  c.data.crop_size = (176, 240)  # CPU-sized; paper: whole 360x480 images
  c.data.scale_range = (1.0, 1.0)
  c.data.hflip = False

  c.loss.name = "cross_entropy"
  c.loss.class_weights = CAMVID_CLASS_WEIGHTS

  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.001
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "constant"
  return c
