"""Builds a dataset once into the tfds cache and opens its splits.

The array_record build of a dataset lives in
``<data.cache_dir>/<name>-<root folder name>-<key>/`` (``data.cache_dir`` empty
means ``~/.cache/jseg/tfds``). The key hashes the dataset name, the resolved
root, the config fields that change the build, and every listed file's path,
size and modification time, so a sample and the full dataset, or an edited
dataset, never share a build. A file lock makes concurrent processes build once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import ml_collections
import tensorflow_datasets as tfds

from jseg.data.builders.base import DatasetSpec
from jseg.data.builders.tfds_builder import JsegBuilder, builder_class
from jseg.data.catalog import dataset_root, get_info, spec_class

__all__ = ["build", "cache_root", "dataset_root", "get_info", "get_source"]

log = logging.getLogger("jseg.data")

# Bump when the stored format changes, so old builds are not reused.
FORMAT_VERSION = 1


def cache_root(data_cfg: ml_collections.ConfigDict) -> Path:
  return Path(os.path.expanduser(data_cfg.get("cache_dir") or "~/.cache/jseg/tfds"))


def _build_key(cls: type[DatasetSpec], root: Path, data_cfg: ml_collections.ConfigDict) -> str:
  files = []
  for split in cls.split_names(root, data_cfg):
    for pair in cls.list_pairs(root, split, data_cfg):
      for path in (pair.image, pair.mask):
        st = path.stat()
        files.append((split, pair.name, str(path.resolve()), st.st_size, st.st_mtime_ns))
  payload = {
      "dataset": data_cfg.name,
      "root": str(root.resolve()),
      "fields": cls.build_fields(data_cfg),
      "format": FORMAT_VERSION,
      "files": files,
  }
  return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def build(config: ml_collections.ConfigDict) -> JsegBuilder:
  """Builds ``config.data`` into the cache (once) and returns the prepared tfds builder.

  Accepts a full config or its ``data`` block.
  """
  data_cfg = config.data if "data" in config else config
  cls = spec_class(data_cfg)
  root = dataset_root(data_cfg)
  key = _build_key(cls, root, data_cfg)
  data_dir = cache_root(data_cfg) / f"{data_cfg.name}-{root.name}-{key}"
  builder = builder_class(cls)(data_cfg=data_cfg, root=root, data_dir=str(data_dir))
  report_file = data_dir / "label_report.json"
  with _file_lock(data_dir.with_suffix(".lock")):
    if not builder.is_prepared():
      log.info("Building dataset '%s' from %s into %s", data_cfg.name, root, data_dir)
      tfds.disable_progress_bar()
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
      report_file.write_text(json.dumps(builder.label_report))
  if report_file.is_file():
    builder.label_report = json.loads(report_file.read_text())
  return builder


def get_source(config: ml_collections.ConfigDict, split: str) -> Any:
  """The random-access tfds data source of ``split`` (built first when needed)."""
  data_cfg = config.data if "data" in config else config
  builder = build(config)
  built = tuple(builder.info.splits.keys())
  if split not in built:
    cls = builder.spec_class
    known = cls.split_names(builder.root, data_cfg)
    if split in known:
      raise ValueError(
          f"Split '{split}' of dataset '{data_cfg.name}' is empty: no image/mask pairs found via "
          f"{cls.split_location(builder.root, split, data_cfg)}."
      )
    raise ValueError(
        f"Dataset '{data_cfg.name}' at {builder.root} has no split '{split}'. Splits with data: "
        f"{', '.join(sorted(built)) or '(none)'}."
    )
  return builder.as_data_source(split=split)
