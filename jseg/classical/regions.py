"""Region-based segmentation: superpixels classified one region at a time.

The image is over-segmented into regions that follow colour edges, by SLIC
(k-means in colour + position, Achanta et al. TPAMI 2012) or by a compact
watershed of the colour gradient seeded on a grid (Neubert & Protzel, ICPR
2014). Every region is described by the mean and standard deviation of its
CIELAB colour, its mean gradient magnitude and Laplacian-of-Gaussian response
(texture), its centroid and its size, and classified by a random forest
(Breiman 2001) trained on the training images' regions, each labelled with
the majority class of its pixels. All pixels of a region get its class.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jseg.classical.base import METHODS, Method, grey, lab, majority_mapping


@dataclasses.dataclass
class SuperpixelClassifier(Method):
  segmenter: str = "slic"
  segments: int = 400
  compactness: float = 10.0
  trees: int = 100
  min_labelled: float = 0.5  # training regions with less labelled area are skipped

  def regions(self, image: np.ndarray) -> np.ndarray:
    from skimage import segmentation
    from skimage.filters import sobel

    if self.segmenter == "slic":
      x = lab(image) if image.shape[2] == 3 else grey(image)[..., None]
      seg = segmentation.slic(
          x, n_segments=self.segments, compactness=self.compactness / 100.0, start_label=0,
          channel_axis=-1, convert2lab=False, enforce_connectivity=True)
    elif self.segmenter == "watershed":
      grad = sobel(grey(image))
      seg = segmentation.watershed(grad, markers=self.segments, compactness=self.compactness * 1e-4) - 1
    else:
      raise ValueError(f"Unknown segmenter '{self.segmenter}'; choose slic or watershed.")
    # Renumber 0..R-1.
    _, seg = np.unique(seg, return_inverse=True)
    return seg.reshape(image.shape[:2]).astype(np.int32)

  def region_features(self, image: np.ndarray, seg: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    from skimage.filters import sobel

    h, w = seg.shape
    r = int(seg.max()) + 1
    g = grey(image)
    chans = [lab(image)[..., c] for c in range(lab(image).shape[2])]
    chans += [sobel(g), ndimage.gaussian_laplace(g, 2.0), ndimage.gaussian_laplace(g, 4.0)]
    yy, xx = np.mgrid[0:h, 0:w]
    flat = seg.ravel()
    area = np.bincount(flat, minlength=r).astype(np.float64)
    feats = []
    for c in chans + [yy / max(h - 1, 1), xx / max(w - 1, 1)]:
      s = np.bincount(flat, c.ravel(), minlength=r)
      s2 = np.bincount(flat, (c.ravel() ** 2), minlength=r)
      mean = s / area
      feats += [mean, np.sqrt(np.maximum(s2 / area - mean**2, 0))]
    feats.append(area / (h * w))
    return np.stack(feats, 1).astype(np.float32)

  def fit(self, images, labels):
    from sklearn.ensemble import RandomForestClassifier

    xs, ys = [], []
    for im, y in self._train_pairs(images, labels):
      seg = self.regions(im)
      r = int(seg.max()) + 1
      cls = majority_mapping(seg, y, r, self.num_classes, self.ignore_index)
      valid = (y != self.ignore_index) & (y >= 0) & (y < self.num_classes)
      share = np.bincount(seg.ravel(), valid.ravel(), minlength=r) / np.bincount(seg.ravel(), minlength=r)
      keep = share >= self.min_labelled
      xs.append(self.region_features(im, seg)[keep])
      ys.append(cls[keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(x) == 0:
      raise ValueError("No training region has enough labelled pixels to fit the region classifier.")
    self.forest_ = RandomForestClassifier(self.trees, min_samples_leaf=2, random_state=self.seed, n_jobs=1)
    self.forest_.fit(x, y)
    return self

  def predict_small(self, image):
    seg = self.regions(image)
    return self.forest_.predict(self.region_features(image, seg)).astype(np.int32)[seg]


@METHODS.register("slic")
def _slic(**kw) -> SuperpixelClassifier:
  return SuperpixelClassifier(**{"segmenter": "slic", **kw})


@METHODS.register("watershed")
def _watershed(**kw) -> SuperpixelClassifier:
  return SuperpixelClassifier(**{"segmenter": "watershed", **kw})
