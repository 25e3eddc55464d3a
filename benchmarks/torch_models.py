"""Plain PyTorch twins of jseg's networks, for the side-by-side speed benchmark.

Each class computes the same architecture as the jseg model of the same name
(same layers, channel counts, strides, dilations, BatchNorm placement, upsampling
and heads) so that a training step does the same work; parameter counts equal
jseg's (checked by ``python -m jseg.bench models`` and ``tests/test_bench.py``).
Only the speed matters here: initialisation follows PyTorch defaults.

segmentation_models.pytorch (smp) cannot stand in for these on the CPU machine: smp 0.6
imports ``timm`` and its ResNet encoders subclass ``torchvision.models.resnet.ResNet``,
and the only torchvision wheels on the registry are CUDA builds whose compiled ops need
``libtorch_cuda`` (``import torchvision`` fails beside ``torch==2.13.0+cpu``). Where it
imports (the leased GPU image), ``python -m jseg.bench models --smp=auto`` adds smp's
network of the same name as a reference row (``torch_bench.py --smp``).
smp's models also differ from jseg's (its U-Net/UNet++ use a ResNet encoder,
its PSPNet stops at encoder depth 3), so twins of jseg's own networks are the
closer comparison anyway.

This file holds the twins of U-Net, UNet++, PSPNet and DeepLab v3/v3+ and the blocks
the others reuse; the rest live beside it, one module per family (``FAMILIES``:
``torch_twins_vgg`` FCN-32s/16s/8s, DeepLab v1, SegNet, Bayesian SegNet;
``torch_twins_resnet`` DeepLab v2, RefineNet, FastFCN; ``torch_twins_cnn_rnn``), and
``build`` dispatches to them. Each of those was checked once against jseg's network with
jseg's parameters copied in (eval outputs equal to ~1e-5 relative; the check scripts were
not kept, ``tests/test_bench.py`` checks every twin's parameter count).

Layouts differ only where the frameworks do: NCHW (or ``channels_last``) here,
NHWC in jseg. Known remaining differences are listed in ``DIFFERENCES``.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DIFFERENCES = {
    "unet": "none in the layers; jseg's up-convolution is a per-pixel einsum (same function).",
    "unetpp": "none in the layers.",
    "pspnet": "none in the layers (adaptive pooling as torch's AdaptiveAvgPool2d, bilinear align_corners=False).",
    "deeplabv3": "none in the layers.",
    "deeplabv3plus": "jseg's depthwise convs are sums of 9 shifted products (same function); the 16/2 "
                     "middle-flow modules are an nn.scan in jseg, a Python loop here.",
}


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1,
                 relu: bool = True, eps: float = 1e-5) -> nn.Sequential:
  """jseg.models.layers.ConvBNReLU: conv (no bias, symmetric padding), BN, ReLU."""
  layers = [nn.Conv2d(cin, cout, k, stride, dilation * (k - 1) // 2, dilation, bias=False),
            nn.BatchNorm2d(cout, eps=eps)]
  if relu:
    layers.append(nn.ReLU(inplace=True))
  return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- U-Net family


class DoubleConv(nn.Module):
  """Two 3x3 conv(+BN)+ReLU, as jseg.models.unet.DoubleConv with padding 'same'."""

  def __init__(self, cin: int, cout: int, batch_norm: bool = True):
    super().__init__()
    layers = []
    for c in (cin, cout):
      layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=not batch_norm))
      if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
      layers.append(nn.ReLU(inplace=True))
    self.body = nn.Sequential(*layers)

  def forward(self, x):
    return self.body(x)


class UNet(nn.Module):
  """jseg 'unet' with padding='same', upsampling='transpose' (2x2 up-convolution)."""

  def __init__(self, num_classes: int, depth: int = 5, width: int = 64, batch_norm: bool = True,
               dropout: float = 0.0, in_channels: int = 3):
    super().__init__()
    ch = [width * 2**i for i in range(depth)]
    self.enc = nn.ModuleList(
        [DoubleConv(in_channels if i == 0 else ch[i - 1], ch[i], batch_norm) for i in range(depth)])
    self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, 2) for i in range(depth - 1)])
    self.dec = nn.ModuleList([DoubleConv(2 * ch[i], ch[i], batch_norm) for i in range(depth - 1)])
    self.classifier = nn.Conv2d(ch[0], num_classes, 1)

  def forward(self, x):
    skips = []
    for i, enc in enumerate(self.enc):
      if i > 0:
        skips.append(x)
        x = F.max_pool2d(x, 2)
      x = enc(x)
    x = self.drop(x)
    for i in reversed(range(len(self.up))):
      x = self.dec[i](torch.cat([skips[i], self.up[i](x)], 1))
    return self.classifier(x), {}


class UNetPlusPlus(nn.Module):
  """jseg 'unetpp' (nested skips, 2x2 up-convolutions), without deep supervision."""

  def __init__(self, num_classes: int, depth: int = 4, width: int = 32, batch_norm: bool = True,
               in_channels: int = 3):
    super().__init__()
    self.depth = depth
    ch = [width * 2**i for i in range(depth + 1)]
    self.blocks = nn.ModuleDict()
    self.ups = nn.ModuleDict()
    for i in range(depth + 1):
      self.blocks[f"{i}_0"] = DoubleConv(in_channels if i == 0 else ch[i - 1], ch[i], batch_norm)
    for j in range(1, depth + 1):
      for i in range(depth + 1 - j):
        self.ups[f"{i}_{j}"] = nn.ConvTranspose2d(ch[i + 1], ch[i], 2, 2)
        self.blocks[f"{i}_{j}"] = DoubleConv(ch[i] * (j + 1), ch[i], batch_norm)
    self.head = nn.Conv2d(ch[0], num_classes, 1)

  def forward(self, x):
    n = {}
    for i in range(self.depth + 1):
      n[i, 0] = self.blocks[f"{i}_0"](x if i == 0 else F.max_pool2d(n[i - 1, 0], 2))
    for j in range(1, self.depth + 1):
      for i in range(self.depth + 1 - j):
        up = self.ups[f"{i}_{j}"](n[i + 1, j - 1])
        n[i, j] = self.blocks[f"{i}_{j}"](torch.cat([n[i, k] for k in range(j)] + [up], 1))
    return self.head(n[0, self.depth]), {}


# ----------------------------------------------------------------------------- ResNet family

STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
          152: ("bottleneck", (3, 8, 36, 3))}


def stage_plan(output_stride: int):
  return {32: ((1, 1), (2, 1), (2, 1), (2, 1)), 16: ((1, 1), (2, 1), (2, 1), (1, 2)),
          8: ((1, 1), (2, 1), (1, 2), (1, 4))}[output_stride]


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, dilation, downsample):
    super().__init__()
    self.conv1 = conv_bn_relu(cin, planes, 3, stride, dilation)
    self.conv2 = conv_bn_relu(planes, planes, 3, 1, dilation, relu=False)
    self.down = conv_bn_relu(cin, planes, 1, stride, relu=False) if downsample else None

  def forward(self, x):
    y = self.conv2(self.conv1(x))
    return F.relu(y + (self.down(x) if self.down is not None else x))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, dilation, downsample):
    super().__init__()
    self.body = nn.Sequential(conv_bn_relu(cin, planes, 1), conv_bn_relu(planes, planes, 3, stride, dilation),
                              conv_bn_relu(planes, planes * 4, 1, relu=False))
    self.down = conv_bn_relu(cin, planes * 4, 1, stride, relu=False) if downsample else None

  def forward(self, x):
    return F.relu(self.body(x) + (self.down(x) if self.down is not None else x))


class ResNet(nn.Module):
  """jseg.models.backbones.resnet.ResNet: every block of a dilated stage uses its rate."""

  def __init__(self, depth: int = 50, width: int = 64, output_stride: int = 32,
               multi_grid: Sequence[int] = (1, 1, 1), in_channels: int = 3):
    super().__init__()
    kind, counts = STAGES[depth]
    block = BasicBlock if kind == "basic" else Bottleneck
    self.stem = conv_bn_relu(in_channels, width, 7, 2)
    self.layers = nn.ModuleList()
    cin = width
    for li, ((stride, dil), count) in enumerate(zip(stage_plan(output_stride), counts)):
      planes = width * 2**li
      grid = tuple(multi_grid) if li == 3 else (1,) * count
      blocks = []
      for bi in range(count):
        blocks.append(block(cin, planes, stride if bi == 0 else 1, dil * grid[bi % len(grid)],
                            bi == 0 and (stride != 1 or cin != planes * block.expansion)))
        cin = planes * block.expansion
      self.layers.append(nn.Sequential(*blocks))

  def forward(self, x):
    x = self.stem(x)
    feats = {"stem": x}
    x = F.max_pool2d(x, 3, 2, 1)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      feats[f"layer{i + 1}"] = x
    return feats


def resnet_channels(depth: int, width: int) -> dict[str, int]:
  exp = 1 if STAGES[depth][0] == "basic" else 4
  return {f"layer{i + 1}": width * 2**i * exp for i in range(4)}


def up(x, size):
  return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FCNHead(nn.Module):
  def __init__(self, cin, features, num_classes, dropout):
    super().__init__()
    self.body = nn.Sequential(conv_bn_relu(cin, features), nn.Dropout(dropout),
                              nn.Conv2d(features, num_classes, 1))

  def forward(self, x):
    return self.body(x)


class PyramidPooling(nn.Module):
  """jseg.models.pspnet.PyramidPooling: adaptive average pools, 1x1 ConvBNReLU each,
  upsampled and concatenated after the input."""

  def __init__(self, cin: int, bins: Sequence[int] = (1, 2, 3, 6), features: int = 512):
    super().__init__()
    self.bins = tuple(bins)
    self.convs = nn.ModuleList([conv_bn_relu(cin, features, 1) for _ in self.bins])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    size = x.shape[2:]
    return torch.cat([x] + [up(conv(F.adaptive_avg_pool2d(x, b)), size)
                            for b, conv in zip(self.bins, self.convs)], 1)


class PSPNet(nn.Module):
  """jseg 'pspnet': dilated ResNet, pyramid pooling (1, 2, 3, 6), FCN head, aux head on layer3."""

  def __init__(self, num_classes: int, depth: int = 50, width: int = 64, output_stride: int = 8,
               bins: Sequence[int] = (1, 2, 3, 6), head_features: int = 512, aux_head: bool = True,
               aux_features: int = 256, dropout: float = 0.1):
    super().__init__()
    self.backbone = ResNet(depth, width, output_stride)
    ch = resnet_channels(depth, width)
    c = ch["layer4"]
    self.ppm = PyramidPooling(c, bins, c // len(bins))
    self.head = FCNHead(c + len(bins) * (c // len(bins)), head_features, num_classes, dropout)
    self.aux = FCNHead(ch["layer3"], aux_features, num_classes, dropout) if aux_head else None

  def forward(self, x):
    size = x.shape[2:]
    f = self.backbone(x)
    y = up(self.head(self.ppm(f["layer4"])), size)
    aux = {"aux": up(self.aux(f["layer3"]), size)} if self.training and self.aux is not None else {}
    return y, aux


# ----------------------------------------------------------------------------- DeepLab family


class SeparableConv(nn.Module):
  """jseg's SeparableConv: depthwise 3x3 + BN [+ReLU], pointwise 1x1 + BN [+ReLU] (BN eps 1e-3)."""

  def __init__(self, cin, cout, stride=1, dilation=1, relu_inside=False):
    super().__init__()
    self.relu_inside = relu_inside
    self.dw = nn.Conv2d(cin, cin, 3, stride, dilation, dilation, groups=cin, bias=False)
    self.dw_bn = nn.BatchNorm2d(cin, eps=1e-3)
    self.pw = nn.Conv2d(cin, cout, 1, bias=False)
    self.pw_bn = nn.BatchNorm2d(cout, eps=1e-3)

  def forward(self, x):
    x = self.dw_bn(self.dw(x))
    if self.relu_inside:
      x = F.relu(x)
    x = self.pw_bn(self.pw(x))
    return F.relu(x) if self.relu_inside else x


