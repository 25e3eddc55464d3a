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

from jseg.data.info import DatasetInfo
from jseg.data.io import read_image, read_mask
from jseg.data.loader import EvalSource, TrainIterator, make_eval_source, make_train_iterator
from jseg.data.source import build, get_info, get_source
from jseg.data.transforms import normalize

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
