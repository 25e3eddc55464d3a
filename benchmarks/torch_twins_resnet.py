"""Plain PyTorch twins of jseg's ResNet-based DeepLab v2, RefineNet and FastFCN.

The companions of ``torch_models.py`` for the side-by-side speed benchmark, built on
its ResNet (``torch_models.ResNet``: same blocks, stage plan and dilations as
``jseg.models.backbones.resnet``, layer1..layer4 by name at output stride 8, 16 or 32)
and its ``conv_bn_relu``, ``FCNHead``, ``ASPP`` and ``up``. Each twin computes the same
layers as the jseg model of the same name (channels, kernels, paddings, strides,
dilations, biases, BatchNorm eps, ReLU and dropout placement, pooling, bilinear
upsampling with half-pixel centres, heads); parameter counts equal jseg's. As there,
``forward(x)`` takes NCHW floats and returns ``(logits at the input size, aux)``, with
``aux`` holding jseg's auxiliary outputs in training mode and ``{}`` in eval mode.
Initialisation is PyTorch's default, which is also what jseg's RefineNet decoder uses
(``refinenet._DECODER_INIT``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import torch_models
from torch_models import ASPP, FCNHead, PyramidPooling, ResNet, conv_bn_relu, resnet_channels, up

NAMES = ("deeplabv2", "refinenet", "fastfcn")

DIFFERENCES = {
    "deeplabv2": "none in the layers.",
    "refinenet": "none in the layers; jseg's 5x5 stride-1 max pools are separable shifted "
                 "maxima (same function).",
    "fastfcn": "none in the layers; jseg's JPU depthwise convs are sums of 9 shifted products "
               "or oneDNN grouped convs (same function).",
}


def _resnet(depth: int, width: int, output_stride: int) -> ResNet:
  if depth not in torch_models.STAGES:
    raise ValueError(f"The torch ResNet twin has depths {sorted(torch_models.STAGES)}; got {depth}.")
  return ResNet(depth, width, output_stride)


# ----------------------------------------------------------------------------- DeepLab v2


class ASPPSum(nn.Module):
  """jseg.models.deeplab.ASPPSum: 3x3 atrous classifiers (with bias), outputs summed."""

  def __init__(self, cin: int, num_classes: int, rates: Sequence[int]):
    super().__init__()
    self.branches = nn.ModuleList([nn.Conv2d(cin, num_classes, 3, padding=r, dilation=r)
                                   for r in rates])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.branches[0](x)
    for branch in self.branches[1:]:
      out = out + branch(x)
    return out


class DeepLabV2(nn.Module):
  """jseg 'deeplabv2': dilated ResNet (output stride 8 or 16) + ASPP-L, no aux output."""

  def __init__(self, num_classes: int, depth: int = 101, width: int = 64, output_stride: int = 8,
               rates: Sequence[int] = (6, 12, 18, 24)):
    super().__init__()
    self.backbone = _resnet(depth, width, output_stride)
    self.aspp = ASPPSum(resnet_channels(depth, width)["layer4"], num_classes, rates)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return up(self.aspp(self.backbone(x)["layer4"]), x.shape[2:]), {}


# ----------------------------------------------------------------------------- RefineNet


def conv3(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
  """refinenet._conv3: 3x3 conv, padding 1, bias only where asked."""
  return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class RCU(nn.Module):
  """jseg.models.refinenet.RCU: ``blocks`` times x + conv2(relu(conv1(relu(x)))), conv1 biased."""

  def __init__(self, features: int, blocks: int = 2):
    super().__init__()
    self.units = nn.ModuleList([nn.ModuleList([conv3(features, features, True),
                                               conv3(features, features)])
                                for _ in range(blocks)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for conv1, conv2 in self.units:
      x = x + conv2(F.relu(conv1(F.relu(x))))
    return x


class CRP(nn.Module):
  """jseg.models.refinenet.CRP: x + the chained (5x5 stride-1 max pool, 3x3 conv) stages."""

  def __init__(self, features: int, stages: int = 4, pool: int = 5):
    super().__init__()
    self.pool = pool
    self.stages = nn.ModuleList([conv3(features, features) for _ in range(stages)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    top = x
    for conv in self.stages:
      top = conv(F.max_pool2d(top, self.pool, 1, self.pool // 2))
      x = x + top
    return x


class RefineNetBlock(nn.Module):
  """jseg.models.refinenet.RefineNetBlock: adaptive RCUs, MRF (when a coarser path comes in),
  CRP on the ReLU'd sum, output RCUs, and the MRF conv for the next block (``out_features``)."""

  def __init__(self, features: int, out_features: int | None, coarser: bool, rcu_blocks: int = 2,
               crp_stages: int = 4, out_rcu_blocks: int = 3):
    super().__init__()
    self.adapt = RCU(features, rcu_blocks)
    self.mrf_conv = conv3(features, features) if coarser else None
    self.crp = CRP(features, crp_stages)
    self.out = RCU(features, out_rcu_blocks)
    self.mrf_out_conv = conv3(features, out_features) if out_features is not None else None

  def forward(self, x: torch.Tensor, coarser: torch.Tensor | None) -> torch.Tensor:
    x = self.adapt(x)
    if self.mrf_conv is not None:
      x = self.mrf_conv(x)
      x = x + up(coarser, x.shape[2:])
    x = self.out(self.crp(F.relu(x)))
    return self.mrf_out_conv(x) if self.mrf_out_conv is not None else x


