"""Which dataset a config names, its info and its root, without TensorFlow Datasets.

``get_info`` is all a process needs to size a model for a dataset (the model
benchmark, prediction on files, evaluation's class names); it imports the dataset
specs but not tfds, which only building and reading the array_record files
(``jseg.data.source``) loads.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

import jseg.data.builders  # noqa: F401 - registers the datasets
from jseg.config import resolve_path
from jseg.data.builders.base import DatasetSpec
from jseg.data.info import DatasetInfo
from jseg.registry import DATASETS


def spec_class(data_cfg: ml_collections.ConfigDict) -> type[DatasetSpec]:
  """The dataset ``data_cfg.name`` names; an unknown name raises listing the valid ones."""
  return DATASETS.get(data_cfg.name)


def get_info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  """Classes, palette, ignore index and statistics of ``data_cfg.name``."""
  cls = spec_class(data_cfg)
  root = resolve_path(data_cfg.root) if data_cfg.get("root") else None
  return cls.dataset_info(data_cfg, root)


def dataset_root(data_cfg: ml_collections.ConfigDict) -> Path:
  """The resolved ``data.root``; raises naming the path and how to get the data when missing."""
  cls = spec_class(data_cfg)
  root = resolve_path(data_cfg.root)
  if not root.is_dir():
    raise FileNotFoundError(
        f"Dataset root data.root='{data_cfg.root}' (resolved to {root}) does not exist for dataset "
        f"'{data_cfg.name}'. {cls.ROOT_HINT}"
    )
  return root
