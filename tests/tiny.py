"""Tiny configurations for tests: real code paths, CPU-sized."""

from __future__ import annotations

import ml_collections

from jseg.config import base_config


def tiny_pspnet_config(cache_dir: str = "", **overrides) -> ml_collections.ConfigDict:
  """PSPNet (ResNet-18, width 8) on 64x64 crops of the shipped CamVid sample."""
  c = base_config()
  c.model.name = "pspnet"
  c.model.num_classes = 11
  c.model.depth = 18
  c.model.width = 8
  c.model.output_stride = 8
  c.model.head_features = 16
  c.model.aux_features = 8
  c.data.crop_size = (64, 64)
  c.data.cache_dir = cache_dir
  c.batch_size = 4
  c.eval_batch_size = 2
  c.total_steps = 6
  c.eval_every = 3
  c.checkpoint_every = 2
  c.log_every = 1
  c.optimizer.learning_rate = 0.01
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c