class RefineNet(nn.Module):
  """jseg 'refinenet': 4-cascaded RefineNet on a ResNet at output stride 32, no aux output.

  Dropout on layer3/layer4 before their reduce convs and before the 3x3 classifier (biased);
  path widths 2*features (stride 32) and features (strides 16, 8, 4).
  """

  LEVELS = ("layer4", "layer3", "layer2", "layer1")

  def __init__(self, num_classes: int, depth: int = 101, width: int = 64, features: int = 256,
               rcu_blocks: int = 2, crp_stages: int = 4, out_rcu_blocks: int = 3,
               dropout: float = 0.5):
    super().__init__()
    self.backbone = _resnet(depth, width, 32)
    ch = resnet_channels(depth, width)
    f = features
    widths = (2 * f, f, f, f)
    self.drop = nn.Dropout(dropout)
    self.reduce = nn.ModuleList([conv3(ch[lv], w) for lv, w in zip(self.LEVELS, widths)])
    self.refine = nn.ModuleList([  # refine4 (coarsest) ... refine1
        RefineNetBlock(w, f if i < 3 else None, i > 0, rcu_blocks, crp_stages, out_rcu_blocks)
        for i, w in enumerate(widths)])
    self.classifier = nn.Conv2d(f, num_classes, 3, padding=1)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    feats = self.backbone(x)
    y = None
    for level, reduce, block in zip(self.LEVELS, self.reduce, self.refine):
      h = feats[level]
      if level in ("layer4", "layer3"):
        h = self.drop(h)
      y = block(reduce(h), y)
    y = self.classifier(self.drop(y))
    return up(y, x.shape[2:]), {}


# ----------------------------------------------------------------------------- FastFCN


