"""CamVid builder on the shipped sample, and the train/eval loaders over it."""

import json

import numpy as np
import pytest
from PIL import Image

import jseg.data as data
from jseg.config import REPO_ROOT, base_config
from jseg.registry import DATASETS


@pytest.fixture(scope="module")
def config(tfds_cache):
  c = base_config()
  c.data.cache_dir = tfds_cache
  c.data.crop_size = (64, 96)
  c.batch_size = 4
  return c


def test_info():
  info = data.get_info(base_config().data)
  assert info.num_classes == 11 and info.class_names[0] == "Sky" and info.class_names[10] == "Bicyclist"
  assert info.palette.shape == (11, 3) and info.palette.dtype == np.uint8
  assert info.ignore_index == 255 and info.channels == 3 and info.mean.shape == (3,)
  assert {"camvid", "isbi2012", "folder"} <= set(DATASETS.names())
  bad = base_config().data
  bad.name = "cityscapes"
  with pytest.raises(KeyError, match="Valid dataset names: camvid, folder, isbi2012"):
    data.get_info(bad)


def test_build_splits(config):
  builder = data.build(config)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 24, "val": 8, "test": 4}


def test_eval_source_matches_files(config):
  source = data.make_eval_source(config, "val")
  assert len(source) == 8
  ex = source[0]
  assert ex["image"].shape == (360, 480, 3) and ex["image"].dtype == np.float32
  assert ex["label"].shape == (360, 480) and ex["label"].dtype == np.int32
  raw = np.asarray(Image.open(REPO_ROOT / f"samples/camvid/valannot/{ex['name']}.png"))
  np.testing.assert_array_equal(ex["label"], np.where(raw == 11, 255, raw))  # Unlabelled -> ignore
  rgb = np.asarray(Image.open(REPO_ROOT / f"samples/camvid/val/{ex['name']}.png"), np.float32)
  info = data.get_info(config.data)
  np.testing.assert_allclose(ex["image"], (rgb - info.mean) / info.std, rtol=1e-5, atol=1e-5)
  test = data.make_eval_source(config, "test")
  assert len(test) == 4 and test[3]["name"] == "Seq05VD_f05100"
  labels = np.unique(np.concatenate([source[i]["label"].ravel() for i in range(len(source))]))
  assert set(labels) <= set(range(11)) | {255} and 255 in labels and 3 in labels


def test_ignore_index_from_config(config):
  c = config.copy_and_resolve_references()
  c.data.ignore_index = -1
  label = data.make_eval_source(c, "val")[0]["label"]
  assert label.min() == -1 and 255 not in label


def test_train_batches(config):
  batch = next(data.make_train_iterator(config))
  assert batch["image"].shape == (4, 64, 96, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (4, 64, 96) and batch["label"].dtype == np.int32
  assert set(np.unique(batch["label"])) <= set(range(11)) | {255}
  assert np.isfinite(batch["image"]).all()


def test_process_shards(config):
  shards = [next(data.make_train_iterator(config, p, 2)) for p in range(2)]
  assert all(b["image"].shape == (2, 64, 96, 3) for b in shards)
  assert not np.array_equal(shards[0]["image"], shards[1]["image"])
  with pytest.raises(ValueError, match="divisible"):
    data.make_train_iterator(config, 0, 3)


def test_same_seed_same_batches_and_restore(config):
  a, b = data.make_train_iterator(config), data.make_train_iterator(config)
  first = [next(a) for _ in range(2)]
  for x in first:
    y = next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  state = a.get_state()
  json.dumps(state)  # checkpoints store it as JSON
  third = next(a)
  restored = data.make_train_iterator(config)
  restored.set_state(state)
  nxt = next(restored)
  for k in third:
    np.testing.assert_array_equal(nxt[k], third[k])
  assert not np.array_equal(nxt["image"], first[0]["image"])
  other = config.copy_and_resolve_references()
  other.seed = 1
  assert not np.array_equal(next(data.make_train_iterator(other))["image"], first[0]["image"])


def test_state_checks_shard(config):
  state = data.make_train_iterator(config, 0, 2).get_state()
  with pytest.raises(ValueError, match="process 0 of 2; this iterator is process 1 of 2"):
    data.make_train_iterator(config, 1, 2).set_state(state)


@pytest.mark.slow
def test_worker_processes_restorable(config):
  c = config.copy_and_resolve_references()
  c.data.worker_count = 1
  c.data.color_jitter = 0.4
  c.data.blur = True
  a = data.make_train_iterator(c)
  first = next(a)
  state = a.get_state()
  second = next(a)
  a.close()
  restored = data.make_train_iterator(c)
  restored.set_state(state)
  nxt = next(restored)
  restored.close()
  for k in second:
    np.testing.assert_array_equal(nxt[k], second[k])
  assert not np.array_equal(nxt["image"], first["image"])
