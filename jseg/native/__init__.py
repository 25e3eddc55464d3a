"""Compiled CPU kernels: oneDNN convolutions and BatchNorm's training passes as XLA FFI
custom calls, built on first use.

XLA:CPU's convolutions (and the layout transposes it puts around kernel gradients) were
the largest cost of a jseg training step on CPU; oneDNN's direct convolutions, the ones
torch uses, run a layer's forward+backward 1.2-2.3x faster and depthwise ones 23-81x
faster than XLA's grouped convolution (``experiments/performance/onednn_layers.json``).
BatchNorm's training forward and backward (``JsegBn*``, used by ``jseg.models.norm``) are
plain C++ on XLA's intra-op thread pool: they replace ~10 XLA kernels per layer, each of
which costs the compiler memory. Also the loss end's class log-probabilities
(``JsegLogProb*``), the dilated depthwise kernel gradient (``JsegDwKernelGrad``) and the
gradients' global norm (``JsegSumSquares``) and the stride-1 max pool's backward
(``JsegPoolSameBwd``).

``onednn()`` compiles ``onednn_conv.cc`` with the system C++ compiler against the
headers and library of the ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp`` wheels (both
dependencies of jseg on Linux x86-64) into a per-user cache folder, loads it and
registers its handlers with XLA. The build takes a few seconds once per source, jaxlib
and oneDNN version; later processes load the cached library. When anything is missing
it returns ``None`` and ``onednn_error()`` says why: convolutions then stay on XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import site
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable

SOURCE = Path(__file__).with_name("onednn_conv.cc")
DEFAULT_CACHE_DIR = "~/.cache/jseg/native"
TARGETS = ("JsegConvFwd", "JsegConvBias", "JsegConvBiasAdd", "JsegConvScaleBias",
           "JsegConvScaleBiasAdd", "JsegConvBwdData",
           "JsegConvBwdWeights", "JsegBnFwd", "JsegBnBwd", "JsegBnAddFwd", "JsegBnAddBwd",
           "JsegBnApply", "JsegLogProbFwd", "JsegLogProbBwd", "JsegDwKernelGrad",
           "JsegSumSquares", "JsegPoolSameBwd")


def env_mode(var: str, modes: tuple[str, ...]) -> str:
  """The environment variable ``var``, lower-cased, checked against ``modes`` (the first is
  the default when it is unset or empty)."""
  mode = os.environ.get(var, modes[0]).strip().lower() or modes[0]
  if mode not in modes:
    raise ValueError(f"{var} must be one of {modes}; got {mode!r}.")
  return mode


KERNEL_MODES = ("auto", "native", "xla")


def kernels_active(var: str, auto: Callable[[], bool]) -> bool:
  """Whether the kernels switched by the environment variable ``var`` (``auto`` | ``native``
  | ``xla``) serve functions traced now: ``auto`` -> ``auto()``, ``native`` -> yes, or raise
  unless the backend is CPU and the extension loads, ``xla`` -> no."""
  mode = env_mode(var, KERNEL_MODES)
  if mode == "xla":
    return False
  if mode == "auto":
    return auto()
  import jax  # noqa: PLC0415 - keeps `import jseg.native` cheap

  if jax.default_backend() != "cpu":
    raise RuntimeError(f"{var}=native needs the CPU backend; this is {jax.default_backend()}.")
  if onednn() is None:
    raise RuntimeError(f"{var}=native, but the extension is unavailable: {onednn_error()}")
  return True


class NativeBuildError(RuntimeError):
  """The oneDNN extension could not be found, compiled or loaded."""


def _prefixes() -> list[Path]:
  """Where pip puts the oneDNN wheels' ``include/`` and ``lib/`` data files."""
  out = [Path(sys.prefix), Path(sys.base_prefix)]
  user = getattr(site, "USER_BASE", None)
  if user:
    out.append(Path(user))
  out += [Path("/usr/local"), Path("/usr")]
  return out


