"""Process-level resources of a run: XLA's persistent compilation cache and host memory.

Levers measured in ``experiments/performance/README.md`` (PSPNet bench preset, batch 4,
256x256, 2 CPU threads, unless said otherwise):

- ``enable_compilation_cache``: compiled executables are stored on disk and
  re-used by any later process that compiles the same computation (a resumed
  run, a re-run of an ablation, ``jseg.evaluate``): init + step compilation
  2.65 + 5.67 s -> 0.73 + 1.15 s, and the process never reaches XLA's compile
  memory peak (836 -> 496 MB resident after compilation). The loaded
  executable is the same machine code, so results are bitwise the same.
- ``release_free_memory``: XLA frees hundreds of MB once a step is compiled,
  but glibc keeps the freed pages resident; ``malloc_trim(0)`` hands them back
  (857 -> 472 MB resident; peak while training 1075 -> 688 MB).
- ``releasing_free_memory``: the same every 50 ms from a thread while a
  compilation runs, so the pages the compiler frees between its passes are not
  kept on top of what it still holds (PSPNet's step as one program, whole-process
  peak 661 / 670 -> 647 / 660 MB in two alternated runs;
  ``experiments/performance/step_programs.py``).
- ``fix_mmap_threshold``: blocks of 1 MiB and more get their own mappings, returned
  to the OS when freed, instead of glibc's threshold that rises to 32 MiB as mapped
  blocks are freed, after which each step's gradients and outputs went to the heap
  and fragmented it (DeepLab v3 ResNet-101, batch 2, 256²: resident memory grew
  1382 -> 1611 MB over four steps; 1359 -> 1381 MB with the threshold fixed).
- ``install_block_cache``: jaxlib's freed blocks of 1 MiB and more are kept for its next
  allocation of the same size, so each call does not map, zero and page-fault its
  temporaries again (SegNet bench step 263.0 / 255.1 -> 220.2 / 193.5 ms, 59.0k -> 9-263
  faults; twenty-fourth pass).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

import jax

DEFAULT_CACHE_DIR = "~/.cache/jseg/xla"
MIN_COMPILE_TIME_S = 0.1  # cache every program that took this long to compile


def enable_compilation_cache(path: str | None = DEFAULT_CACHE_DIR) -> Path | None:
  """Turns on JAX's persistent compilation cache in ``path`` (empty: leave it off).

  The first directory set in a process wins: when JAX already has one (from
  ``JAX_COMPILATION_CACHE_DIR`` or an earlier call) it is kept and returned,
  because JAX opens its cache once, at the first compilation. Entries are keyed
  by the computation, jaxlib version, XLA flags and devices, so a stale entry is
  never used for a different program. Delete the folder to reclaim disk space.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return Path(current)
  if not path:
    return None
  p = Path(path).expanduser()
  try:
    p.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # read-only home, etc.: run without the cache rather than fail
    print(f"Compilation cache disabled: cannot create {p} ({e}).", flush=True)
    return None
  jax.config.update("jax_compilation_cache_dir", str(p))
  if ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ
      and jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_TIME_S):
    # JAX stores only programs that took >= 1 s to compile; a network's inference
    # forward often takes 0.4-1.0 s and was compiled again (with its compile-memory
    # peak) on every warm start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  return p


@functools.cache
def _libc() -> ctypes.CDLL | None:
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.malloc_trim  # glibc only (musl and macOS have no malloc_trim)
  except (OSError, AttributeError):
    return None
  return libc


def release_free_memory() -> bool:
  """Returns the heap pages malloc holds but nobody uses to the OS (glibc ``malloc_trim(0)``).

  Call it after a compilation (the trainer does after the first training step
  and the first evaluation). Safe at any time and from any thread; it does not
  free anything in use. Returns False where the C library has no
  ``malloc_trim`` (then it does nothing).
  """
  libc = _libc()
  if libc is None:
    return False
  libc.malloc_trim(0)
  return True


MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def fix_mmap_threshold(threshold: int | None = None) -> bool:
  """Fixes glibc's mmap threshold at ``threshold`` bytes (``JSEG_MMAP_THRESHOLD``, else
  ``MMAP_THRESHOLD``, 1 MiB): larger blocks are mapped on their own and unmapped when
  freed. Setting it turns off glibc's dynamic threshold, which rises to 32 MiB as mapped
  blocks are freed (the arrays of a training step are mostly 1-32 MiB: after a few steps
  they came from a fragmenting heap; see the module docstring). ``JSEG_MMAP_THRESHOLD=0``
  or a user's own ``MALLOC_MMAP_THRESHOLD_`` leaves glibc's setting alone. Returns whether
  it set the threshold. Process-wide; the entry points (train, evaluate, predict, bench)
  call it once at start."""
  if threshold is None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
      return False
    env = os.environ.get("JSEG_MMAP_THRESHOLD", "").strip()
    try:
      threshold = int(env) if env else MMAP_THRESHOLD
    except ValueError:
      raise ValueError(f"JSEG_MMAP_THRESHOLD must be a number of bytes; got {env!r}.") from None
  if not 0 <= threshold <= 32 << 20:
    raise ValueError(f"the mmap threshold must be >= 0 bytes and at most glibc's maximum, "
                     f"32 MiB; got {threshold}.")
  libc = _libc()
  if threshold == 0 or libc is None or not hasattr(libc, "mallopt"):
    return False
  return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