class JPUBranch(nn.Module):
  """jseg.models.fastfcn.JPUBranch: depthwise 3x3 (dilated, no bias), BN, pointwise 1x1
  (no bias), BN, ReLU; both BatchNorms eps 1e-5."""

  def __init__(self, cin: int, features: int, dilation: int):
    super().__init__()
    self.depthwise = nn.Conv2d(cin, cin, 3, 1, dilation, dilation, groups=cin, bias=False)
    self.depthwise_bn = nn.BatchNorm2d(cin)
    self.pointwise = nn.Conv2d(cin, features, 1, bias=False)
    self.bn = nn.BatchNorm2d(features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.depthwise_bn(self.depthwise(x))
    return F.relu(self.bn(self.pointwise(x)))


class JPU(nn.Module):
  """jseg.models.fastfcn.JPU: 3x3 ConvBNReLU on layer4/3/2, upsampled to layer2's size and
  concatenated (in that order), then the dilated separable branches, concatenated."""

  def __init__(self, channels: dict[str, int], features: int = 512,
               dilations: Sequence[int] = (1, 2, 4, 8)):
    super().__init__()
    self.conv5 = conv_bn_relu(channels["layer4"], features)
    self.conv4 = conv_bn_relu(channels["layer3"], features)
    self.conv3 = conv_bn_relu(channels["layer2"], features)
    self.branches = nn.ModuleList([JPUBranch(3 * features, features, d) for d in dilations])

  def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> torch.Tensor:
    size = c3.shape[2:]
    y = torch.cat([up(self.conv5(c5), size), up(self.conv4(c4), size), self.conv3(c3)], 1)
    return torch.cat([b(y) for b in self.branches], 1)


class FastFCN(nn.Module):
  """jseg 'fastfcn': ResNet + JPU (or a dilated ResNet) + FCN/PSP/ASPP head, aux FCN head on layer3.

  jseg creates the aux head's parameters even when it is off at evaluation, so the twin
  always has it (when ``aux_head``) and returns its output in training mode only.
  """

  def __init__(self, num_classes: int, depth: int = 101, width: int = 64, jpu: bool = True,
               output_stride: int = 8, jpu_features: int = 512, head: str = "fcn",
               head_features: int = 512, aux_head: bool = True, aux_features: int = 256,
               dropout: float = 0.1):
    super().__init__()
    self.backbone = _resnet(depth, width, 32 if jpu else output_stride)
    ch = resnet_channels(depth, width)
    self.jpu = JPU(ch, jpu_features) if jpu else None
    c = 4 * jpu_features if jpu else ch["layer4"]
    self.head_kind = head
    if head == "fcn":
      self.head = FCNHead(c, head_features, num_classes, dropout)
    elif head == "psp":
      self.head = nn.Sequential(PyramidPooling(c, (1, 2, 3, 6), c // 4),
                                FCNHead(c + 4 * (c // 4), head_features, num_classes, dropout))
    elif head == "aspp":
      stride = 8 if jpu else output_stride
      self.head = nn.Sequential(ASPP(c, 256, tuple(r * 16 // stride for r in (6, 12, 18)), False, dropout),
                                nn.Conv2d(256, num_classes, 1))
    else:
      raise ValueError(f"fastfcn head must be 'fcn', 'psp' or 'aspp'; got {head!r}.")
    self.aux = FCNHead(ch["layer3"], aux_features, num_classes, dropout) if aux_head else None

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    size = x.shape[2:]
    f = self.backbone(x)
    top = self.jpu(f["layer2"], f["layer3"], f["layer4"]) if self.jpu is not None else f["layer4"]
    y = up(self.head(top), size)
    aux = {"aux": up(self.aux(f["layer3"]), size)} if self.training and self.aux is not None else {}
    return y, aux


# ----------------------------------------------------------------------------- build


def _take(cfg: dict, keys: Sequence[str], rename: dict[str, str] | None = None) -> dict:
  out = {}
  for k in keys:
    if k in cfg:
      v = cfg[k]
      out[(rename or {}).get(k, k)] = tuple(v) if isinstance(v, list) else v
  return out


def build(name: str, model_cfg: dict) -> nn.Module:
  """The twin of jseg model ``name`` from the jseg model config (a plain dict)."""
  k = model_cfg["num_classes"]
  if name == "deeplabv2":
    if model_cfg.get("output_stride", 8) not in (8, 16):
      raise ValueError(f"model.output_stride must be 8 or 16; got {model_cfg['output_stride']}.")
    return DeepLabV2(k, **_take(model_cfg, ("depth", "width", "output_stride", "aspp_rates"),
                                {"aspp_rates": "rates"}))
  if name == "refinenet":
    return RefineNet(k, **_take(model_cfg, ("depth", "width", "features", "rcu_blocks", "crp_stages",
                                            "out_rcu_blocks", "dropout")))
  if name == "fastfcn":
    jpu = model_cfg.get("jpu", True)
    os_ = model_cfg.get("output_stride", 8)
    if os_ not in ((8,) if jpu else (8, 16)):
      raise ValueError(f"model.output_stride must be 8 with the JPU (8 or 16 without); got {os_}.")
    return FastFCN(k, **_take(model_cfg, ("depth", "width", "jpu", "output_stride", "jpu_features",
                                          "head", "head_features", "aux_head", "aux_features",
                                          "dropout")))
  raise KeyError(f"No torch twin for model '{name}' here. Available: {', '.join(NAMES)}.")