def find_onednn() -> tuple[Path, Path]:
  """Returns ``(include_dir, lib_dir)`` of an installed oneDNN 3.x, or raises."""
  for p in _prefixes():
    inc, lib = p / "include", p / "lib"
    if (inc / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and any(lib.glob("libdnnl.so*")):
      return inc, lib
  raise NativeBuildError(
      "oneDNN headers/library not found (looked in "
      + ", ".join(str(p) for p in _prefixes())
      + "); install them with `pip install onednn-cpu-gomp==2023.2.0 "
      "onednn-devel-cpu-gomp==2023.2.0`."
  )


def _cache_dir() -> Path:
  return Path(os.environ.get("JSEG_NATIVE_CACHE", DEFAULT_CACHE_DIR)).expanduser()


def _compiler() -> str:
  want = os.environ.get("CXX") or "g++"
  cxx = shutil.which(want) or (None if os.environ.get("CXX") else shutil.which("c++"))
  if not cxx:
    raise NativeBuildError(f"no C++ compiler ({want}) found to build jseg's native code")
  return cxx


def _compile(source: Path, stem: str, flags: list[str], versions: list[str],
             out_dir: Path | None) -> Path:
  """``source`` compiled to ``<out_dir>/<stem>-<hash>.so`` unless already there.

  The library's name carries a hash of the source, the versions it was built against and
  the compiler command, so a stale build is never loaded. Written to a temporary file
  and renamed, so concurrent processes (pytest-xdist workers) cannot see half a file.
  """
  cxx = _compiler()
  h = hashlib.sha256(source.read_bytes())
  h.update(" ".join([cxx, *flags, *versions]).encode())
  out_dir = Path(out_dir) if out_dir else _cache_dir()
  target = out_dir / f"{stem}-{h.hexdigest()[:16]}.so"
  if target.is_file():
    return target
  out_dir.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [cxx, str(source), "-o", tmp, *flags]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise NativeBuildError(
        f"compiling {source.name} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}"
    )
  os.replace(tmp, target)
  return target


def build(out_dir: Path | None = None) -> Path:
  """Compiles the oneDNN extension (if not already built for this source, jaxlib and
  oneDNN version and toolchain)."""
  import jax  # noqa: PLC0415 - keeps `import jseg.native` cheap

  inc, lib = find_onednn()
  flags = [
      "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd",
      f"-I{inc}", f"-I{jax.ffi.include_dir()}", f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}",
  ]
  versions = []
  for dist in ("jaxlib", "onednn-cpu-gomp"):
    try:
      versions.append(f"{dist}={metadata.version(dist)}")
    except metadata.PackageNotFoundError:
      versions.append(f"{dist}=?")
  return _compile(SOURCE, "libjseg_onednn", flags, versions, out_dir)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
  """Builds, loads and registers once per process; returns (library, error)."""
  try:
    import jax  # noqa: PLC0415

    lib = ctypes.CDLL(str(build()))
    for name in TARGETS:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    lib.jseg_onednn_impl.restype = ctypes.c_int
    lib.jseg_onednn_workspace.restype = ctypes.c_int64
    lib.jseg_onednn_reorder_pieces.restype = ctypes.c_int64
    lib.jseg_onednn_kernel_reorder.restype = ctypes.c_int64
    return lib, ""
  except (NativeBuildError, OSError, AttributeError) as e:
    return None, f"{type(e).__name__}: {e}"


BLOCK_CACHE_SOURCE = Path(__file__).with_name("block_cache.cc")


@functools.cache
def _load_block_cache() -> tuple[ctypes.CDLL | None, str]:
  try:
    path = _compile(BLOCK_CACHE_SOURCE, "libjseg_block_cache",
                    ["-O2", "-std=c++17", "-shared", "-fPIC", "-ldl", "-lpthread"], [], None)
    lib = ctypes.CDLL(str(path))
    lib.jseg_block_cache_install.restype = ctypes.c_int
    lib.jseg_block_cache_install.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int64]
    lib.jseg_block_cache_release.restype = None
    lib.jseg_block_cache_stats.restype = None
    lib.jseg_block_cache_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
    return lib, ""
  except (NativeBuildError, OSError, AttributeError) as e:
    return None, f"{type(e).__name__}: {e}"


def block_cache() -> ctypes.CDLL | None:
  """``block_cache.cc`` built and loaded (``jseg.runtime.install_block_cache`` uses it), or
  ``None`` when it cannot be built here (``block_cache_error()`` says why)."""
  return _load_block_cache()[0]


def loaded_block_cache() -> ctypes.CDLL | None:
  """``block_cache()`` if this process has already loaded it, else ``None`` (builds
  nothing)."""
  return block_cache() if _load_block_cache.cache_info().currsize else None


def block_cache_error() -> str:
  """Why ``block_cache()`` is ``None`` ("" when it loaded)."""
  return _load_block_cache()[1]


def onednn() -> ctypes.CDLL | None:
  """The loaded extension, or ``None`` when it cannot be built here (see ``onednn_error``)."""
  return _load()[0]


