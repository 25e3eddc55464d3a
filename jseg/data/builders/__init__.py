"""One ``DatasetSpec`` per dataset; importing this package registers each in ``jseg.registry.DATASETS``.

It does not import tensorflow_datasets: ``tfds_builder`` (loaded by ``jseg.data.source``) does.
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
  if not _info.name.startswith("_") and _info.name not in ("base", "tfds_builder"):
    importlib.import_module(f"{__name__}.{_info.name}")