BLOCK_CACHE_MIN_BYTES = 1 << 20
BLOCK_CACHE_WAIT_US = 20_000
_BLOCK_CACHE_STATS = ("hits", "misses", "waits_served", "waits_timed_out", "most_kept",
                      "kept", "kept_bytes")


def install_block_cache() -> int:
  """Keeps jaxlib's freed host blocks of 1 MiB and more for its next allocation of the
  same size (``jseg/native/block_cache.cc``), so an execution's temporaries block is not
  mapped, page-faulted and zeroed afresh every call: SegNet's training step (256², batch 4)
  had 59k minor faults per step, ~20% of its time
  (``experiments/performance/README.md``, twenty-fourth pass).

  jaxlib's own ``posix_memalign`` / ``free`` table entries are pointed at the cache;
  nothing else in the process changes. A block is kept only while no other block of its
  size is live, and every kept block is freed when an allocation of another size misses
  (another program runs) or at ``release_block_cache``, so the memory held stays what the
  same allocations would hold without it. ``JSEG_BLOCK_CACHE=0`` turns it off (set before
  the first call). Returns the number of table entries redirected (0: off, unavailable,
  or already installed). Process-wide; the entry points call it once at start."""
  env = os.environ.get("JSEG_BLOCK_CACHE", "1").strip().lower()
  if env not in ("0", "1", "off", "on", ""):
    raise ValueError(f"JSEG_BLOCK_CACHE must be 0 or 1; got {env!r}.")
  if env in ("0", "off") or not sys.platform.startswith("linux"):  # ELF tables: Linux only
    return 0
  from jseg import native  # noqa: PLC0415

  lib = native.block_cache()
  if lib is None:
    return 0
  import jaxlib  # noqa: PLC0415

  where = os.path.dirname(os.path.abspath(jaxlib.__file__)) + os.sep
  return int(lib.jseg_block_cache_install(where.encode(), BLOCK_CACHE_MIN_BYTES,
                                          BLOCK_CACHE_WAIT_US))


def release_block_cache() -> None:
  """Frees the blocks ``install_block_cache``'s cache keeps (before an evaluation or a
  save, whose programs allocate other sizes). A no-op when it is not installed."""
  from jseg import native  # noqa: PLC0415

  lib = native.loaded_block_cache()
  if lib is not None:
    lib.jseg_block_cache_release()


def block_cache_stats() -> dict[str, int]:
  """The cache's counters: hits, misses, waits served / timed out, blocks kept now and at
  most, bytes kept now (all 0 when it is not loaded)."""
  from jseg import native  # noqa: PLC0415

  lib = native.loaded_block_cache()
  if lib is None:
    return dict.fromkeys(_BLOCK_CACHE_STATS, 0)
  out = (ctypes.c_uint64 * 7)()
  lib.jseg_block_cache_stats(out)
  return dict(zip(_BLOCK_CACHE_STATS, (int(v) for v in out)))


@contextlib.contextmanager
def releasing_free_memory(interval_s: float = 0.05) -> Iterator[None]:
  """Calls ``release_free_memory`` on entry (after ``release_block_cache``), every
  ``interval_s`` from a thread while the body runs, and on exit.

  Wrap a compilation in it: XLA's compiler frees memory between its passes while it
  allocates more, and glibc keeps those freed pages resident, so the process's peak
  is what the compiler holds plus what it has freed. ``malloc_trim`` never frees
  memory in use, so this is safe around any code; it costs a few percent of the
  compile time (each call walks the heap).
  """
  if interval_s <= 0:
    raise ValueError(f"interval_s must be > 0; got {interval_s}.")
  release_block_cache()  # blocks kept for the previous program would sit under the compiler
  if not release_free_memory():
    yield
    return
  stop = threading.Event()

  def trim() -> None:
    while not stop.wait(interval_s):
      release_free_memory()

  thread = threading.Thread(target=trim, name="jseg-malloc-trim", daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    release_free_memory()
