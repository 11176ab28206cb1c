"""Multi-process start-up (TPU pods, GPU clusters): `jax.distributed.initialize` from the config."""

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
