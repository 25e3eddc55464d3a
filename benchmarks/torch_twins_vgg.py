"""Plain PyTorch twins of jseg's VGG-based networks, for the side-by-side speed benchmark.

FCN-32s/16s/8s (``jseg.models.fcn``), DeepLab v1 (``jseg.models.deeplab.DeepLabV1``),
SegNet and Bayesian SegNet (``jseg.models.segnet``), all on one VGG class that mirrors
``jseg.models.backbones.vgg.VGG`` (its Caffe layer names ``conv{s}_{i}``, ``bn{s}_{i}``,
``fc6``, ``fc7``) with the options these networks need: BatchNorm, conv1_1's padding,
ceil-mode pooling, pooling indices, and DeepLab v1's atrous stages and 3x3 pools.

Conventions as ``torch_models``: ``forward(x)`` takes NCHW float images and returns
``(logits at the input resolution, aux dict)``; none of these networks has an auxiliary
head, so the dict is always ``{}``. PyTorch's default initialisation, except FCN's
up-convolutions, which start as bilinear interpolation as jseg's do (they are learnable
parameters in both). Parameter counts equal jseg's. ``build(name, model_cfg)`` takes
the plain-dict jseg model config. Known remaining differences are in ``DIFFERENCES``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NAMES = ("fcn32s", "fcn16s", "fcn8s", "deeplabv1", "segnet", "bayesian_segnet")

_SEGNET_DIFF = ("none in the layers; jseg recomputes each unpooling position as the argmax of "
                "its encoder 2x2 window instead of storing indices (same function).")
DIFFERENCES = {
    "fcn32s": "none in the layers; jseg's up-convolutions are a 2x2 conv to s*s*K channels "
              "plus depth-to-space (same function as ConvTranspose2d(K, K, 2s, s)).",
    "fcn16s": "none in the layers; jseg's up-convolutions are a 2x2 conv to s*s*K channels "
              "plus depth-to-space (same function as ConvTranspose2d(K, K, 2s, s)).",
    "fcn8s": "none in the layers; jseg's up-convolutions are a 2x2 conv to s*s*K channels "
             "plus depth-to-space (same function as ConvTranspose2d(K, K, 2s, s)).",
    "deeplabv1": "none in the layers.",
    "segnet": _SEGNET_DIFF,
    "bayesian_segnet": _SEGNET_DIFF + " jseg's test-time Monte-Carlo sampling (mc_predict) "
                       "is not mirrored: eval() turns dropout off, as jseg's train=False.",
}

# Convolutions per stage (jseg.models.backbones.vgg.STAGE_CONVS); stage s has
# width * STAGE_MULT[s] channels.
STAGE_CONVS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
STAGE_MULT = (1, 2, 4, 8, 8)


class VGG(nn.Module):
  """jseg.models.backbones.vgg.VGG (and DeepLab v1's atrous trunk, DeepLabVGG).

  Every 3x3 conv has a bias; with ``batch_norm`` it is followed by BatchNorm (eps 1e-5)
  and ReLU, otherwise by ReLU. ``pools`` gives each stage's max pool as
  ``(kernel, stride)`` with padding ``(kernel - 1) // 2`` (2x2/2 in jseg's VGG; DeepLab
  v1: 3x3/2 for stages 1-3, 3x3/1 for 4-5), ``ceil_mode`` applies to all of them and
  ``dilations`` to each stage's convs. ``fc``: fc6 (7x7 valid) and fc7 (1x1), each with
  ReLU and dropout, as FCN's convolutionalised classifier. ``pool_dropout``: dropout
  after pool1..pool5 (Bayesian SegNet). Returns ``conv1..conv5`` (before pooling),
  ``pool1..pool5``, ``indices1..indices5`` (``return_indices``) and ``fc7`` (``fc``).
  """

  def __init__(self, depth: int = 16, width: int = 64, batch_norm: bool = False,
               ceil_mode: bool = False, first_padding: int = 1, fc: bool = False,
               fc_features: int = 4096, fc_dropout: float = 0.5,
               pool_dropout: Sequence[float] = (0.0,) * 5, return_indices: bool = False,
               dilations: Sequence[int] = (1,) * 5,
               pools: Sequence[tuple[int, int]] = ((2, 2),) * 5, in_channels: int = 3):
    super().__init__()
    if depth not in STAGE_CONVS:
      raise ValueError(f"VGG depth must be one of {sorted(STAGE_CONVS)}; got {depth}.")
    self.plan = []  # per stage: the names of its convs
    self.convs = nn.ModuleDict()
    self.bns = nn.ModuleDict()
    self.pools = nn.ModuleList()
    self.pool_drops = nn.ModuleList()
    self.return_indices = return_indices
    cin = in_channels
    for s, (n, m) in enumerate(zip(STAGE_CONVS[depth], STAGE_MULT)):
      ch, d = width * m, dilations[s]
      names = []
      for i in range(n):
        pad = first_padding if (s, i) == (0, 0) else d
        self.convs[f"conv{s + 1}_{i + 1}"] = nn.Conv2d(cin, ch, 3, 1, pad, d)
        if batch_norm:
          self.bns[f"bn{s + 1}_{i + 1}"] = nn.BatchNorm2d(ch, eps=1e-5)
        names.append((f"conv{s + 1}_{i + 1}", f"bn{s + 1}_{i + 1}" if batch_norm else None))
        cin = ch
      self.plan.append(names)
      k, stride = pools[s]
      self.pools.append(nn.MaxPool2d(k, stride, (k - 1) // 2, ceil_mode=ceil_mode,
                                     return_indices=return_indices))
      rate = pool_dropout[s]
      self.pool_drops.append(nn.Dropout(rate) if rate > 0 else nn.Identity())
    self.out_channels = cin
    self.fc = None
    if fc:
      layers = [nn.Conv2d(cin, fc_features, 7), nn.ReLU(inplace=True)]
      if fc_dropout > 0:
        layers.append(nn.Dropout(fc_dropout))
      layers += [nn.Conv2d(fc_features, fc_features, 1), nn.ReLU(inplace=True)]
      if fc_dropout > 0:
        layers.append(nn.Dropout(fc_dropout))
      self.fc = nn.Sequential(*layers)  # fc[0] is fc6, fc[2 or 3] is fc7
      self.out_channels = fc_features

  def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    feats = {}
    for s, names in enumerate(self.plan):
      for conv, bn in names:
        x = self.convs[conv](x)
        if bn is not None:
          x = self.bns[bn](x)
        x = F.relu(x, inplace=True)
      feats[f"conv{s + 1}"] = x
      if self.return_indices:
        x, feats[f"indices{s + 1}"] = self.pools[s](x)
      else:
        x = self.pools[s](x)
      x = self.pool_drops[s](x)
      feats[f"pool{s + 1}"] = x
    if self.fc is not None:
      feats["fc7"] = self.fc(x)
    return feats


def up(x: torch.Tensor, size) -> torch.Tensor:
  """jseg's resize_bilinear / resize_logits (half-pixel centres)."""
  if tuple(x.shape[2:]) == tuple(size):
    return x
  return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- FCN

