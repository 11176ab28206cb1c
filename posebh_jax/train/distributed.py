"""Multi-process start-up (TPU pods, GPU clusters): `jax.distributed.initialize` from the config,
and the small helpers the multi-process paths share.

Host-side work that only one process does (generating the synthetic data, writing evaluation
outputs) runs on process 0 while the others wait at a barrier. The barrier is the coordination
service's (`wait_at_barrier`: no device collective, an explicit timeout, as the waiting hosts may
idle for minutes) where `jax.distributed` is initialised; a device collective otherwise.
"""

from __future__ import annotations


def initialize_distributed(dist) -> None:
  """`jax.distributed.initialize` from `config.distributed` (unset fields: auto-detected from
  the cluster environment, e.g. TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS etc.)."""
  import jax
  kwargs = {}
  if dist.coordinator_address:
    kwargs["coordinator_address"] = dist.coordinator_address
  if dist.num_processes > 0:
    kwargs["num_processes"] = dist.num_processes
  if dist.process_id >= 0:
    kwargs["process_id"] = dist.process_id
  jax.distributed.initialize(**kwargs)


# Generous: process 0 may render thousands of images while the others wait.
BARRIER_TIMEOUT_S = 3600
_barriers = 0  # Every process passes the same barriers in the same order: ids stay unique.


def is_main() -> bool:
  """Whether this is process 0 (the one that writes shared outputs)."""
  import jax
  return jax.process_index() == 0


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
  """Blocks until every process reaches the barrier `name` (a no-op on one process)."""
  global _barriers
  import jax
  if jax.process_count() == 1:
    return
  _barriers += 1
  name = f"{name} #{_barriers}"
  from jax._src import distributed  # The coordination client: a barrier with a timeout.
  client = distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(f"posebh:{name}", int(timeout_s * 1000))
    return
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(name)
