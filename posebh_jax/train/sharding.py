"""Device mesh and shardings.

The mesh has a `data` axis: the batch is split along it and the train state is replicated.
Shardings are derived from shapes (`jax.eval_shape`), so nothing is materialised on one device
before it is placed.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A 1-D mesh ('data',) over `devices` (all devices if None; `data=-1` uses all of them)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if mesh_config.data in (-1, None) else int(mesh_config.data)
  if n > len(devices) or len(devices) % n:
    raise ValueError(f"mesh.data={mesh_config.data} does not fit {len(devices)} devices")
  # Explicit `Auto` axis types: the classic automatic (GSPMD) partitioning (make_mesh defaults
  # to explicit axes in this JAX version).
  return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
  """Shardings for every leaf of the (abstract) train state: replicated over `data`."""
  rep = replicated(mesh)
  return jax.tree_util.tree_map(lambda _: rep, abstract_state)


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
  """Validates that the global batch splits over devices and hosts; returns the per-host size."""
  n_dev = int(np.prod(list(mesh.shape.values())))
  if global_batch % n_dev:
    raise ValueError(f"train.batch_size={global_batch} is not divisible by {n_dev} devices")
  if global_batch % jax.process_count():
    raise ValueError(f"train.batch_size={global_batch} is not divisible by "
                     f"{jax.process_count()} hosts")
  return global_batch // jax.process_count()