FIRST_PADDING = 100
POOL4_CROP, POOL3_CROP = 5, 9
FINAL_CROP = {32: 19, 16: 27, 8: 31}


def bilinear_weight(size: int, channels: int) -> torch.Tensor:
  """FCN's ``upsample_filt`` on the channel diagonal, as a ConvTranspose2d weight (C, C, k, k)."""
  f = (size + 1) // 2
  c = f - 1 if size % 2 == 1 else f - 0.5
  filt1 = 1 - np.abs(np.arange(size, dtype=np.float64) - c) / f
  w = torch.zeros(channels, channels, size, size)
  w[range(channels), range(channels)] = torch.from_numpy(np.outer(filt1, filt1).astype(np.float32))
  return w


class BilinearUpsample(nn.ConvTranspose2d):
  """jseg.models.fcn.BilinearUpsample: learnable 2s x 2s stride-s up-convolution, no bias,
  initialised to bilinear interpolation; output ``(H + 1) s``."""

  def __init__(self, channels: int, stride: int):
    super().__init__(channels, channels, 2 * stride, stride, bias=False)
    with torch.no_grad():
      self.weight.copy_(bilinear_weight(2 * stride, channels))


def crop(x: torch.Tensor, offset: int, size, what: str) -> torch.Tensor:
  h, w = size
  if x.shape[2] < offset + h or x.shape[3] < offset + w:
    raise ValueError(f"FCN crop of {what}: map {x.shape[2]}x{x.shape[3]} is too small for offset "
                     f"{offset} and size {h}x{w}.")
  return x[:, :, offset:offset + h, offset:offset + w]


