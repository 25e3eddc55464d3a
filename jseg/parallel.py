"""Everything that knows about devices: the mesh, shardings and batch placement.

jseg is data-parallel: one ``Mesh`` with a single ``data`` axis over every
device of every host; batches are split along that axis and parameters are
replicated. Under ``jax.jit`` over such global arrays the loss is a mean over
the global batch, so gradients are averaged across devices by the compiler,
and BatchNorm statistics are computed over the global batch (synchronised BN).
Models never mention devices.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Joins a multi-host job when ``config.distributed`` is set.

  ``jax.distributed.initialize()`` reads the coordinator address, process count
  and process id from the cluster environment (SLURM, Cloud TPU, or the
  ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` variables).
  """
  if config.get("distributed", False):
    jax.distributed.initialize()
    logging.info(
        "Process %d of %d, %d local / %d global devices.",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def create_mesh() -> Mesh:
  """A 1-D mesh named ``data`` over all devices of all processes."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Raises unless the global batch splits evenly over devices and processes."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(
        f"{what}={batch_size} is not divisible by the number of devices ({n}). "
        f"Use a multiple of {n}, e.g. --config.{what}={max(n, batch_size - batch_size % n)}."
    )
  if batch_size % jax.process_count():
    raise ValueError(
        f"{what}={batch_size} is not divisible by the process count ({jax.process_count()})."
    )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places this process's slice of a global batch onto the mesh.

  Each process passes only the examples it loaded; the result is one global
  array per key whose leading axis is the concatenation over processes.
  """
  sharding = batch_sharded(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
  }


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a host pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
