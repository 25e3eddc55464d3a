"""The tfds builder made from a dataset spec: one class per spec, its name, pickling."""

import pickle

import numpy as np
import pytest

import jseg.data as data
from jseg.config import base_config
from jseg.data.builders.base import DatasetSpec
from jseg.data.builders.camvid import Camvid
from jseg.data.builders.isbi2012 import Isbi2012
from jseg.data.builders.tfds_builder import JsegBuilder, builder_class


def test_one_builder_class_per_spec_named_as_the_spec_says():
  cls = builder_class(Camvid)
  assert cls is builder_class(Camvid) and issubclass(cls, JsegBuilder)
  assert cls.name == "jseg_camvid" and cls.spec_class is Camvid
  assert builder_class(Isbi2012).name == "jseg_isbi2012"


def test_a_spec_without_a_name_is_refused():
  class Nameless(DatasetSpec):
    pass

  with pytest.raises(ValueError, match="Nameless has no `name`"):
    builder_class(Nameless)


def test_a_built_builder_pickles_to_the_same_build(tfds_cache):
  # grain's worker processes receive the data source, and with it the builder, by pickle.
  c = base_config()
  c.data.cache_dir = tfds_cache
  builder = data.build(c)
  assert type(builder).__module__ == "jseg.data.builders.tfds_builder"
  copy = pickle.loads(pickle.dumps(builder))
  assert type(copy) is type(builder) and copy.data_dir == builder.data_dir and copy.root == builder.root
  assert copy.spec.info.class_names == builder.spec.info.class_names
  a, b = builder.as_data_source(split="val")[2], copy.as_data_source(split="val")[2]
  assert a["name"] == b["name"]
  np.testing.assert_array_equal(a["label"], b["label"])