class ASPP(nn.Module):
  """jseg.models.deeplab.ASPP: 1x1, atrous 3x3 (or separable) branches, image pooling, projection."""

  def __init__(self, cin, features, rates, separable=False, dropout=0.1):
    super().__init__()
    self.branches = nn.ModuleList([conv_bn_relu(cin, features, 1)])
    for r in rates:
      self.branches.append(SeparableConv(cin, features, 1, r, True) if separable
                           else conv_bn_relu(cin, features, 3, 1, r))
    self.pool = conv_bn_relu(cin, features, 1)
    self.project = conv_bn_relu(features * (len(rates) + 2), features, 1)
    self.drop = nn.Dropout(dropout)

  def forward(self, x):
    outs = [b(x) for b in self.branches]
    g = self.pool(x.mean((2, 3), keepdim=True))
    outs.append(g.expand(-1, -1, x.shape[2], x.shape[3]))
    return self.drop(self.project(torch.cat(outs, 1)))


class DeepLabV3(nn.Module):
  """jseg 'deeplabv3': ResNet with multi-grid, ASPP with BN and image pooling, 1x1 classifier."""

  def __init__(self, num_classes: int, depth: int = 101, width: int = 64, output_stride: int = 16,
               multi_grid: Sequence[int] = (1, 2, 4), aspp_features: int = 256,
               aspp_rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1):
    super().__init__()
    self.backbone = ResNet(depth, width, output_stride, multi_grid)
    rates = tuple(r * 16 // output_stride for r in aspp_rates)
    self.aspp = ASPP(resnet_channels(depth, width)["layer4"], aspp_features, rates, False, dropout)
    self.classifier = nn.Conv2d(aspp_features, num_classes, 1)

  def forward(self, x):
    y = self.classifier(self.aspp(self.backbone(x)["layer4"]))
    return up(y, x.shape[2:]), {}


class XceptionModule(nn.Module):
  def __init__(self, cin, features, stride=1, dilation=1, skip="conv", relu_inside=False):
    super().__init__()
    self.skip, self.relu_inside = skip, relu_inside
    self.convs = nn.ModuleList()
    c = cin
    for i, f in enumerate(features):
      self.convs.append(SeparableConv(c, f, stride if i == 2 else 1, dilation, relu_inside))
      c = f
    if skip == "conv":
      self.shortcut = nn.Conv2d(cin, features[-1], 1, stride, bias=False)
      self.shortcut_bn = nn.BatchNorm2d(features[-1], eps=1e-3)

  def forward(self, x):
    y, second = x, None
    for i, conv in enumerate(self.convs):
      if not self.relu_inside:
        y = F.relu(y)
      y = conv(y)
      if i == 1:
        second = y
    if self.skip == "conv":
      y = y + self.shortcut_bn(self.shortcut(x))
    elif self.skip == "sum":
      y = y + x
    return y, second


class Xception65(nn.Module):
  """jseg.models.backbones.xception.Xception65 (aligned Xception, width multiplier)."""

  def __init__(self, output_stride: int = 16, width: float = 1.0, middle_blocks: int = 16,
               multi_grid: Sequence[int] = (1, 1, 1), in_channels: int = 3):
    super().__init__()
    ch = lambda c: max(1, int(round(c * width)))  # noqa: E731
    (s3, d3), (_, dm), (s4, d4), (_, d5) = {
        32: ((2, 1), (1, 1), (2, 1), (1, 1)), 16: ((2, 1), (1, 1), (1, 1), (1, 2)),
        8: ((1, 1), (1, 2), (1, 2), (1, 4))}[output_stride]
    self.stem = nn.Sequential(
        nn.Conv2d(in_channels, ch(32), 3, 2, 1, bias=False), nn.BatchNorm2d(ch(32), eps=1e-3), nn.ReLU(),
        nn.Conv2d(ch(32), ch(64), 3, 1, 1, bias=False), nn.BatchNorm2d(ch(64), eps=1e-3), nn.ReLU())
    self.entry1 = XceptionModule(ch(64), (ch(128),) * 3, 2)
    self.entry2 = XceptionModule(ch(128), (ch(256),) * 3, 2)
    self.entry3 = XceptionModule(ch(256), (ch(728),) * 3, s3, d3)
    self.middle = nn.ModuleList(
        [XceptionModule(ch(728), (ch(728),) * 3, 1, dm, "sum") for _ in range(middle_blocks)])
    self.exit1 = XceptionModule(ch(728), (ch(728), ch(1024), ch(1024)), s4, d4)
    cs = (ch(1024), ch(1536), ch(1536), ch(2048))
    self.exit2 = nn.Sequential(*[SeparableConv(cs[i], cs[i + 1], 1, d5 * g, True)
                                 for i, g in enumerate(multi_grid)])
    self.low_channels, self.out_channels = ch(256), ch(2048)

  def forward(self, x):
    x = self.stem(x)
    x, _ = self.entry1(x)
    x, low = self.entry2(x)
    x, _ = self.entry3(x)
    for m in self.middle:
      x, _ = m(x)
    x, _ = self.exit1(x)
    return {"out": self.exit2(x), "low_level": low}


class DeepLabV3Plus(nn.Module):
  """jseg 'deeplabv3plus' on Xception-65: separable ASPP and decoder."""

  def __init__(self, num_classes: int, width: float = 1.0, middle_blocks: int = 16,
               output_stride: int = 16, multi_grid: Sequence[int] = (1, 1, 1),
               aspp_features: int = 256, aspp_rates: Sequence[int] = (6, 12, 18),
               decoder_features: int = 256, low_level_features: int = 48, separable: bool = True,
               dropout: float = 0.1):
    super().__init__()
    self.backbone = Xception65(output_stride, width, middle_blocks, multi_grid)
    rates = tuple(r * 16 // output_stride for r in aspp_rates)
    self.aspp = ASPP(self.backbone.out_channels, aspp_features, rates, separable, dropout)
    self.low = conv_bn_relu(self.backbone.low_channels, low_level_features, 1)
    c = aspp_features + low_level_features
    convs = []
    for _ in range(2):
      convs.append(SeparableConv(c, decoder_features, 1, 1, True) if separable
                   else conv_bn_relu(c, decoder_features))
      c = decoder_features
    self.decoder = nn.Sequential(*convs)
    self.classifier = nn.Conv2d(decoder_features, num_classes, 1)

  def forward(self, x):
    f = self.backbone(x)
    low = self.low(f["low_level"])
    y = torch.cat([up(self.aspp(f["out"]), low.shape[2:]), low], 1)
    y = self.classifier(self.decoder(y))
    return up(y, x.shape[2:]), {}


def _take(cfg: dict, keys: Sequence[str]) -> dict:
  return {k: (tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k]) for k in keys if k in cfg}


def build(name: str, model_cfg: dict) -> nn.Module:
  """The twin of jseg model ``name`` from the jseg model config (a plain dict)."""
  k = model_cfg["num_classes"]
  if name == "unet":
    if model_cfg.get("padding", "same") != "same" or model_cfg.get("upsampling", "transpose") != "transpose":
      raise ValueError("The torch U-Net twin covers padding='same', upsampling='transpose' only.")
    return UNet(k, **_take(model_cfg, ("depth", "width", "batch_norm", "dropout")))
  if name == "unetpp":
    if model_cfg.get("deep_supervision", False):
      raise ValueError("The torch UNet++ twin has no deep supervision; set deep_supervision=False.")
    return UNetPlusPlus(k, **_take(model_cfg, ("depth", "width", "batch_norm")))
  if name == "pspnet":
    if model_cfg.get("deep_stem", False):
      raise ValueError("The torch PSPNet twin has the 7x7 stem only.")
    return PSPNet(k, **_take(model_cfg, ("depth", "width", "output_stride", "bins", "head_features",
                                         "aux_head", "aux_features", "dropout")))
  if name == "deeplabv3":
    return DeepLabV3(k, **_take(model_cfg, ("depth", "width", "output_stride", "multi_grid",
                                            "aspp_features", "aspp_rates", "dropout")))
  if name == "deeplabv3plus":
    if model_cfg.get("backbone", "xception65") != "xception65":
      raise ValueError("The torch DeepLab v3+ twin has the Xception-65 backbone only.")
    return DeepLabV3Plus(k, **_take(model_cfg, (
        "width", "middle_blocks", "output_stride", "multi_grid", "aspp_features", "aspp_rates",
        "decoder_features", "low_level_features", "separable", "dropout")))
  family = _family(name)
  if family is None:
    raise KeyError(f"No torch twin for model '{name}'. Available: {', '.join(available())}.")
  return family.build(name, model_cfg)


# The other networks' twins, one module per backbone family beside this file (they reuse
# this file's blocks; benchmarks/ is on sys.path where they are imported).
FAMILIES = ("torch_twins_vgg", "torch_twins_resnet", "torch_twins_cnn_rnn")
OWN = ("unet", "unetpp", "pspnet", "deeplabv3", "deeplabv3plus")


def _family(name: str):
  for module in FAMILIES:
    m = importlib.import_module(module)
    if name in m.NAMES:
      return m
  return None


def available() -> list[str]:
  """Every model name with a twin."""
  return list(OWN) + [n for module in FAMILIES for n in importlib.import_module(module).NAMES]


def difference(name: str) -> str:
  """The known remaining differences between twin ``name`` and jseg's network."""
  if name in DIFFERENCES:
    return DIFFERENCES[name]
  family = _family(name)
  return family.DIFFERENCES.get(name, "") if family else ""
