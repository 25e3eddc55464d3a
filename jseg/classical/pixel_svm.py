"""Per-pixel SVM on hand-crafted colour, position and texture features.

Each pixel is described by its CIELAB colour, its normalised position and
scikit-image's multi-scale local features on every channel (Gaussian-smoothed
intensity, gradient magnitude and Hessian eigenvalues at ``sigma`` 1..16: the
filter-bank features of classical texture segmentation, e.g. Winn et al.
2005), standardised. A soft-margin SVM with an RBF kernel (Cortes & Vapnik
1995) is trained on ``max_pixels`` training pixels; for speed the kernel is
approximated by ``components`` Nystroem features (Williams & Seeger 2001) and
the SVM solved in that space (``LinearSVC``, one-vs-rest). ``kernel='linear'``
skips the approximation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jseg.classical.base import METHODS, Method, lab, positions, sample_indices, to_unit


@dataclasses.dataclass
class PixelSVM(Method):
  kernel: str = "rbf"
  components: int = 300
  c: float = 1.0
  max_pixels: int = 30_000
  sigma_max: float = 16.0
  class_weight: str | None = "balanced"

  def features(self, image: np.ndarray) -> np.ndarray:
    from skimage.feature import multiscale_basic_features

    h, w = image.shape[:2]
    tex = multiscale_basic_features(
        to_unit(image), intensity=True, edges=True, texture=True, sigma_min=1.0,
        sigma_max=self.sigma_max, channel_axis=-1)
    f = np.concatenate([lab(image), positions(h, w), tex], -1)
    return f.reshape(h * w, -1).astype(np.float32)

  def fit(self, images, labels):
    from sklearn.kernel_approximation import Nystroem
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if self.kernel not in ("rbf", "linear"):
      raise ValueError(f"PixelSVM kernel '{self.kernel}' is not one of rbf, linear.")
    rng = np.random.default_rng(self.seed)
    pairs = self._train_pairs(images, labels)
    per_image = max(1, self.max_pixels // len(pairs))
    xs, ys = [], []
    for im, y in pairs:
      y = y.ravel()
      ok = np.flatnonzero((y != self.ignore_index) & (y >= 0) & (y < self.num_classes))
      pick = ok[sample_indices(len(ok), per_image, rng)]
      xs.append(self.features(im)[pick])
      ys.append(y[pick])
    x, y = np.concatenate(xs), np.concatenate(ys)
    steps = [StandardScaler()]
    if self.kernel == "rbf":
      steps.append(Nystroem(gamma=1.0 / x.shape[1], n_components=min(self.components, len(x)),
                            random_state=self.seed))
    steps.append(LinearSVC(C=self.c, class_weight=self.class_weight, random_state=self.seed))
    self.model_ = make_pipeline(*steps).fit(x, y)
    return self

  def predict_small(self, image):
    h, w = image.shape[:2]
    return self.model_.predict(self.features(image)).reshape(h, w).astype(np.int32)


@METHODS.register("svm")
def _svm(**kw) -> PixelSVM:
  return PixelSVM(**kw)
