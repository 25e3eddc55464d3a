"""Jitted functions compiled with XLA options that the run's config chooses.

JAX takes a program's XLA options when it compiles (``Lowered.compile(compiler_options=)``)
or on a top-level ``jax.jit(..., compiler_options=)``, which it refuses inside another trace
(a ``jax.make_jaxpr`` of the function, a user's outer jit). ``OnCall`` therefore compiles on
the first call for each argument signature, as ``jax.jit`` would, with the options, and
lets traced calls through the plain jit. The options used today: XLA:CPU's older (LLVM-IR)
fusion emitters, the same values for about a quarter of the compiler's memory
(``experiments/performance/README.md``, twenty-sixth and twenty-seventh passes).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

FUSION_EMITTERS_OFF = {"xla_cpu_use_fusion_emitters": False}


def traced(*trees: Any) -> bool:
  """Whether any leaf is a tracer (the function called inside another trace)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def signature(*trees: Any) -> tuple:
  """What a jitted call compiles for: the tree structure and each leaf's shape, dtype and
  sharding."""
  leaves, treedef = jax.tree.flatten(trees)
  return treedef, tuple((np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x),
                         getattr(x, "sharding", None)) for x in leaves)


def fusion_emitter_options(config: ml_collections.ConfigDict, field: str) -> dict[str, Any] | None:
  """XLA options for the programs that ``config.<field>`` governs: XLA:CPU's older fusion
  emitters where it is False and the backend is the CPU (other backends ignore it), else
  None (XLA's defaults, or a user's ``XLA_FLAGS``). A missing field reads True (configs
  and checkpoints from before it)."""
  emitters = config.get(field, True)
  if not isinstance(emitters, bool):
    raise ValueError(f"config.{field} must be True or False; got {emitters!r}.")
  if emitters or jax.default_backend() != "cpu":
    return None
  return dict(FUSION_EMITTERS_OFF)


class OnCall:
  """``jitted`` compiled with ``options`` on its first call per argument signature.

  Called like ``jitted``; without options (None or empty) every call is ``jitted``'s own.
  ``lower`` is ``jitted.lower``; compile the result with ``**compile_kwargs(options)``.
  """

  def __init__(self, jitted: Any, options: dict[str, Any] | None):
    self.jitted = jitted
    self.options = options or None
    self._compiled: dict[Any, Any] = {}

  def __call__(self, *args: Any) -> Any:
    if self.options is None or traced(*args):
      return self.jitted(*args)
    key = signature(*args)
    compiled = self._compiled.get(key)
    if compiled is None:  # as jax.jit would compile on this call, with the options
      compiled = self._compiled[key] = self.jitted.lower(*args).compile(
          compiler_options=self.options)
    return compiled(*args)

  def lower(self, *args: Any) -> Any:
    return self.jitted.lower(*args)


def compile_kwargs(options: dict[str, Any] | None) -> dict[str, Any]:
  """Keyword arguments for ``Lowered.compile`` that apply ``options`` (none when None)."""
  return {"compiler_options": options} if options else {}
