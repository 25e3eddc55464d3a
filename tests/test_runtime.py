"""jseg.runtime: the persistent compilation cache, returning freed heap pages and the fixed
mmap threshold."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from jseg import runtime
from jseg.bench.procstats import cur_rss_mb

_PROBE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from jseg import runtime
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    off = runtime.enable_compilation_cache("")  # no directory: stays off
    on = runtime.enable_compilation_cache(sys.argv[1])
    again = runtime.enable_compilation_cache(sys.argv[1] + "_other")  # first one wins
    y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.arange(64.0).reshape(8, 8) / 64)
    print(json.dumps({"off": off, "on": str(on), "again": str(again), "y": float(y),
                      "hits": events.count("/jax/compilation_cache/cache_hits"),
                      "misses": events.count("/jax/compilation_cache/cache_misses")}))
""")


def _probe(cache_dir: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  out = subprocess.run([sys.executable, "-c", _PROBE, cache_dir], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_compilation_cache_is_reused_by_a_later_process(tmp_path):
  cache = tmp_path / "xla"
  first = _probe(str(cache))
  assert first["off"] is None
  assert first["on"] == first["again"] == str(cache)
  assert first["misses"] >= 1 and first["hits"] == 0
  assert any(cache.iterdir()), "nothing was written to the cache"
  second = _probe(str(cache))
  assert second["hits"] >= 1 and second["misses"] == 0
  assert second["y"] == first["y"]  # the same executable: the same bits


def test_compilation_cache_stores_programs_from_a_tenth_of_a_second(tmp_path):
  """JAX's default stores only programs that took >= 1 s to compile (inference forwards
  often take less, and were compiled again on every warm start); a lower setting stays."""
  code = ("import sys, jax; from jseg import runtime; {pre}runtime.enable_compilation_cache(sys.argv[1]); "
          "print(jax.config.jax_persistent_cache_min_compile_time_secs)")
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
  for pre, want in (("", runtime.MIN_COMPILE_TIME_S),
                    ("jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0); ", 0.0)):
    out = subprocess.run([sys.executable, "-c", code.format(pre=pre), str(tmp_path / "c")], env=env,
                         check=True, capture_output=True, text=True).stdout
    assert float(out.strip().splitlines()[-1]) == want


def test_compilation_cache_keeps_the_directory_jax_already_has(tmp_path):
  # conftest sets JAX_COMPILATION_CACHE_DIR for the test session.
  current = os.environ["JAX_COMPILATION_CACHE_DIR"]
  assert str(runtime.enable_compilation_cache(str(tmp_path / "other"))) == current
  assert not (tmp_path / "other").exists()


def _free_all_but_last(size: int = 32 * 1024, count: int = 4096) -> tuple[float, int]:
  """Allocates ``count`` blocks below glibc's mmap threshold (128 MB), makes them resident,
  frees all but the last (which pins the heap top, so free() cannot trim); returns the
  resident MB while all were held and the last block, for the caller to free."""
  libc = runtime._libc()
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  blocks = [libc.malloc(size) for _ in range(count)]
  assert all(blocks)
  for b in blocks:
    ctypes.memset(b, 1, size)  # make the pages resident
  held = cur_rss_mb()
  for b in blocks[:-1]:
    libc.free(b)
  return held, blocks[-1]


@pytest.mark.skipif(runtime._libc() is None, reason="needs glibc's malloc_trim")
def test_release_free_memory_returns_freed_heap_pages():
  held, last = _free_all_but_last()
  before = cur_rss_mb()
  assert runtime.release_free_memory()
  after = cur_rss_mb()
  runtime._libc().free(last)
  assert before > held - 32, "free() already returned the pages; the test shows nothing"
  assert before - after > 64, f"only {before - after:.0f} MB of 128 MB returned"


@pytest.mark.skipif(runtime._libc() is None, reason="needs glibc's malloc_trim")
def test_releasing_free_memory_trims_while_the_body_runs(monkeypatch):
  calls = []
  trim = runtime.release_free_memory
  monkeypatch.setattr(runtime, "release_free_memory", lambda: calls.append(1) or trim())
  with runtime.releasing_free_memory(interval_s=0.02):
    entered = len(calls)
    held, last = _free_all_but_last()
    deadline = time.monotonic() + 5.0
    while cur_rss_mb() > held - 64 and time.monotonic() < deadline:
      time.sleep(0.02)  # only the trimming thread can return the pages meanwhile
    during, in_body = cur_rss_mb(), len(calls) - entered
    runtime._libc().free(last)
  assert entered == 1 and in_body >= 1, (entered, in_body)
  assert held - during > 64, f"only {held - during:.0f} MB of 128 MB returned while the body ran"


def test_releasing_free_memory_rejects_a_bad_interval():
  with pytest.raises(ValueError, match="interval_s"):
    with runtime.releasing_free_memory(interval_s=0):
      pass


_MMAP_PROBE = textwrap.dedent("""
    import ctypes, sys
    from jseg import runtime
    from jseg.bench.procstats import cur_rss_mb
    libc = runtime._libc()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    big = libc.malloc(16 << 20)  # mapped; freeing it raises glibc's threshold to 16 MiB
    libc.free(big)
    if sys.argv[1] == "fixed":
      assert runtime.fix_mmap_threshold(1 << 20)
    blocks = [libc.malloc(2 << 20) for _ in range(48)]  # 96 MB of 2 MiB arrays
    for b in blocks:
      ctypes.memset(b, 1, 2 << 20)
    # free() may not shrink the heap from its top either (in a real run, live arrays sit
    # above the freed ones): only mapped blocks can leave.
    assert libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (an int)
    held = cur_rss_mb()
    for b in blocks:
      libc.free(b)
    print(held - cur_rss_mb())
""")


@pytest.mark.skipif(runtime._libc() is None or not hasattr(runtime._libc(), "mallopt"),
                    reason="needs glibc's mallopt")
def test_fixed_mmap_threshold_returns_freed_arrays_to_the_os():
  """Once a 16 MiB array was freed, glibc's dynamic threshold puts 2 MiB arrays on the heap,
  where they stay resident after free() (the fragmentation that grew DeepLab v3's steps by
  230 MB); with the threshold fixed at 1 MiB they are mapped and leave at once. Fresh
  processes: a heap with free chunks would serve the blocks from them either way."""
  drop = {}
  for mode in ("fixed", "raised"):
    p = subprocess.run([sys.executable, "-c", _MMAP_PROBE, mode], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    drop[mode] = float(p.stdout.split()[-1])
  assert drop["fixed"] > 80 and drop["raised"] < 16, drop


def test_fix_mmap_threshold_respects_the_user_and_checks_its_input(monkeypatch):
  monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
  assert runtime.fix_mmap_threshold() is False  # the user's own glibc setting stays
  monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
  monkeypatch.setenv("JSEG_MMAP_THRESHOLD", "0")
  assert runtime.fix_mmap_threshold() is False
  monkeypatch.setenv("JSEG_MMAP_THRESHOLD", "1MB")
  with pytest.raises(ValueError, match="JSEG_MMAP_THRESHOLD"):
    runtime.fix_mmap_threshold()
  for bad in (-1, 64 << 20):
    with pytest.raises(ValueError, match="32 MiB"):
      runtime.fix_mmap_threshold(bad)


_BLOCK_PROBE = textwrap.dedent("""
    import json, resource, time
    import numpy as np
    import jax, jax.numpy as jnp
    from jseg import runtime
    runtime.fix_mmap_threshold()
    out = {"patched": runtime.install_block_cache()}
    x = jnp.arange(1 << 20, dtype=jnp.float32)  # 4 MiB, live throughout
    f = jax.jit(lambda x: jnp.concatenate([x, -x]) * 2)  # an 8 MiB output per call
    want = np.concatenate([np.arange(1 << 20), -np.arange(1 << 20)]).astype(np.float32) * 2

    def settle(key, value):  # a freed buffer may reach free() a moment later
      for _ in range(200):
        if runtime.block_cache_stats()[key] == value:
          return True
        time.sleep(0.005)
      return False

    faults, equal = [], True
    for i in range(6):
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      y = f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
      equal &= bool(np.array_equal(np.asarray(y), want))
      y.delete()
      settle("kept", 1)
    out.update(faults=sorted(faults[1:])[2], equal=equal, stats=runtime.block_cache_stats())
    y1, y2 = f(x).block_until_ready(), f(x).block_until_ready()  # two live blocks of a size
    y1.delete()
    out["kept_with_twin_live"] = runtime.block_cache_stats()["kept"] if not settle("kept", 1) else 1
    y2.delete()
    out["kept_after_both"] = int(settle("kept", 1))
    runtime.release_block_cache()
    out["after_release"] = runtime.block_cache_stats()["kept_bytes"]
    y = f(x).block_until_ready()
    runtime.release_block_cache()  # before the block is freed: it is not kept either
    y.delete()
    out["kept_freed_after_release"] = int(settle("kept", 1))
    f(x).block_until_ready().delete()  # the next call keeps again
    out["kept_after_next_call"] = int(settle("kept", 1))
    print(json.dumps(out))
""")


def _block_probe(cache: str) -> dict:
  env = dict(os.environ, JSEG_BLOCK_CACHE=cache)
  p = subprocess.run([sys.executable, "-c", _BLOCK_PROBE], env=env, capture_output=True,
                     text=True, timeout=180)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="jaxlib's ELF tables (Linux)")
def test_block_cache_reuses_a_freed_block_for_the_next_call_of_its_size():
  """With the cache an 8 MiB output comes back to the next call without page faults (the
  same values); without it (``JSEG_BLOCK_CACHE=0``) each call faults its 2048 pages in
  again. A block is not kept while another of its size is live; release frees it, and a
  block freed after a release (an execution's temporaries can be freed just after the
  caller has its outputs) is not kept until the next call."""
  on, off = _block_probe("1"), _block_probe("0")
  assert on["patched"] > 0 and off["patched"] == 0
  assert on["equal"] and off["equal"]
  assert off["faults"] >= 2000 and on["faults"] < 500, (on, off)
  assert on["stats"]["hits"] >= 4 and off["stats"]["hits"] == 0, on["stats"]
  assert on["kept_with_twin_live"] == 0 and on["kept_after_both"] == 1, on
  assert on["after_release"] == 0, on
  assert on["kept_freed_after_release"] == 0 and on["kept_after_next_call"] == 1, on


def test_block_cache_checks_its_switch(monkeypatch):
  monkeypatch.setenv("JSEG_BLOCK_CACHE", "yes please")
  with pytest.raises(ValueError, match="JSEG_BLOCK_CACHE"):
    runtime.install_block_cache()
  monkeypatch.setenv("JSEG_BLOCK_CACHE", "0")
  assert runtime.install_block_cache() == 0
