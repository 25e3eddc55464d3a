"""Loading ImageNet weights of torchvision / timm VGG and ResNet from local files.

Users keep checkpoints on disk (nothing is downloaded at run time). A
``.safetensors`` file is read with ``safetensors`` alone; a ``.pth``/``.pt``/
``.bin`` file needs ``torch``. The state dict is converted by name onto our
parameter tree:

- convolutions: ``OIHW`` -> ``HWIO``; BatchNorm ``weight``/``bias`` ->
  ``params`` ``scale``/``bias`` and ``running_mean``/``running_var`` ->
  ``batch_stats`` ``mean``/``var``;
- ResNet (torchvision and timm share names): ``layer3.1.conv2`` ->
  ``layer3_1/conv2``, ``downsample.0/1`` -> ``downsample_conv``/``downsample_bn``;
- VGG: ``features.{k}`` are numbered in order and grouped into stages at the
  pooling layers (``conv{stage}_{i}``, ``bn{stage}_{i}``); torchvision's
  ``classifier.0``/``classifier.3`` (Linear) and timm's ``pre_logits.fc1``/
  ``fc2`` (conv) become the ``fc6`` (7x7) and ``fc7`` (1x1) convolutions.

The ImageNet classifier (``fc``, ``classifier.6``, ``head``) is never loaded.
Every parameter of the target scope must be present with the same shape;
otherwise the error names the parameter, the checkpoint key and both shapes
(a different input channel count or a different architecture shows up so).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

# Keys that belong to ImageNet classification heads: never loaded.
_HEAD_KEYS = re.compile(r"^(fc\.|classifier\.6\.|head\.|last_linear\.)")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# torchvision/timm ResNet keys: [layer{l}.{b}.]{conv1|bn1|...|downsample.0|1}.{param}
_RESNET_KEY = re.compile(
    r"(?:layer(\d)\.(\d+)\.)?(conv\d|bn\d|downsample\.[01])\.(weight|bias|running_mean|running_var)")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """Reads a torch state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin`` as NumPy."""
  path = Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"Pretrained weights file '{path}' does not exist.")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file

    sd = load_file(str(path))
  elif path.suffix in _TORCH_SUFFIXES:
    try:
      import torch
    except ImportError:
      raise ImportError(
          f"Reading '{path}' needs PyTorch (pip install torch); or convert it to "
          ".safetensors, which needs only the safetensors package."
      ) from None
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "model_state_dict"):
      if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
      raise ValueError(f"'{path}' does not hold a state dict (found {type(obj).__name__}).")
    sd = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items() if hasattr(v, "numpy")}
  else:
    raise ValueError(
        f"Unsupported weights file '{path}': accepted suffixes are .safetensors, "
        + ", ".join(_TORCH_SUFFIXES) + "."
    )
  return {k.removeprefix("module."): np.asarray(v) for k, v in sd.items()}


def detect_family(sd: Mapping[str, np.ndarray]) -> str:
  """``"resnet"`` or ``"vgg"`` from the state dict's key names."""
  if "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd):
    return "resnet"
  if any(k.startswith("features.") for k in sd):
    return "vgg"
  sample = ", ".join(sorted(sd)[:5])
  raise ValueError(
      f"Weights are neither a torchvision/timm ResNet nor VGG state dict (first keys: {sample})."
  )


def describe(sd: Mapping[str, np.ndarray]) -> str:
  """A short architecture description of a state dict, for error messages."""
  family = detect_family(sd)
  if family == "resnet":
    blocks = []
    for layer in range(1, 5):
      idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
      blocks.append(len(idx))
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    depth = {(2, 2, 2, 2, "basic"): 18, (3, 4, 6, 3, "basic"): 34, (3, 4, 6, 3, "bottleneck"): 50,
             (3, 4, 23, 3, "bottleneck"): 101, (3, 8, 36, 3, "bottleneck"): 152}
    name = depth.get((*blocks, kind))
    return (f"ResNet-{name}" if name else "ResNet") + f" ({kind} blocks {tuple(blocks)})"
  convs, bn = _vgg_layout(sd)
  n = sum(len(s) for s in convs)
  return f"VGG with {n} convolutions in stages {tuple(len(s) for s in convs)}" + (
      " and BatchNorm" if bn else ""
  )


