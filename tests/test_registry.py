"""Registries: lookup by name, errors that list the valid names, no duplicates."""

import pytest

from jseg.registry import Registry


def test_register_get_and_names():
  reg = Registry("widget")
  reg.register("b")(len)
  reg.register("a")(str)
  assert reg.get("a") is str and reg.names() == ["a", "b"] and "b" in reg


def test_unknown_name_lists_valid_ones():
  reg = Registry("widget")
  reg.register("unet")(len)
  with pytest.raises(KeyError, match="Unknown widget 'unte'. Valid widget names: unet"):
    reg.get("unte")


def test_duplicate_registration_is_an_error():
  reg = Registry("widget")
  reg.register("x")(len)
  with pytest.raises(ValueError, match="registered twice"):
    reg.register("x")(str)


def test_every_model_of_the_design_card_is_registered():
  from jseg.models import available_models

  expected = {"fcn32s", "fcn16s", "fcn8s", "segnet", "bayesian_segnet", "unet", "unetpp",
              "deeplabv1", "deeplabv2", "deeplabv3", "deeplabv3plus", "pspnet", "refinenet",
              "fastfcn", "cnn_rnn"}
  assert expected <= set(available_models())
