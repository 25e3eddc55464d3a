"""jseg: semantic segmentation in JAX/Flax."""

import os
from importlib import metadata

__version__ = "0.1.0"


def _cpu_xla_flags() -> None:
  """Keeps XLA:CPU's YNNPACK to dots and reductions (convolution weight gradients there
  are 2-4x slower); measured x1.1-1.9 faster training on the 2-core CPU
  (experiments/performance/README.md). Must run before JAX starts a backend; only for the
  jaxlib series it was measured on (an unknown XLA flag aborts). Opt out with
  ``JSEG_KEEP_XLA_FLAGS=1``; a user's own setting of the flag wins."""
  flag = "--xla_cpu_experimental_ynn_fusion_type"
  flags = os.environ.get("XLA_FLAGS", "")
  if flag in flags or os.environ.get("JSEG_KEEP_XLA_FLAGS"):
    return
  try:
    jaxlib = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return
  if jaxlib.startswith("0.10."):
    os.environ["XLA_FLAGS"] = f"{flags} {flag}=individual_dot,reduce".strip()


_cpu_xla_flags()