def onednn_error() -> str:
  """Why ``onednn()`` is ``None`` ("" when it loaded)."""
  return _load()[1]


def _call_args(kind, x_shape, k_shape, y_shape, strides, dilation, padding, groups, split,
               chunks) -> tuple[ctypes.CDLL, tuple]:
  """The loaded library and the C arguments every per-call query takes: the flat geometry
  (x, k, output h/w, strides, dilation, padding), groups, kind, split, chunks."""
  lib = onednn()
  if lib is None:
    raise NativeBuildError(onednn_error())
  vals = [*x_shape, *k_shape, y_shape[1], y_shape[2], *strides, *dilation,
          *[p for pair in padding for p in pair]]
  return lib, ((ctypes.c_int64 * len(vals))(*vals), ctypes.c_int64(groups),
               ctypes.c_char(kind.encode()), ctypes.c_int64(split), ctypes.c_int64(chunks))


def _int_query(fn: str, what: str, kind, x_shape, k_shape, y_shape, strides, dilation, padding,
               groups, split, chunks) -> int:
  """One of the library's per-call integer queries (``jseg_onednn_<fn>``); a negative
  answer (oneDNN rejected the geometry or the split) raises, naming ``what``."""
  lib, args = _call_args(kind, x_shape, k_shape, y_shape, strides, dilation, padding, groups,
                         split, chunks)
  n = getattr(lib, f"jseg_onednn_{fn}")(*args)
  if n < 0:
    raise NativeBuildError(f"oneDNN rejected the convolution or its split ({what} query)")
  return int(n)


@functools.lru_cache(maxsize=4096)
def onednn_workspace(kind: str, x_shape, k_shape, y_shape, strides, dilation, padding,
                     groups: int, split: int = 0, chunks: int = 1) -> int:
  """Bytes of workspace (oneDNN's scratchpad and reordered kernel, page-aligned; of every
  part of a split call, and the parts' kernel gradients) one call wants; the convolution's
  custom call returns it as a second, unused output so that XLA allocates it with its
  other temporaries. Arguments as ``onednn_impl``'s, as tuples."""
  return _int_query("workspace", "workspace", kind, x_shape, k_shape, y_shape, strides,
                    dilation, padding, groups, split, chunks)


def onednn_reorder_pieces(kind: str, x_shape, k_shape, y_shape, strides, dilation, padding,
                          groups: int, split: int, chunks: int) -> int:
  """Into how many pieces (run on XLA's threads) a split call cuts its kernel's reorder to or
  from oneDNN's layout; 0 = one whole reorder (no layout change, or one that pads the
  kernel). For tests and benchmarks; arguments as ``onednn_impl``'s."""
  return _int_query("reorder_pieces", "reorder", kind, x_shape, k_shape, y_shape, strides,
                    dilation, padding, groups, split, chunks)


def onednn_kernel_reorder(kind: str, x_shape, k_shape, y_shape, strides, dilation, padding,
                          groups: int, split: int = 0, chunks: int = 1) -> bool:
  """Whether a call reorders its kernel from HWIO into another layout before it runs (of a
  split call: its first part). Arguments as ``onednn_impl``'s."""
  return bool(_int_query("kernel_reorder", "kernel reorder", kind, x_shape, k_shape, y_shape,
                         strides, dilation, padding, groups, split, chunks))


def onednn_impl(kind: str, x_shape, k_shape, y_shape, strides, dilation, padding,
                groups: int, split: int = 0, chunks: int = 1) -> str:
  """oneDNN's name for the implementation it picks for one convolution.

  ``kind``: ``"f"`` forward, ``"d"`` input gradient, ``"w"`` kernel gradient; the
  inference forward with an epilogue (``conv.Epilogue``): ``"p"`` + bias, ``"q"`` + bias
  then ReLU, ``"r"`` + bias + residual, ``"s"`` + bias + residual then ReLU. A name
  starting with ``ref`` would mean oneDNN's slow reference code. ``split``/``chunks``: as
  the custom call's (``jseg.models.conv.conv_split``); a split call's first part's name.
  """
  lib, args = _call_args(kind, x_shape, k_shape, y_shape, strides, dilation, padding, groups,
                         split, chunks)
  buf = ctypes.create_string_buffer(256)
  rc = lib.jseg_onednn_impl(*args, buf, 256)
  if rc:
    raise NativeBuildError(f"oneDNN rejected the convolution: {buf.value.decode()}")
  return buf.value.decode()
