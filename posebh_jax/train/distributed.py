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


class SignalStop:
  """SIGTERM on any process → every process checkpoints and stops at the same step, where JAX's
  preemption service is absent (`jax_enable_preemption_service=False`, or a runtime without it).

  A flag alone cannot work on several processes: hosts would stop at different steps and wait
  forever in each other's collectives. So the signalled process proposes a stop step a few
  steps ahead through the coordination service's key-value store (the first proposal wins), and
  every process polls that key at each step boundary (a small RPC, no device collective). Hosts
  are at most a couple of steps apart (each reads the previous step's finiteness flag, which needs
  every host's part of that step), so `MARGIN` steps ahead is still ahead for everyone.

  Single process, or with the preemption service running: inactive (`checkpoint.PreemptionWatch`
  covers those).
  """

  MARGIN = 4
  KEY = "posebh/stop_step"

  def __init__(self):
    import signal
    import threading

    import jax
    from jax._src import distributed
    self.signalled = False
    self._stop: int | None = None
    self._proposed = False
    self._previous = None
    self._client = None
    state = distributed.global_state
    if (jax.process_count() > 1 and state.client is not None
        and state.preemption_sync_manager is None
        and threading.current_thread() is threading.main_thread()):
      self._client = state.client
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  @property
  def active(self) -> bool:
    return self._client is not None

  def _on_signal(self, signum, frame) -> None:
    del frame
    import logging
    logging.getLogger("posebh").warning(
        "received signal %d: all processes checkpoint and stop a few steps ahead", signum)
    self.signalled = True

  def should_stop(self, step: int) -> bool:
    """Whether every process stops before running `step` (True on all of them at one step)."""
    if self._client is None:
      return False
    if self.signalled and not self._proposed:
      self._proposed = True
      try:
        self._client.key_value_set(self.KEY, str(step + self.MARGIN))
      except Exception:  # pylint: disable=broad-except
        pass  # Another process proposed first: its step holds.
    if self._stop is None:
      try:
        self._stop = int(self._client.key_value_try_get(self.KEY))
      except Exception:  # pylint: disable=broad-except
        return False  # No proposal yet (NOT_FOUND).
    return step >= self._stop

  def close(self) -> None:
    if self._previous is not None:
      import signal
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
