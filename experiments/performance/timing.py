"""Median wall time of a jitted call, for the micro-benchmark scripts in this folder."""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np


def median_ms(fn: Callable[..., Any], *args: Any, n: int = 10) -> float:
  """Median milliseconds of ``fn(*args)`` over ``n`` calls, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))
