"""Feature extractors shared by the segmentation networks.

A backbone's ``__call__(x, train)`` returns a dict of named feature maps
(e.g. ``{"stem": ..., "layer1": ..., "layer4": ...}``) so decoders pick the
levels they need by name.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
  if not _info.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_info.name}")
