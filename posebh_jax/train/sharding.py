"""Device mesh and shardings.

The mesh has two axes, `data` and `fsdp` (`config.mesh`). The batch is split over both (every
device sees its own examples); parameters and their optimizer moments are additionally split
along `fsdp` (ZeRO-3 / FSDP style), each leaf along its largest dimension divisible by the
`fsdp` size, when it has at least `mesh.fsdp_min_size` elements; everything else (small leaves,
BatchNorm statistics, prototypes, step, rng) is replicated. With `fsdp=1` this is plain data
parallelism.

Shardings are derived from shapes (`jax.eval_shape`), so nothing is materialised on one device
before it is placed.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from data_pipelines import pipeline


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (all if None).

  `mesh.fsdp` (default 1) devices per parameter shard group; `mesh.data=-1` uses every remaining
  device on the data axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  fsdp = int(mesh_config.get("fsdp", 1))
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} does not divide {len(devices)} devices")
  data = len(devices) // fsdp if mesh_config.data in (-1, None) else int(mesh_config.data)
  n = data * fsdp
  if data < 1 or n > len(devices) or len(devices) % n:
    raise ValueError(f"mesh.data={mesh_config.data} x mesh.fsdp={fsdp} does not fit "
                     f"{len(devices)} devices")
  processes = {d.process_index for d in devices}
  if n != len(devices) and len(processes) > 1:
    # A mesh on a subset of a pod's devices leaves some hosts without a device to feed.
    raise ValueError(f"mesh.data={mesh_config.data} x mesh.fsdp={fsdp} = {n} devices, but a "
                     f"multi-process mesh must use all {len(devices)} devices of its "
                     f"{len(processes)} processes (mesh.data=-1 fills them)")
  # Explicit `Auto` axis types: the classic automatic (GSPMD) partitioning (make_mesh defaults
  # to explicit axes in this JAX version).
  return jax.make_mesh((data, fsdp), pipeline.BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """The leaf's partition: its largest dimension divisible by `fsdp` (the first of equals) on
  the `fsdp` axis, or replicated (small leaf, no divisible dimension, fsdp = 1)."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not dims:
    return P()
  best = max(dims, key=lambda i: (shape[i], -i))
  return P(*([None] * best + ["fsdp"]))


def state_shardings(mesh: Mesh, abstract_state: Any, min_size: int = 2 ** 14) -> Any:
  """Shardings for every leaf of the (abstract) train state.

  `params` and `opt_state` follow `fsdp_spec`; the rest is replicated.
  """
  rep = replicated(mesh)
  fsdp = int(dict(mesh.shape).get("fsdp", 1))  # A plain ("data",) mesh works too.
  shard = lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size))
  out = jax.tree_util.tree_map(lambda _: rep, abstract_state)
  return out.replace(params=jax.tree_util.tree_map(shard, abstract_state.params),
                     opt_state=jax.tree_util.tree_map(shard, abstract_state.opt_state))


def put_host_array(x: Any, sharding: NamedSharding) -> jax.Array:
  """A host value that every process holds identically, placed in `sharding` (global array).

  Each process fills only its own shards (`make_array_from_callback`), so, unlike
  `jax.device_put`, there is no cross-process equality check (a collective that times out when
  one host is busy, e.g. still compiling). The caller guarantees equality: the values come from
  the same file or the same deterministic host computation on every process.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def per_device_bytes(tree: Any) -> int:
  """Bytes of `tree`'s arrays held by the first device (one shard of each leaf)."""
  dev = jax.local_devices()[0]
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    total += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev)
  return total


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
  """Validates that the global batch splits over devices and hosts; returns the per-host size
  (the rows this process feeds: its devices' share of `batch_sharding`)."""
  n_dev = int(np.prod(list(mesh.shape.values())))
  if global_batch % n_dev:
    raise ValueError(f"train.batch_size={global_batch} is not divisible by {n_dev} devices")
  if global_batch % jax.process_count():
    raise ValueError(f"train.batch_size={global_batch} is not divisible by "
                     f"{jax.process_count()} hosts")
  local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  return global_batch // n_dev * local
