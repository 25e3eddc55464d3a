"""Training and evaluation inputs: grain over the tfds array_record build.

Training: ``grain.python.DataLoader`` with an ``IndexSampler`` that shuffles
each epoch from ``config.seed`` and gives process ``p`` of ``P`` only its shard
of the records; augmentation is a ``RandomMapTransform``, so each record gets a
generator seeded from the seed and its position in the stream, and the same
seed and ``data.worker_count`` give the same batches bit for bit. (Grain
batches inside each worker process, so another worker count groups the records
into batches differently, and a state restores only with the worker count it
was taken with.)
The record stream is endless (epochs follow one another), so a batch may hold
the last records of one epoch and the first of the next; no record is dropped.
Records are read by ``data.read_threads`` threads (default 1) per process.
The iterator's ``get_state()`` is a JSON-able dict (grain's own state: the
position in the record stream), and ``set_state()`` makes it yield exactly the
batch that followed when the state was taken.

Evaluation: a random-access view of a split, unaugmented, at the label's size.
"""

from __future__ import annotations

import atexit
import json
import logging
import warnings
import weakref
from typing import Any, Iterator

import grain.python as grain
import ml_collections
import numpy as np
from absl import flags

from jseg.data import transforms
from jseg.data.info import DatasetInfo
from jseg.data.source import get_info, get_source

log = logging.getLogger("jseg.data")


def augment_config(data_cfg: ml_collections.ConfigDict, info: DatasetInfo) -> transforms.AugmentConfig:
  """``config.data`` augmentation fields as an ``AugmentConfig``."""
  crop = tuple(int(v) for v in data_cfg.crop_size)
  if len(crop) != 2:
    raise ValueError(f"data.crop_size={data_cfg.crop_size}: expected (height, width).")
  cfg = transforms.AugmentConfig(
      crop_size=crop,
      scale_range=tuple(float(v) for v in data_cfg.get("scale_range", (1.0, 1.0))),
      hflip=bool(data_cfg.get("hflip", False)),
      color_jitter=float(data_cfg.get("color_jitter", 0.0) or 0.0),
      blur=bool(data_cfg.get("blur", False)),
      pad_value=tuple(float(v) for v in info.mean),
      clip_max=info.max_value if np.issubdtype(np.dtype(info.image_dtype), np.integer) else None,
  )
  transforms.check_augment_config(cfg)
  return cfg


class TrainTransform(grain.RandomMapTransform):
  """Augments one stored record and normalises it (runs in grain workers)."""

  def __init__(self, aug: transforms.AugmentConfig, info: DatasetInfo, data_cfg: ml_collections.ConfigDict):
    self.aug = aug
    self.info = info
    self.mode = transforms.normalize_mode(data_cfg)
    self.data_cfg = ml_collections.ConfigDict({"normalize": self.mode})

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, label = transforms.augment(element["image"], element["label"], rng, self.aug)
    return {
        "image": transforms.normalize(image, self.info, self.data_cfg),
        "label": transforms.to_class_label(label, self.info.ignore_index),
    }


