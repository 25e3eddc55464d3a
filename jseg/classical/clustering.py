"""Feature-space clustering: k-means on colour + position.

The pixels of the training images are described by CIELAB colour and their
normalised (y, x) position times ``position_weight`` and clustered by k-means
(mini-batch, Sculley 2010) into ``clusters`` groups; every cluster takes the
majority class of its training pixels (or, with ``mapping='balanced'``, the
class most concentrated in it). A test pixel goes to its nearest
centroid's class. With ``position_weight`` > 0 the clusters are spatially
coherent (sky at the top, road at the bottom), the classical use of position
in clustering-based segmentation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jseg.classical.base import METHODS, Method, lab, majority_mapping, positions, sample_indices


@dataclasses.dataclass
class KMeansSegmenter(Method):
  clusters: int = 32
  position_weight: float = 0.5
  max_pixels: int = 200_000
  mapping: str = "majority"

  def features(self, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    f = np.concatenate([lab(image), self.position_weight * positions(h, w)], -1)
    return f.reshape(h * w, -1)

  def fit(self, images, labels):
    from sklearn.cluster import MiniBatchKMeans

    pairs = self._train_pairs(images, labels)
    x = np.concatenate([self.features(im) for im, _ in pairs])
    y = np.concatenate([lab_.ravel() for _, lab_ in pairs])
    idx = sample_indices(len(x), self.max_pixels, np.random.default_rng(self.seed))
    self.kmeans_ = MiniBatchKMeans(self.clusters, random_state=self.seed, n_init=3, batch_size=4096)
    self.kmeans_.fit(x[idx])
    self.cluster_class_ = majority_mapping(
        self.kmeans_.predict(x[idx]), y[idx], self.clusters, self.num_classes, self.ignore_index,
        self.mapping)
    return self

  def predict_small(self, image):
    h, w = image.shape[:2]
    return self.cluster_class_[self.kmeans_.predict(self.features(image))].reshape(h, w)


@METHODS.register("kmeans")
def _kmeans(**kw) -> KMeansSegmenter:
  return KMeansSegmenter(**kw)