class FCN(nn.Module):
  """jseg 'fcn32s' / 'fcn16s' / 'fcn8s': VGG-16 (conv1_1 padding 100, ceil-mode pools,
  fc6 7x7 / fc7 1x1 with dropout), 1x1 score layers (with bias), learnable bilinear
  up-convolutions and the Caffe crops."""

  def __init__(self, num_classes: int, variant: int = 8, width: int = 64, fc_features: int = 4096,
               dropout: float = 0.5, batch_norm: bool = False, in_channels: int = 3):
    super().__init__()
    if variant not in FINAL_CROP:
      raise ValueError(f"FCN variant must be one of {sorted(FINAL_CROP)}; got {variant}.")
    self.variant = variant
    k = num_classes
    self.backbone = VGG(16, width, batch_norm, ceil_mode=True, first_padding=FIRST_PADDING, fc=True,
                        fc_features=fc_features, fc_dropout=dropout, in_channels=in_channels)
    self.score_fr = nn.Conv2d(fc_features, k, 1)
    if variant == 32:
      self.upscore = BilinearUpsample(k, 32)
      return
    self.upscore2 = BilinearUpsample(k, 2)
    self.score_pool4 = nn.Conv2d(width * 8, k, 1)
    if variant == 16:
      self.upscore16 = BilinearUpsample(k, 16)
      return
    self.upscore_pool4 = BilinearUpsample(k, 2)
    self.score_pool3 = nn.Conv2d(width * 4, k, 1)
    self.upscore8 = BilinearUpsample(k, 8)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    size = x.shape[2:]
    f = self.backbone(x)
    score = self.score_fr(f["fc7"])
    if self.variant == 32:
      return crop(self.upscore(score), FINAL_CROP[32], size, "upscore"), {}
    y = self.upscore2(score)
    y = y + crop(self.score_pool4(f["pool4"]), POOL4_CROP, y.shape[2:], "score_pool4")
    if self.variant == 16:
      return crop(self.upscore16(y), FINAL_CROP[16], size, "upscore16"), {}
    y = self.upscore_pool4(y)
    y = y + crop(self.score_pool3(f["pool3"]), POOL3_CROP, y.shape[2:], "score_pool3")
    return crop(self.upscore8(y), FINAL_CROP[8], size, "upscore8"), {}


# ----------------------------------------------------------------------------- DeepLab v1


class DeepLabV1(nn.Module):
  """jseg 'deeplabv1' (DeepLab-LargeFOV, no CRF): VGG-16 with 3x3 pools (stride 2 for
  pools 1-3, 1 for pools 4-5), conv5 at rate 2, fc6 3x3 at rate ``fc6_dilation``, fc7 1x1
  (each ReLU + dropout), fc8 1x1 classifier, bilinear upsampling to the input size."""

  def __init__(self, num_classes: int, width: int = 64, fc_features: int = 1024,
               fc6_dilation: int = 12, dropout: float = 0.5, in_channels: int = 3):
    super().__init__()
    self.vgg = VGG(16, width, dilations=(1, 1, 1, 1, 2),
                   pools=((3, 2), (3, 2), (3, 2), (3, 1), (3, 1)), in_channels=in_channels)
    d = fc6_dilation
    self.fc6 = nn.Conv2d(self.vgg.out_channels, fc_features, 3, 1, d, d)
    self.fc7 = nn.Conv2d(fc_features, fc_features, 1)
    self.fc8 = nn.Conv2d(fc_features, num_classes, 1)
    self.drop = nn.Dropout(dropout)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    y = self.vgg(x)["pool5"]
    y = self.drop(F.relu(self.fc6(y), inplace=True))
    y = self.drop(F.relu(self.fc7(y), inplace=True))
    return up(self.fc8(y), x.shape[2:]), {}


# ----------------------------------------------------------------------------- SegNet

