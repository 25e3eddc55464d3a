"""Every file in configs/ loads, has the shared fields, and builds its model and loss."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jseg import losses
from jseg.config import load_config
from jseg.models import build_model

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.py"))
REQUIRED = ("seed", "batch_size", "total_steps", "eval_every", "checkpoint_every", "log_every",
            "model.name", "model.num_classes", "data.name", "data.crop_size",
            "optimizer.name", "optimizer.learning_rate", "schedule.name")


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def test_there_are_configs():
  assert any(p.name == "pspnet.py" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_model_and_loss(path):
  config = load_config(str(path))
  for field in REQUIRED:
    _get(config, field)  # raises if missing
  model = build_model(config.model)
  # One abstract trace: init runs the forward pass, so its output is apply's.
  (logits, aux), shapes = jax.eval_shape(
      lambda x: model.init_with_output(
          {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x, train=False),
      jax.ShapeDtypeStruct((1, 64, 64, _channels(config)), jnp.float32))
  assert "params" in shapes
  assert logits.shape == (1, 64, 64, config.model.num_classes)
  loss_fn = losses.build_loss(config)
  assert callable(loss_fn)


def _channels(config) -> int:
  from jseg import data

  return data.get_info(config.data).channels
