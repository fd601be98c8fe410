"""The device mesh and moving batches onto it.

One mesh axis, ``"data"``, over every device of every process: batches are split along it, parameters are
replicated. Each process holds only its own rows of a global batch; :func:`global_batch` assembles them with
``jax.make_array_from_process_local_data``, so one code path serves one CPU, fake CPU devices, a GPU, a TPU and
several hosts.
"""

from __future__ import annotations

import jax
import jax.experimental.multihost_utils
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-axis ``("data",)`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh) -> NamedSharding:
    """Arrays split along their first (batch) axis over the mesh."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Assembles the per-process arrays into global arrays split over the mesh's data axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) global array as one numpy array on every process."""
    if jax.process_count() > 1:
        return np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