# Decoder stages 5..1 (jseg.models.segnet.DECODER): (Caffe name, channels / width) per
# 3x3 conv (bias) + BN + ReLU; stage 1 ends with the 3x3 classifier conv1_1_D.
DECODER = {
    5: (("conv5_3_D", 8), ("conv5_2_D", 8), ("conv5_1_D", 8)),
    4: (("conv4_3_D", 8), ("conv4_2_D", 8), ("conv4_1_D", 4)),
    3: (("conv3_3_D", 4), ("conv3_2_D", 4), ("conv3_1_D", 2)),
    2: (("conv2_2_D", 2), ("conv2_1_D", 1)),
    1: (("conv1_2_D", 1),),
}


class SegNet(nn.Module):
  """jseg 'segnet' / 'bayesian_segnet': VGG-16-BN encoder (2x2 floor-mode pools with
  indices), decoder stages that max-unpool by those indices then run 3x3 conv (bias) +
  BN + ReLU units, a 3x3 classifier. ``dropout > 0`` (Bayesian SegNet): dropout after
  pool3, pool4, pool5 and after decoder stages 5, 4, 3."""

  def __init__(self, num_classes: int, width: int = 64, dropout: float = 0.0, in_channels: int = 3):
    super().__init__()
    self.backbone = VGG(16, width, batch_norm=True, pool_dropout=(0.0, 0.0, dropout, dropout, dropout),
                        return_indices=True, in_channels=in_channels)
    self.decoder = nn.ModuleDict()
    cin = self.backbone.out_channels
    for stage in (5, 4, 3, 2, 1):
      for name, mult in DECODER[stage]:
        self.decoder[name] = nn.Sequential(nn.Conv2d(cin, width * mult, 3, padding=1),
                                           nn.BatchNorm2d(width * mult, eps=1e-5), nn.ReLU(inplace=True))
        cin = width * mult
    self.classifier = nn.Conv2d(cin, num_classes, 3, padding=1)  # conv1_1_D
    self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if min(x.shape[2:]) < 32:
      raise ValueError(f"SegNet needs inputs of at least 32x32 pixels; got {x.shape[2]}x{x.shape[3]}.")
    f = self.backbone(x)
    y = f["pool5"]
    for stage in (5, 4, 3, 2, 1):
      y = F.max_unpool2d(y, f[f"indices{stage}"], 2, 2, output_size=f[f"conv{stage}"].shape[2:])
      for name, _ in DECODER[stage]:
        y = self.decoder[name](y)
      if stage in (5, 4, 3):
        y = self.drop(y)
    return self.classifier(y), {}


# ----------------------------------------------------------------------------- build


def _check(cfg: dict, ints: Sequence[str] = (), rates: Sequence[str] = ()) -> None:
  for k in ints:
    if k in cfg and not (isinstance(cfg[k], int) and cfg[k] > 0):
      raise ValueError(f"model.{k} must be a positive integer for the torch twin; got {cfg[k]!r}.")
  for k in rates:
    if k in cfg and not 0.0 <= float(cfg[k]) < 1.0:
      raise ValueError(f"model.{k} must be in [0, 1); got {cfg[k]!r}.")


def build(name: str, model_cfg: dict) -> nn.Module:
  """The twin of jseg model ``name`` from the jseg model config (a plain dict).

  Every option jseg's builders read for these models is covered (FCN: width,
  fc_features, dropout, batch_norm; DeepLab v1: width, fc_features, fc6_dilation,
  dropout; SegNet: width, dropout); ValueError for values the twin cannot take.
  """
  k = model_cfg["num_classes"]
  get = model_cfg.get
  if name in ("fcn32s", "fcn16s", "fcn8s"):
    _check(model_cfg, ("width", "fc_features"), ("dropout",))
    return FCN(k, int(name[3:-1]), get("width", 64), get("fc_features", 4096), get("dropout", 0.5),
               bool(get("batch_norm", False)))
  if name == "deeplabv1":
    _check(model_cfg, ("width", "fc_features", "fc6_dilation"), ("dropout",))
    return DeepLabV1(k, get("width", 64), get("fc_features", 1024), get("fc6_dilation", 12),
                     get("dropout", 0.5))
  if name in ("segnet", "bayesian_segnet"):
    _check(model_cfg, ("width",), ("dropout",))
    return SegNet(k, get("width", 64), get("dropout", 0.0 if name == "segnet" else 0.5))
  raise KeyError(f"No torch twin for model '{name}' here. Available: {', '.join(NAMES)}.")