def _conv(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def _add_bn(out: dict, torch_prefix: str, path: tuple[str, ...], sd: Mapping) -> None:
  out["params", *path, "scale"] = (f"{torch_prefix}.weight", sd[f"{torch_prefix}.weight"])
  out["params", *path, "bias"] = (f"{torch_prefix}.bias", sd[f"{torch_prefix}.bias"])
  out["batch_stats", *path, "mean"] = (
      f"{torch_prefix}.running_mean", sd[f"{torch_prefix}.running_mean"])
  out["batch_stats", *path, "var"] = (
      f"{torch_prefix}.running_var", sd[f"{torch_prefix}.running_var"])


def convert_resnet(sd: Mapping[str, np.ndarray]) -> dict[tuple[str, ...], tuple[str, np.ndarray]]:
  """Maps a torchvision/timm ResNet state dict to ``{(collection, *path): (key, array)}``."""
  out: dict = {}
  for key, value in sd.items():
    if _HEAD_KEYS.match(key) or key.endswith("num_batches_tracked"):
      continue
    m = _RESNET_KEY.fullmatch(key)
    if not m:
      raise ValueError(f"Unexpected key '{key}' in a ResNet state dict.")
    layer, block, module, _ = m.groups()
    scope = (f"layer{layer}_{block}",) if layer else ()
    module = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(
        module, module)
    prefix = key.rsplit(".", 1)[0]
    if module.startswith("conv") or module == "downsample_conv":
      if key.endswith(".weight"):
        out["params", *scope, module, "kernel"] = (key, _conv(value))
      else:
        out["params", *scope, module, "bias"] = (key, value)
    elif key.endswith(".weight"):
      _add_bn(out, prefix, (*scope, module), sd)
  return out


def _vgg_layout(sd: Mapping[str, np.ndarray]) -> tuple[list[list[int]], bool]:
  """Stages of ``features`` conv indices, and whether BatchNorm follows each conv.

  torchvision numbers every layer: conv, (bn,) relu, and a pool at each stage's
  end, so a gap of 3 (4 with BN) between consecutive conv indices is a pool.
  """
  conv_idx = sorted(
      int(m.group(1)) for k, v in sd.items()
      if (m := re.fullmatch(r"features\.(\d+)\.weight", k)) and v.ndim == 4
  )
  bn = any(re.fullmatch(r"features\.\d+\.running_mean", k) for k in sd)
  step = 3 if bn else 2
  stages: list[list[int]] = [[]]
  for i, idx in enumerate(conv_idx):
    if i and idx - conv_idx[i - 1] > step:
      stages.append([])
    stages[-1].append(idx)
  return stages, bn


def convert_vgg(sd: Mapping[str, np.ndarray]) -> dict[tuple[str, ...], tuple[str, np.ndarray]]:
  """Maps a torchvision/timm VGG state dict to ``{(collection, *path): (key, array)}``."""
  out: dict = {}
  stages, bn = _vgg_layout(sd)
  last_ch = None
  for s, idxs in enumerate(stages):
    for i, idx in enumerate(idxs):
      name = f"{s + 1}_{i + 1}"
      w = sd[f"features.{idx}.weight"]
      last_ch = w.shape[0]
      out["params", f"conv{name}", "kernel"] = (f"features.{idx}.weight", _conv(w))
      out["params", f"conv{name}", "bias"] = (f"features.{idx}.bias", sd[f"features.{idx}.bias"])
      if bn:
        _add_bn(out, f"features.{idx + 1}", (f"bn{name}",), sd)
  fc_keys = {"fc6": ("classifier.0", "pre_logits.fc1"), "fc7": ("classifier.3", "pre_logits.fc2")}
  for ours, candidates in fc_keys.items():
    for prefix in candidates:
      if f"{prefix}.weight" not in sd:
        continue
      w = sd[f"{prefix}.weight"]
      if w.ndim == 2:
        # A Linear on the (C, 7, 7)-flattened pool5 is a 7x7 conv (1x1 for fc7).
        k = 7 if ours == "fc6" else 1
        cin = last_ch if ours == "fc6" else w.shape[1]
        if w.shape[1] != cin * k * k:
          raise ValueError(
              f"'{prefix}.weight' has shape {w.shape}; expected (out, {cin * k * k}) for {ours}."
          )
        w = w.reshape(w.shape[0], cin, k, k)
      out["params", ours, "kernel"] = (f"{prefix}.weight", _conv(w))
      out["params", ours, "bias"] = (f"{prefix}.bias", sd[f"{prefix}.bias"])
  return out


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(_flatten(v, (*prefix, k)))
    else:
      flat[(*prefix, k)] = v
  return flat


def _subtree(tree: Mapping, scope: tuple[str, ...], collection: str) -> Mapping:
  node = tree.get(collection, {})
  for part in scope:
    if not isinstance(node, Mapping) or part not in node:
      return {}
    node = node[part]
  return node


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for part in path[:-1]:
    tree = tree[part]
  tree[path[-1]] = value


def load_pretrained(
    variables: Mapping[str, Any],
    path: str | Path,
    scope: str | tuple[str, ...] = "backbone",
    allow_missing: tuple[str, ...] = (),
) -> dict[str, Any]:
  """Returns ``variables`` with the VGG/ResNet at ``scope`` replaced by the checkpoint's weights.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` from ``model.init``.
    path: a torchvision/timm state dict (``.safetensors`` or ``.pth``).
    scope: where the backbone sits in the tree (``"backbone"``; ``""`` = the root;
      ``"a/b"`` or a tuple for nested scopes).
    allow_missing: names of our parameters that may stay at their
      initialisation (e.g. ``("fc6", "fc7")`` for a checkpoint without a classifier).

  Raises:
    ValueError: a target parameter is missing from the checkpoint (wrong
      architecture), a shape differs (e.g. the number of input channels), or
      the checkpoint has backbone weights the model does not.
  """
  if isinstance(scope, str):
    scope = tuple(p for p in scope.split("/") if p)
  sd = read_state_dict(path)
  family = detect_family(sd)
  converted = convert_resnet(sd) if family == "resnet" else convert_vgg(sd)
  where = "/".join(scope) or "(root)"
  targets = {}
  for collection in ("params", "batch_stats"):
    for p, v in _flatten(_subtree(variables, scope, collection)).items():
      targets[(collection, *p)] = v
  if not targets:
    raise ValueError(f"The model has no parameters under '{where}'; check the scope.")

  arch, target_arch = describe(sd), _describe_target(targets)
  missing, mismatched = [], []
  for p, v in targets.items():
    name = f"{p[0]}:{where}/" + "/".join(p[1:])
    if p not in converted:
      if p[1] in allow_missing:
        continue
      missing.append(f"{name} {tuple(v.shape)} has no counterpart in the checkpoint")
      continue
    key, arr = converted[p]
    if tuple(arr.shape) != tuple(v.shape):
      msg = f"{name} has shape {tuple(v.shape)} but checkpoint '{key}' gives {tuple(arr.shape)}"
      same_but_inputs = (
          arr.ndim == 4 and (*arr.shape[:2], arr.shape[3]) == (*v.shape[:2], v.shape[3]))
      if p[-1] == "kernel" and same_but_inputs:
        msg += (f" (the checkpoint's layer takes {arr.shape[2]} input channels, "
                f"the model's {v.shape[2]})")
      mismatched.append(msg)
  problems = mismatched + missing
  # fc6/fc7 are optional (SegNet has none); other extra weights mean another architecture.
  extra = sorted(
      converted[p][0] for p in converted if p not in targets and p[1] not in ("fc6", "fc7")
  )
  if extra:
    problems.append(f"checkpoint weights with no place in the model: {', '.join(extra[:8])}"
                    + (" ..." if len(extra) > 8 else ""))
  if problems:
    listed = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise ValueError(
        f"Cannot load '{path}' ({arch}) into '{where}' (the model's is {target_arch}):"
        f"\n  {listed}{more}"
    )

  out = _unfreeze(variables)
  for p in targets:
    if p in converted:
      _set(out[p[0]], (*scope, *p[1:]), np.asarray(converted[p][1], dtype=np.float32))
  return out


def _describe_target(targets: Mapping[tuple[str, ...], Any]) -> str:
  """Describes our parameter tree in the same words as :func:`describe`."""
  names = {p[1] for p in targets if p[0] == "params"}
  if any(n.startswith("layer1_") for n in names):
    blocks = tuple(len({n for n in names if n.startswith(f"layer{l}_")}) for l in range(1, 5))
    bottleneck = any(p[1] == "layer1_0" and p[2] == "conv3" for p in targets if len(p) > 2)
    kind = "bottleneck" if bottleneck else "basic"
    depth = {((2, 2, 2, 2), "basic"): 18, ((3, 4, 6, 3), "basic"): 34,
             ((3, 4, 6, 3), "bottleneck"): 50, ((3, 4, 23, 3), "bottleneck"): 101,
             ((3, 8, 36, 3), "bottleneck"): 152}.get((blocks, kind))
    return (f"ResNet-{depth}" if depth else "ResNet") + f" ({kind} blocks {blocks})"
  convs = [len({n for n in names if re.fullmatch(rf"conv{s}_\d+", n)}) for s in range(1, 6)]
  if sum(convs):
    bn = any(n.startswith("bn1_") for n in names)
    return f"VGG with {sum(convs)} convolutions in stages {tuple(convs)}" + (
        " and BatchNorm" if bn else "")
  return "neither a ResNet nor a VGG"


def _unfreeze(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree
