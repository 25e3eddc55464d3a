"""Loading torchvision-layout VGG/ResNet weights: forward equality with torch, clear errors.

The torch models below follow torchvision's module names and layer order
exactly (``features.{k}``, ``classifier.{k}``, ``layer{l}.{b}.conv{k}``,
``downsample.0/1``) at a tiny width, so their state dicts have torchvision's
keys; the checks compare our forward pass with torch's to 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jseg.models.backbones.resnet import ResNet
from jseg.models.backbones.vgg import VGG
from jseg.models.pretrained import describe, load_pretrained, read_state_dict


def _fake_resnet_sd(blocks, bottleneck: bool, width: int = 4, in_ch: int = 3) -> dict:
  """A torchvision-layout ResNet state dict with random values (no torch needed)."""
  rng = np.random.default_rng(0)
  sd = {}

  def conv(name, o, i, k):
    sd[f"{name}.weight"] = rng.normal(size=(o, i, k, k)).astype(np.float32)

  def bn(name, c):
    for p in ("weight", "bias", "running_mean"):
      sd[f"{name}.{p}"] = rng.normal(size=(c,)).astype(np.float32)
    sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, size=(c,)).astype(np.float32)
    sd[f"{name}.num_batches_tracked"] = np.array(1, np.int64)

  conv("conv1", width, in_ch, 7)
  bn("bn1", width)
  exp = 4 if bottleneck else 1
  cin = width
  for li, n in enumerate(blocks):
    planes = width * 2**li
    for b in range(n):
      p = f"layer{li + 1}.{b}"
      if bottleneck:
        conv(f"{p}.conv1", planes, cin, 1), bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
        conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
      else:
        conv(f"{p}.conv1", planes, cin, 3), bn(f"{p}.bn1", planes)
        conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
      if b == 0 and (li > 0 or cin != planes * exp):
        conv(f"{p}.downsample.0", planes * exp, cin, 1), bn(f"{p}.downsample.1", planes * exp)
      cin = planes * exp
  sd["fc.weight"] = rng.normal(size=(10, cin)).astype(np.float32)
  sd["fc.bias"] = np.zeros(10, np.float32)
  return sd


def _abstract(model, shape):
  """Variables' shapes without allocating (the loader checks shapes first)."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("w") / "resnet18.safetensors"
  save_file(_fake_resnet_sd((2, 2, 2, 2), False), str(path))
  return path


def test_describe_names_the_architecture(resnet18_file):
  assert describe(read_state_dict(resnet18_file)) == "ResNet-18 (basic blocks (2, 2, 2, 2))"


def test_wrong_input_channels_is_named(resnet18_file):
  v = _abstract(ResNet(depth=18, width=4), (1, 32, 32, 1))
  target = {c: {"backbone": v[c]} for c in ("params", "batch_stats")}
  with pytest.raises(ValueError, match=r"backbone/conv1/kernel.*3 input channels.*model's 1"):
    load_pretrained(target, resnet18_file)


def test_wrong_architecture_is_named(resnet18_file):
  v = _abstract(ResNet(depth=50, width=4), (1, 32, 32, 3))
  expected = r"ResNet-18.*model's is ResNet-50(.|\n)*layer1_0/conv1/kernel has shape \(1, 1, 4, 4\)"
  with pytest.raises(ValueError, match=expected):
    load_pretrained(v, resnet18_file, scope="")


