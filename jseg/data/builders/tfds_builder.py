"""The tfds builder that writes a ``DatasetSpec``'s examples as array_record files.

TensorFlow-free: images and masks are stored as ``tfds.features.Tensor`` with
ZLIB encoding (``tfds.features.Image`` needs TensorFlow to encode, see
``/work/shared/DATA_NOTES.md``). ``builder_class(spec)`` gives each dataset its
own builder class, named as the spec says (tfds keys its folders by the class's
``name``); only ``jseg.data.source`` imports this module.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jseg.data.builders.base import DatasetSpec


class JsegBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """tfds builder over a local folder; ``spec_class`` says what the dataset is."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First jseg build."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Files are read from `data.root`; nothing is downloaded."
  spec_class: type[DatasetSpec] = DatasetSpec

  def __init__(self, *, data_cfg: ml_collections.ConfigDict, root: Path, **kwargs: Any):
    self.spec = self.spec_class(data_cfg, root)
    self.root = self.spec.root
    kwargs.pop("file_format", None)
    super().__init__(file_format="array_record", **kwargs)
    # tfds pickles a builder (into grain workers) as its __init__ arguments.
    self._original_state.update(data_cfg=data_cfg, root=self.root)

  def __reduce__(self) -> tuple[Any, ...]:
    # The class is made at run time, so pickle names the spec (an importable class) instead.
    return _rebuild, (self.spec_class, self._original_state)

  @property
  def label_report(self) -> dict[str, dict[str, Any]]:
    """Per split, the pixels and files whose mask values were mapped to void."""
    return self.spec.label_report

  @label_report.setter
  def label_report(self, value: dict[str, dict[str, Any]]) -> None:
    self.spec.label_report = value

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # tfds looks for a checksums file beside the builder's code, via a path check that
    # needs the `importlib_resources` backport; jseg downloads nothing, so there is none.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    info = self.spec.info
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"jseg build of '{info.name}' from {self.root}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(
                shape=(None, None, info.channels), dtype=np.dtype(info.image_dtype), encoding=tfds.features.Encoding.ZLIB
            ),
            "label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
            "name": tfds.features.Text(),
        }),
        disable_shuffling=True,  # keep the listed order: example i is the i-th file of the split
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager
    return {split: self.spec.generate_examples(split, pairs) for split, pairs in self.spec.splits().items()}

  def _generate_examples(self, split: str, pairs: list) -> Iterator[tuple[str, dict[str, Any]]]:
    # tfds's abstract hook; `_split_generators` above already hands tfds the generators.
    return self.spec.generate_examples(split, pairs)


@functools.cache
def builder_class(spec: type[DatasetSpec]) -> type[JsegBuilder]:
  """The tfds builder class of ``spec`` (one per spec, named ``spec.name``)."""
  if not spec.name:
    raise ValueError(f"Dataset spec {spec.__qualname__} has no `name` (its tfds builder's name).")
  return types.new_class(
      f"{spec.__name__}Builder", (JsegBuilder,), {"skip_registration": True},
      lambda ns: ns.update(spec_class=spec, name=spec.name, __module__=__name__),
  )


def _rebuild(spec: type[DatasetSpec], state: dict[str, Any]) -> JsegBuilder:
  return builder_class(spec)(**state)
