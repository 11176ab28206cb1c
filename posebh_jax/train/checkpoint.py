"""Checkpoints: one orbax CheckpointManager per workdir holding three items.

  state  the TrainState pytree (params, optimizer state, prototypes, batch statistics, step, rng)
  data   the grain iterator state, so a resumed run sees exactly the batches it would have seen
  meta   JSON describing what the state is (datasets and keypoint counts, model sizes), checked
         on restore so that a checkpoint of another model fails with a clear message

orbax writes each step into a temporary directory and renames it when complete (on gs://, where
there is no atomic rename, it marks a finished step with `commit_success.txt` and ignores steps
without it), so a process killed mid-save leaves the previous checkpoints intact and loadable. Saves are asynchronous (the
step loop continues while the arrays are written); `max_to_keep` bounds the disk use.

Preemption: `PreemptionWatch` turns SIGTERM (single process) into a flag, and asks orbax for
JAX's multi-host preemption sync point (`reached_preemption`, all hosts agree on the step);
the loop checks it at every step boundary, saves, waits for the save, and stops cleanly.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from data_pipelines import storage


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not belong to this config's model."""


class Checkpointer:
  """Saves and restores (state, data iterator, meta) under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    # A string, not os.path: the workdir may be a URL (gs://...), which orbax takes as it is.
    self.directory = storage.join(storage.absolute(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        epath.Path(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
        item_names=("state", "data", "meta"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict,
           *, force: bool = False) -> bool:
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None, meta: dict) -> Any:
    """Restores `step` into the shapes/shardings of `abstract_state` (and the iterator in place).

    Raises:
      CheckpointMismatchError: the checkpoint's meta differs from `meta` (another model/datasets).
    """
    saved = self.read_meta(step)
    diffs = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
    if diffs:
      lines = "; ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} was written for another model or dataset mix "
          f"({lines})")
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    items = dict(state=ocp.args.StandardRestore(target))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point (multi-host; False where the service is not running)."""
    return bool(self._manager.reached_preemption(step))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionWatch:
  """Whether the job should checkpoint and stop now (SIGTERM or a preemption sync point).

  In a single process, SIGTERM sets a flag (the handler does nothing else: the loop saves at the
  next step boundary). With several processes, JAX's preemption service receives the signal and
  orbax's `reached_preemption(step)` makes every host stop at the same step; a per-process flag
  could not (hosts would disagree on the step), so none is installed there.
  """

  def __init__(self, checkpointer: Checkpointer):
    self._ckpt = checkpointer
    self.signalled = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    logging.getLogger("posebh").warning("received signal %d: checkpointing at the next step "
                                        "boundary, then stopping", signum)
    self.signalled = True

  def should_stop(self, step: int) -> bool:
    return self.signalled or self._ckpt.reached_preemption(step)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
