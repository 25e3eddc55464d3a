"""Plain PyTorch twin of jseg's ``cnn_rnn`` (ReSeg-style CNN + ReNet), for the speed benchmark.

Same layers as ``jseg.models.cnn_rnn.CNNRNN``: VGG-style 3x3 conv (with bias) + ReLU
blocks, each followed by a 2x2 max-pool (no BatchNorm); ReNet layers (space-to-depth
into p x p patches, zero-padded at the bottom/right to a multiple of p, then a
bidirectional GRU down every column and a bidirectional GRU along every row, forward and
backward states concatenated); stride-2 2x2 transposed convs + ReLU back to the encoder
stride times the patch sizes; a bilinear resize (``align_corners=False``, skipped when the
size already matches, as jseg does) and a 1x1 classifier conv.

The GRU: flax's ``nn.GRUCell`` computes
``r = s(W_ir x + b_ir + W_hr h)``, ``z = s(W_iz x + b_iz + W_hz h)``,
``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) n + z h``,
which is torch's GRU function with its hidden-side biases ``b_hr = b_hz = 0``. A
``torch.nn.GRU`` holds the same function but 2 * hidden more parameters per direction
(``bias_hh`` is one 3H tensor), so ``BiGRU`` keeps flax's parameters (``bias_ih`` 3H and
``bias_hn`` H per direction) and calls ``torch.gru`` -- the fused kernel ``nn.GRU``
itself calls (ATen's C++ loop on CPU, cuDNN on CUDA) -- with
``bias_hh = cat(0, 0, bias_hn)``. Parameter counts therefore equal jseg's. On CUDA
those weights are not one flat cuDNN buffer, so ATen packs them (~0.3M floats) per call.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NAMES = ("cnn_rnn",)

DIFFERENCES = {
    "cnn_rnn": "none in the layers; the GRU sweeps are torch's fused GRU kernel (flax's cell "
               "function, hidden-side r/z biases fixed at zero) where jseg scans nn.GRUCell.",
}

# cuDNN's notice that the GRU weights are packed per call (see the module docstring).
warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")


def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
  """NHWC ``x`` -> non-overlapping p x p patches in channels (row, column, channel order),
  zero-padding H and W at the end up to multiples of p (jseg's ``space_to_depth``)."""
  if p == 1:
    return x
  n, h, w, c = x.shape
  ph, pw = -h % p, -w % p
  if ph or pw:
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    h, w = h + ph, w + pw
  x = x.reshape(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // p, w // p, p * p * c)


class BiGRU(nn.Module):
  """Bidirectional single-layer GRU over time-major ``(T, B, C)`` sequences with flax's
  ``GRUCell`` parameters: output ``(T, B, 2 * hidden)``, ``[forward, backward]``."""

  def __init__(self, cin: int, hidden: int):
    super().__init__()
    self.hidden = hidden
    for sfx in ("", "_reverse"):
      self.register_parameter("weight_ih" + sfx, nn.Parameter(torch.empty(3 * hidden, cin)))
      self.register_parameter("weight_hh" + sfx, nn.Parameter(torch.empty(3 * hidden, hidden)))
      self.register_parameter("bias_ih" + sfx, nn.Parameter(torch.empty(3 * hidden)))
      self.register_parameter("bias_hn" + sfx, nn.Parameter(torch.empty(hidden)))
    self.reset_parameters()

  def reset_parameters(self) -> None:
    """``torch.nn.GRU``'s default: every tensor U(-1/sqrt(hidden), 1/sqrt(hidden))."""
    bound = 1.0 / math.sqrt(self.hidden)
    for p in self.parameters():
      nn.init.uniform_(p, -bound, bound)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.hidden
    params = []
    for sfx in ("", "_reverse"):
      b_hn = getattr(self, "bias_hn" + sfx)
      params += [getattr(self, "weight_ih" + sfx), getattr(self, "weight_hh" + sfx),
                 getattr(self, "bias_ih" + sfx), torch.cat([b_hn.new_zeros(2 * h), b_hn])]
    hx = x.new_zeros(2, x.shape[1], h)
    out, _ = torch.gru(x, hx, params, True, 1, 0.0, self.training, True, False)
    return out


class ReNetLayer(nn.Module):
  """jseg's ``ReNetLayer`` on NHWC maps: patchify, vertical then horizontal BiGRU sweep."""

  def __init__(self, cin: int, hidden: int, patch: int = 1):
    super().__init__()
    self.patch = patch
    self.vertical = BiGRU(cin * patch * patch, hidden)
    self.horizontal = BiGRU(2 * hidden, hidden)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = space_to_depth(x, self.patch)
    n, h, w, c = x.shape
    # One sequence per column (time = H), then one per row (time = W); time-major.
    y = self.vertical(x.permute(1, 0, 2, 3).reshape(h, n * w, c))
    y = y.view(h, n, w, -1).permute(2, 1, 0, 3)  # (W, N, H, 2h)
    y = self.horizontal(y.reshape(w, n * h, y.shape[-1]))
    return y.view(w, n, h, -1).permute(1, 2, 0, 3)  # NHWC view


class CNNRNN(nn.Module):
  """jseg 'cnn_rnn': VGG-style encoder, ReNet layers, transposed-conv upsampling, 1x1 classifier."""

  def __init__(self, num_classes: int, encoder_features: Sequence[int] = (64, 128, 256),
               encoder_convs: Sequence[int] = (2, 2, 3), hidden: Sequence[int] = (100, 100),
               patches: Sequence[int] = (2, 1), up_features: int = 100, in_channels: int = 3):
    super().__init__()
    if len(encoder_features) != len(encoder_convs):
      raise ValueError(f"cnn_rnn encoder_features {tuple(encoder_features)} and encoder_convs "
                       f"{tuple(encoder_convs)} must have the same length.")
    if len(hidden) != len(patches):
      raise ValueError(f"cnn_rnn hidden {tuple(hidden)} and patches {tuple(patches)} "
                       "must have the same length.")
    if any(p < 1 or p & (p - 1) for p in patches):
      raise ValueError(f"model.patches must be powers of two (1, 2, 4, ...); got {tuple(patches)}.")
    self.min_size = 2 ** len(encoder_features)
    blocks, c = [], in_channels
    for f, n in zip(encoder_features, encoder_convs):
      layers = []
      for _ in range(n):
        layers += [nn.Conv2d(c, f, 3, padding=1), nn.ReLU(inplace=True)]
        c = f
      layers.append(nn.MaxPool2d(2))
      blocks.append(nn.Sequential(*layers))
    self.encoder = nn.Sequential(*blocks)
    self.renet = nn.ModuleList()
    for h, p in zip(hidden, patches):
      self.renet.append(ReNetLayer(c, h, p))
      c = 2 * h
    ups = []
    for _ in range(int(math.log2(self.min_size * math.prod(patches)))):
      ups += [nn.ConvTranspose2d(c, up_features, 2, 2), nn.ReLU(inplace=True)]
      c = up_features
    self.up = nn.Sequential(*ups)
    self.classifier = nn.Conv2d(c, num_classes, 1)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    size = tuple(x.shape[2:])
    if min(size) < self.min_size:
      raise ValueError(f"cnn_rnn needs inputs of at least {self.min_size}x{self.min_size} pixels; "
                       f"got {size[0]}x{size[1]}.")
    y = self.encoder(x).permute(0, 2, 3, 1)  # NHWC view for the sweeps
    for layer in self.renet:
      y = layer(y)
    y = self.up(y.permute(0, 3, 1, 2))
    if tuple(y.shape[2:]) != size:
      y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
    return self.classifier(y), {}


# Keys of jseg's cnn_rnn config the twin reads; the rest change no layer (dtype is the
# benchmark's --amp; pretrained weights only the initial values).
_KEYS = ("encoder_features", "encoder_convs", "hidden", "patches", "up_features")
_IGNORED = ("name", "num_classes", "dtype", "pretrained", "pretrained_scope")


def build(name: str, model_cfg: dict) -> nn.Module:
  """The twin of jseg model ``name`` from the jseg model config (a plain dict)."""
  if name not in NAMES:
    raise KeyError(f"No torch twin for model '{name}' here. Available: {', '.join(NAMES)}.")
  unknown = sorted(set(model_cfg) - set(_KEYS) - set(_IGNORED))
  if unknown:
    raise ValueError(f"The torch cnn_rnn twin does not cover model options {unknown}.")
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model_cfg.items() if k in _KEYS}
  return CNNRNN(model_cfg["num_classes"], **kw)
