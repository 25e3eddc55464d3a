"""CNN + RNN (ReSeg, Visin et al., CVPRW 2016) on CamVid.

ReSeg's public CamVid settings (fvisin/reseg ``evaluate_camvid.py``): two ReNet
layers of 100 GRU units per direction with patch sizes 2 and 1, no dropout or
BatchNorm, 480x360 frames; the paper stacks them on pre-trained VGG-16
convolutions, here VGG-16's conv1-conv3 blocks (output stride 8). ReSeg
trains with Adadelta, which jseg's optimiser registry does not provide: Adam
with learning rate 1e-3 is used instead.

CPU-sized run:
  python -m jseg.train --config=configs/cnn_rnn.py \
    --config.model.encoder_features='(16, 32, 32)' --config.model.hidden='(32, 32)' \
    --config.model.up_features=32 --config.data.crop_size='(96, 128)' \
    --config.batch_size=4 --config.total_steps=200
"""

from jseg.config import base_config


def get_config():
  c = base_config()
  c.batch_size = 5
  c.total_steps = 20000
  c.eval_every = 1000
  c.checkpoint_every = 1000

  c.model.name = "cnn_rnn"
  c.model.num_classes = 11
  c.model.encoder_features = (64, 128, 256)
  c.model.encoder_convs = (2, 2, 3)
  c.model.hidden = (100, 100)
  c.model.patches = (2, 1)
  c.model.up_features = 100

  c.data.crop_size = (360, 480)
  c.data.scale_range = (1.0, 1.0)
  c.data.hflip = False

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0
  c.schedule.name = "constant"
  return c
