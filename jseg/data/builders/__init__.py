"""One tfds builder per dataset; importing this package registers each in ``jseg.registry.DATASETS``."""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
  if not _info.name.startswith("_") and _info.name != "base":
    importlib.import_module(f"{__name__}.{_info.name}")
