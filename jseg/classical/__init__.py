"""Classical (pre-deep-learning) segmentation baselines, for the deep-vs-traditional table.

Each method learns what it needs from the training split and labels every
pixel of a test image with one of the dataset's classes, so it is scored with
the same confusion-matrix metrics as the networks (``python -m jseg.baselines``):

| name | family | idea |
|---|---|---|
| ``otsu`` | histogram thresholding | Otsu's threshold (Otsu 1979) per image on grey level; the dark/bright bins are mapped to classes by majority on the training set |
| ``multiotsu`` | histogram thresholding | multi-level Otsu (Liao et al. 2001), ``levels`` bins, mapped the same way |
| ``kmeans`` | feature-space clustering | k-means on CIELAB colour + weighted position, fit on training pixels; each cluster takes the majority class of its training pixels |
| ``slic`` | region-based | SLIC superpixels (Achanta et al. 2012), each classified from its colour/texture/position statistics by a random forest trained on training superpixels |
| ``watershed`` | region-based | compact watershed on the gradient (Neubert & Protzel 2014), regions classified as for ``slic`` |
| ``svm`` | per-pixel classifier | SVM (RBF kernel via a Nystroem approximation, Williams & Seeger 2001) on hand-crafted per-pixel colour, position and multi-scale edge/texture features |

All methods work on raw images (uint8 ``(H, W, C)``, C = 1 or 3) and int label
maps with ``ignore_index`` for void, at ``scale`` x the original resolution
(labels are upsampled with nearest neighbour), using scikit-image and
scikit-learn on the CPU. ``build(name, num_classes, ignore_index, **params)``
constructs one; ``METHODS.names()`` lists them.
"""

from __future__ import annotations

from typing import Any

from jseg.classical.base import METHODS, Method
from jseg.classical import clustering, pixel_svm, regions, threshold  # noqa: F401  (register)


def build(name: str, num_classes: int, ignore_index: int = 255, **params: Any) -> Method:
  """Constructs the classical method ``name`` (see ``METHODS.names()``)."""
  return METHODS.get(name)(num_classes=num_classes, ignore_index=ignore_index, **params)


__all__ = ["METHODS", "Method", "build"]
