"""Segmentation networks. Importing this package registers every model.

Every model is a Flax linen module built from its ``config.model`` block by a
function registered in ``jseg.registry.MODELS``. All models share one calling
convention::

    logits, aux = model.apply(variables, images, train=False)

``images`` are NHWC floats; ``logits`` are NHWC at the input resolution;
``aux`` is a dict of auxiliary logits (also at input resolution), empty when
the network has none or when ``train`` is False.
"""

from __future__ import annotations

import importlib
import pkgutil

import ml_collections
from flax import linen as nn

from jseg.registry import MODELS

# Each module in this package (and in backbones/) registers its own entries.
for _info in pkgutil.iter_modules(__path__):
  if not _info.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_info.name}")


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the network named by ``model_config.name``."""
  return MODELS.get(model_config.name)(model_config)


def available_models() -> list[str]:
  return MODELS.names()
