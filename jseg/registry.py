"""Name -> constructor registries for models, datasets, losses and optimisers.

A registry is a plain dict wrapper: ``MODELS.register("pspnet")(build_fn)`` adds
an entry, ``MODELS.get("pspnet")`` returns it, and an unknown name raises a
``KeyError`` that lists every valid name. Registries are module-level
constants filled at import time by the modules that define the entries; there
is no other global state.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A named mapping from string keys to constructors."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator adding ``fn`` under ``name``; a duplicate name is an error."""

    def add(fn: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} '{name}' is registered twice.")
      self._entries[name] = fn
      return fn

    return add

  def get(self, name: str) -> T:
    """Returns the entry for ``name`` or raises naming the valid choices."""
    try:
      return self._entries[name]
    except KeyError:
      valid = ", ".join(sorted(self._entries)) or "(none registered)"
      raise KeyError(
          f"Unknown {self.kind} '{name}'. Valid {self.kind} names: {valid}."
      ) from None

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())


MODELS: Registry[Callable] = Registry("model")
DATASETS: Registry[Callable] = Registry("dataset")
LOSSES: Registry[Callable] = Registry("loss")
OPTIMIZERS: Registry[Callable] = Registry("optimizer")
SCHEDULES: Registry[Callable] = Registry("schedule")
