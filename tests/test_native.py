"""jseg.native: building, caching and loading the oneDNN extension, and its errors."""

import os

import pytest

from jseg import native


def test_missing_onednn_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setattr(native, "_prefixes", lambda: [tmp_path])
  with pytest.raises(native.NativeBuildError, match="pip install onednn-cpu-gomp"):
    native.find_onednn()


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
  pytest.importorskip("jax")
  try:
    native.find_onednn()
  except native.NativeBuildError as e:
    pytest.skip(str(e))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(native.NativeBuildError, match="no C\\+\\+ compiler"):
    native.build(tmp_path / "out")


def test_compile_error_reports_the_compiler_and_leaves_no_partial_library(monkeypatch, tmp_path):
  try:
    native.find_onednn()
  except native.NativeBuildError as e:
    pytest.skip(str(e))
  bad = tmp_path / "broken.cc"
  bad.write_text("this is not C++;\n")
  monkeypatch.setattr(native, "SOURCE", bad)
  out = tmp_path / "out"
  with pytest.raises(native.NativeBuildError, match="compiling broken.cc failed"):
    native.build(out)
  assert list(out.iterdir()) == []  # the temporary file was removed


@pytest.mark.skipif(native.onednn() is None, reason="oneDNN extension unavailable here")
def test_build_is_cached_by_content():
  first = native.build()
  mtime = os.stat(first).st_mtime_ns
  assert native.build() == first and os.stat(first).st_mtime_ns == mtime  # not rebuilt
  assert first.name.startswith("libjseg_onednn-") and first.suffix == ".so"
  assert native.onednn_error() == ""


def test_onednn_impl_rejects_a_bad_geometry():
  if native.onednn() is None:
    pytest.skip(native.onednn_error())
  # 5 input channels cannot be split into 2 groups.
  with pytest.raises(native.NativeBuildError):
    native.onednn_impl("f", (1, 8, 8, 5), (3, 3, 2, 4), (1, 8, 8, 4), (1, 1), (1, 1),
                       ((1, 1), (1, 1)), 2)


def test_kernel_reorder_query():
  if native.onednn() is None:
    pytest.skip(native.onednn_error())
  geom = ((1, 8, 8, 16), (3, 3, 16, 16), (1, 8, 8, 16), (1, 1), (1, 1), ((1, 1), (1, 1)), 1)
  # A scaled epilogue ('Q') always runs its kernel through a (scaling) reorder.
  assert native.onednn_kernel_reorder("Q", *geom) is True
  assert isinstance(native.onednn_kernel_reorder("q", *geom), bool)
  with pytest.raises(native.NativeBuildError):  # 5 input channels in 2 groups
    native.onednn_kernel_reorder("q", (1, 8, 8, 5), (3, 3, 2, 4), (1, 8, 8, 4), (1, 1), (1, 1),
                                 ((1, 1), (1, 1)), 2)
  with pytest.raises(native.NativeBuildError):  # 3 chunks of 1 image
    native.onednn_kernel_reorder("q", *geom, 1, 3)