class TrainIterator:
  """Endless iterator of training batches with a JSON-able, restorable state.

  The state holds grain's state (position in the record stream, worker count,
  sampler and source descriptions, which grain checks on restore) and this
  process's shard, checked here: a state only restores into an iterator of the
  same dataset split, seed, shard and worker count.
  """

  def __init__(self, loader: grain.DataLoader, process_index: int, process_count: int):
    self._loader = loader
    self._iter = iter(loader)
    self._shard = [process_index, process_count]
    # Release grain's workers and buffers while Python is still intact; left to
    # interpreter shutdown, grain's destructors print spurious errors.
    atexit.register(_close, weakref.ref(self))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iter is None:
      raise StopIteration
    batch = next(self._iter)
    # With workers, grain hands out arrays backed by shared memory that is freed when
    # they are; plain copies keep that lifetime short and the arrays ordinary.
    return {k: np.array(v) if isinstance(v, grain.SharedMemoryArray) else v for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return {"grain": json.loads(self._iter.get_state().decode()), "shard": list(self._shard)}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "grain" not in state:
      raise ValueError(f"Not a jseg train-iterator state (expected keys 'grain', 'shard'): {state!r:.200}")
    if list(state.get("shard", self._shard)) != self._shard:
      raise ValueError(
          f"Iterator state is for process {state['shard'][0]} of {state['shard'][1]}; this iterator is process "
          f"{self._shard[0]} of {self._shard[1]}."
      )
    self._iter.set_state(json.dumps(state["grain"]).encode())

  def close(self) -> None:
    """Stops grain's worker processes; the iterator yields nothing afterwards."""
    self._iter = None


def _close(ref: "weakref.ref[TrainIterator]") -> None:
  it = ref()
  if it is not None:
    it.close()


def _warn_padding(source: Any, aug: transforms.AugmentConfig) -> None:
  """Warns when the smallest scale leaves more padding than image in a crop."""
  h, w = source[0]["image"].shape[:2]
  share = transforms.padding_fraction((h, w), aug.crop_size, aug.scale_range[0])
  if share > 0.5:
    warnings.warn(
        f"data.crop_size={aug.crop_size} with data.scale_range={aug.scale_range} on {h}x{w} images: up to "
        f"{share:.0%} of a crop is padding, more than image. Use a smaller crop or a larger minimum scale.",
        stacklevel=3,
    )


def make_train_iterator(config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1) -> TrainIterator:
  """Endless augmented batches of ``config.batch_size / process_count`` for this process.

  Yields ``{"image": float32 (b, h, w, C), "label": int32 (b, h, w)}`` with
  ``(h, w) = config.data.crop_size``.
  """
  data_cfg = config.data
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the {process_count} processes.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside 0..{process_count - 1}.")
  info = get_info(data_cfg)
  source = get_source(config, data_cfg.train_split)
  aug = augment_config(data_cfg, info)
  _warn_padding(source, aug)
  per_process = config.batch_size // process_count
  if len(source) < process_count:
    raise ValueError(
        f"Split '{data_cfg.train_split}' has {len(source)} examples, fewer than the {process_count} processes."
    )
  sampler = grain.IndexSampler(
      num_records=len(source),
      shard_options=grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True),
      shuffle=True,
      num_epochs=None,
      seed=int(config.seed),
  )
  workers = int(data_cfg.get("worker_count", 0))
  if workers and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; a caller without absl.app (tests,
    # notebooks, plain scripts) has not parsed them, so take the defaults.
    flags.FLAGS.mark_as_parsed()
  loader = grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=[TrainTransform(aug, info, data_cfg), grain.Batch(per_process, drop_remainder=True)],
      worker_count=workers,
      # grain's default (16 reader threads, 500 records read ahead) costs seconds of
      # start-up and hundreds of MB here; decoding a record takes a few ms, augmenting it tens.
      read_options=grain.ReadOptions(
          num_threads=int(data_cfg.get("read_threads", 1)), prefetch_buffer_size=max(8, 2 * per_process)
      ),
  )
  return TrainIterator(loader, process_index, process_count)


class EvalSource:
  """Random-access unaugmented examples of one split, normalised, at original size."""

  def __init__(self, source: Any, info: DatasetInfo, data_cfg: ml_collections.ConfigDict, split: str):
    self._source = source
    self.info = info
    self.split = split
    self._data_cfg = data_cfg

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self._source)
    if not -n <= index < n:
      raise IndexError(f"Index {index} is out of range for split '{self.split}' with {n} examples.")
    record = self._source[index % n]
    name = record["name"]
    return {
        "image": transforms.normalize(record["image"], self.info, self._data_cfg),
        "label": transforms.to_class_label(record["label"], self.info.ignore_index),
        "name": name.decode() if isinstance(name, bytes) else str(name),
    }

  def raw(self, index: int) -> dict[str, Any]:
    """The stored record: uint8/uint16 image, uint8 mask with 255 = void, name as bytes."""
    return self._source[index]


def make_eval_source(config: ml_collections.ConfigDict, split: str | None = None) -> EvalSource:
  """Examples of ``split`` (default ``config.data.eval_split``) without augmentation."""
  split = split or config.data.eval_split
  return EvalSource(get_source(config, split), get_info(config.data), config.data, split)
