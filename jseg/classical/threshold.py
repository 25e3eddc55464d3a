"""Histogram thresholding: Otsu (1979) and multi-level Otsu (Liao, Chen & Chung 2001).

Each test image is thresholded on its own grey-level histogram (the classical
use: no learning), giving bins ordered from dark to bright; bin ``i`` is then
labelled with the class most frequent among the training pixels that fell in
bin ``i`` of their own image's thresholding (``mapping='majority'``), or with
the class most concentrated in it (``mapping='balanced'``, see
``base.majority_mapping``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jseg.classical.base import METHODS, Method, grey, majority_mapping


@dataclasses.dataclass
class OtsuThreshold(Method):
  """``levels`` grey-level bins from (multi-)Otsu thresholds, mapped to classes."""

  levels: int = 2
  scale: float = 1.0
  mapping: str = "majority"

  def bins(self, image: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_multiotsu, threshold_otsu

    g = grey(image)
    if np.ptp(g) == 0:
      return np.zeros(g.shape, np.int32)
    if self.levels == 2:
      t = [threshold_otsu(g)]
    else:
      t = threshold_multiotsu(g, classes=self.levels)
    return np.digitize(g, t).astype(np.int32)

  def fit(self, images, labels):
    if self.levels < 2:
      raise ValueError(f"Thresholding needs levels >= 2; got {self.levels}.")
    pairs = self._train_pairs(images, labels)
    b = np.concatenate([self.bins(im).ravel() for im, _ in pairs])
    y = np.concatenate([lab.ravel() for _, lab in pairs])
    self.bin_class_ = majority_mapping(b, y, self.levels, self.num_classes, self.ignore_index, self.mapping)
    return self

  def predict_small(self, image):
    return self.bin_class_[self.bins(image)]


@METHODS.register("otsu")
def _otsu(**kw) -> OtsuThreshold:
  return OtsuThreshold(**{"levels": 2, **kw})


@METHODS.register("multiotsu")
def _multiotsu(**kw) -> OtsuThreshold:
  return OtsuThreshold(**{"levels": 4, **kw})
