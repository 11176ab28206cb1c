"""Small multi-process helpers: which process writes, and a barrier that waits long enough.

Host-side work that only one process does (generating the synthetic data, writing evaluation
outputs) runs on process 0 while the others wait at a barrier. The barrier is the coordination
service's (`wait_at_barrier`, no device collective, an explicit timeout: the waiting hosts may
idle for minutes) where `jax.distributed` is initialised; a device collective otherwise.
"""

from __future__ import annotations

import jax

# Generous: process 0 may render thousands of images while the others wait.
BARRIER_TIMEOUT_S = 3600
_barriers = 0  # Every process passes the same barriers in the same order: ids stay unique.


def is_main() -> bool:
  """Whether this is process 0 (the one that writes shared outputs)."""
  return jax.process_index() == 0


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
  """Blocks until every process reaches the barrier `name` (a no-op on one process)."""
  global _barriers
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