def test_vgg_weights_into_resnet_fail(tmp_path):
  rng = np.random.default_rng(0)
  sd = {"features.0.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "features.0.bias": np.zeros(4, np.float32)}
  path = tmp_path / "vgg.safetensors"
  save_file(sd, str(path))
  v = _abstract(ResNet(depth=18, width=4), (1, 32, 32, 3))
  expected = r"VGG with 1 convolutions.*model's is ResNet-18(.|\n)*conv1/kernel \(7, 7, 3, 4\) has no"
  with pytest.raises(ValueError, match=expected):
    load_pretrained(v, path, scope="")


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    read_state_dict(tmp_path / "missing.pth")
  bad = tmp_path / "w.npz"
  bad.write_bytes(b"x")
  with pytest.raises(ValueError, match=r"w\.npz.*\.safetensors"):
    read_state_dict(bad)


def _fake_vgg_sd(convs, width: int = 2, bn: bool = False, fc: int = 8) -> dict:
  """A torchvision-layout VGG state dict (features.{k}, classifier.{0,3,6}), random values."""
  rng = np.random.default_rng(0)
  sd, k, c = {}, 0, 3
  for s, n in enumerate(convs):
    ch = width * (1, 2, 4, 8, 8)[s]
    for _ in range(n):
      sd[f"features.{k}.weight"] = rng.normal(size=(ch, c, 3, 3)).astype(np.float32)
      sd[f"features.{k}.bias"] = np.zeros(ch, np.float32)
      if bn:
        for p in ("weight", "bias", "running_mean", "running_var"):
          sd[f"features.{k + 1}.{p}"] = np.ones(ch, np.float32)
      k, c = k + (3 if bn else 2), ch
    k += 1  # the pool
  for i, (o, n_in) in enumerate(((fc, c * 49), (fc, fc), (10, fc))):
    sd[f"classifier.{3 * i}.weight"] = rng.normal(size=(o, n_in)).astype(np.float32)
    sd[f"classifier.{3 * i}.bias"] = np.zeros(o, np.float32)
  return sd


def test_vgg19_weights_into_vgg16_fail(tmp_path):
  path = tmp_path / "vgg19.safetensors"
  save_file(_fake_vgg_sd((2, 2, 4, 4, 4)), str(path))
  target = _abstract(VGG(depth=16, width=2, fc=True, fc_features=8), (1, 224, 224, 3))
  expected = r"VGG with 16 convolutions.*model's is VGG with 13(.|\n)*no place in the model: features"
  with pytest.raises(ValueError, match=expected):
    load_pretrained(target, path, scope="")


def test_vgg16_bn_classifier_weights_are_optional_for_segnet(tmp_path):
  from jseg.models.segnet import SegNet

  path = tmp_path / "vgg16_bn.safetensors"
  save_file(_fake_vgg_sd((2, 2, 3, 3, 3), bn=True), str(path))
  target = _abstract(SegNet(11, width=2), (1, 32, 32, 3))
  loaded = load_pretrained(target, path)  # scope "backbone"; fc6/fc7 have no place: ignored
  np.testing.assert_array_equal(
      loaded["params"]["backbone"]["conv5_3"]["kernel"],
      read_state_dict(path)["features.40.weight"].transpose(2, 3, 1, 0))
  assert loaded["batch_stats"]["backbone"]["bn1_1"]["var"].shape == (2,)
  # The decoder is not the backbone's: it keeps its (abstract) initialisation.
  assert isinstance(loaded["params"]["conv1_1_D"]["kernel"], jax.ShapeDtypeStruct)


# ---------------------------------------------------------------- torch equality
torch = pytest.importorskip(
    "torch", reason="torch not installed: `pip install torch==2.13.0` (CPU) runs the torch comparisons"
)
tnn = torch.nn


class TorchVGG(tnn.Module):
  """torchvision.models.VGG's layout (features / avgpool / classifier) at any width."""

  def __init__(self, convs=(2, 2, 3, 3, 3), width=4, bn=False, fc=16):
    super().__init__()
    layers, c = [], 3
    for s, n in enumerate(convs):
      ch = width * (1, 2, 4, 8, 8)[s]
      for _ in range(n):
        layers += [tnn.Conv2d(c, ch, 3, padding=1)] + ([tnn.BatchNorm2d(ch)] if bn else [])
        layers += [tnn.ReLU(inplace=True)]
        c = ch
      layers.append(tnn.MaxPool2d(2, 2))
    self.features = tnn.Sequential(*layers)
    self.avgpool = tnn.AdaptiveAvgPool2d(7)
    self.classifier = tnn.Sequential(
        tnn.Linear(c * 49, fc), tnn.ReLU(True), tnn.Dropout(), tnn.Linear(fc, fc), tnn.ReLU(True),
        tnn.Dropout(), tnn.Linear(fc, 10),
    )

  def forward(self, x):
    pool5 = self.features(x)
    fc7 = self.classifier[:5](torch.flatten(self.avgpool(pool5), 1))
    return pool5, fc7


class TorchBasic(tnn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, down):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.downsample = down

  def forward(self, x):
    y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchBottleneck(tnn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, down):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(planes * 4)
    self.downsample = down

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchResNet(tnn.Module):
  """torchvision.models.ResNet's layout (v1.5: stride in the 3x3 conv) at any width."""

  def __init__(self, block, blocks, width=4):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    cin = width
    for li, n in enumerate(blocks):
      planes, stride = width * 2**li, 1 if li == 0 else 2
      layers = []
      for b in range(n):
        down = None
        if b == 0 and (stride != 1 or cin != planes * block.expansion):
          down = tnn.Sequential(
              tnn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
              tnn.BatchNorm2d(planes * block.expansion),
          )
        layers.append(block(cin, planes, stride if b == 0 else 1, down))
        cin = planes * block.expansion
      setattr(self, f"layer{li + 1}", tnn.Sequential(*layers))
    self.fc = tnn.Linear(cin, 10)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for li in range(1, 5):
      x = getattr(self, f"layer{li}")(x)
    return x


def _randomize_bn(model):
  g = torch.Generator().manual_seed(1)
  for m in model.modules():
    if isinstance(m, tnn.BatchNorm2d):
      with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
  return model.eval()


def _nchw(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("bn,suffix", [(False, ".pth"), (True, ".safetensors")])
def test_vgg16_matches_torch(tmp_path, bn, suffix):
  torch.manual_seed(0)
  tm = _randomize_bn(TorchVGG(bn=bn))
  path = tmp_path / f"vgg{suffix}"
  if suffix == ".pth":
    torch.save(tm.state_dict(), path)
  else:
    save_file({k: v.numpy() for k, v in tm.state_dict().items()}, str(path))
  model = VGG(depth=16, width=4, batch_norm=bn, fc=True, fc_features=16)
  x = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
  variables = _abstract(model, (1, 224, 224, 3))
  variables = load_pretrained(variables, path, scope="")
  feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  with torch.no_grad():
    pool5, fc7 = tm(_nchw(x))
  np.testing.assert_allclose(np.asarray(feats["pool5"]), _nhwc(pool5), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(feats["fc7"]).reshape(1, -1), fc7.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_matches_torch(tmp_path, depth):
  torch.manual_seed(0)
  block, blocks = (TorchBasic, (2, 2, 2, 2)) if depth == 18 else (TorchBottleneck, (3, 4, 6, 3))
  tm = _randomize_bn(TorchResNet(block, blocks, width=4))
  path = tmp_path / "resnet.pth"
  torch.save(tm.state_dict(), path)
  model = ResNet(depth=depth, width=4)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  variables = load_pretrained(_abstract(model, (2, 64, 64, 3)), path, scope="")
  feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  with torch.no_grad():
    ref = tm(_nchw(x))
  np.testing.assert_allclose(np.asarray(feats["layer4"]), _nhwc(ref), atol=1e-4, rtol=1e-4)


def test_timm_vgg_layout_loads_the_same_weights(tmp_path):
  """timm's VGG keeps fc6/fc7 as convolutions (``pre_logits.fc1/fc2``) and names the
  classifier ``head.fc``; both layouts give the same parameters."""
  tm = _randomize_bn(TorchVGG(bn=True))
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  timm = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
  timm["pre_logits.fc1.weight"] = sd["classifier.0.weight"].reshape(16, 32, 7, 7)
  timm["pre_logits.fc1.bias"] = sd["classifier.0.bias"]
  timm["pre_logits.fc2.weight"] = sd["classifier.3.weight"].reshape(16, 16, 1, 1)
  timm["pre_logits.fc2.bias"] = sd["classifier.3.bias"]
  timm["head.fc.weight"], timm["head.fc.bias"] = sd["classifier.6.weight"], sd["classifier.6.bias"]
  save_file(sd, str(tmp_path / "tv.safetensors"))
  save_file(timm, str(tmp_path / "timm.safetensors"))
  target = _abstract(VGG(width=4, batch_norm=True, fc=True, fc_features=16), (1, 224, 224, 3))
  a = load_pretrained(target, tmp_path / "tv.safetensors", scope="")
  b = load_pretrained(target, tmp_path / "timm.safetensors", scope="")
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
