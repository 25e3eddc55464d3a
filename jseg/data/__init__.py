"""jseg's input side: datasets, loaders, transforms and dataset tools.

Entry points (contracts in docs/design.md):

* ``get_info(data_cfg)``: a dataset's classes, palette and statistics;
* ``make_train_iterator(config, process_index, process_count)``: endless augmented
  batches with a restorable state;
* ``make_eval_source(config, split)``: unaugmented examples at original size;
* ``read_image(path)`` and ``normalize(image, info, data_cfg)`` for prediction on files;
* ``build(config)``: builds the tfds array_record cache of ``config.data`` (done on
  first use by the two loaders).

Datasets (``data.name``): ``camvid``, ``isbi2012``, ``folder``; see ``builders/``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each public name and the submodule that defines it. The submodules are imported on
# first use (PEP 562): the loader pulls in grain and ``source`` tensorflow_datasets,
# which a process that only needs a dataset's info, a transform or a file reader (the
# model benchmark, prediction on files) should not pay for in memory or start-up time.
_EXPORTS = {
    "DatasetInfo": "info",
    "read_image": "io",
    "read_mask": "io",
    "EvalSource": "loader",
    "TrainIterator": "loader",
    "make_eval_source": "loader",
    "make_train_iterator": "loader",
    "build": "source",
    "get_info": "catalog",
    "get_source": "source",
    "normalize": "transforms",
}

if TYPE_CHECKING:  # what type checkers and IDEs see
  from jseg.data.info import DatasetInfo
  from jseg.data.io import read_image, read_mask
  from jseg.data.loader import EvalSource, TrainIterator, make_eval_source, make_train_iterator
  from jseg.data.catalog import get_info
  from jseg.data.source import build, get_source
  from jseg.data.transforms import normalize


def __getattr__(name: str) -> Any:
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'jseg.data' has no attribute '{name}'")
  value = getattr(importlib.import_module(f"jseg.data.{module}"), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "DatasetInfo",
    "EvalSource",
    "TrainIterator",
    "build",
    "get_info",
    "get_source",
    "make_eval_source",
    "make_train_iterator",
    "normalize",
    "read_image",
    "read_mask",
]
