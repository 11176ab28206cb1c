"""Checkpoints: one orbax CheckpointManager per workdir holding three items.

  state  the TrainState pytree (params, optimizer state, prototypes, batch statistics, step, rng)
  data   the grain iterator state, so a resumed run sees exactly the batches it would have seen
  meta   JSON describing what the state is (datasets and keypoint counts, model sizes), checked
         on restore so that a checkpoint of another model fails with a clear message

orbax writes each step into a temporary directory and renames it when complete (on gs://, where
there is no atomic rename, it marks a finished step with `commit_success.txt` and ignores steps
without it), so a process killed mid-save leaves the previous checkpoints intact and loadable. Saves are asynchronous (the
step loop continues while the arrays are written); `max_to_keep` bounds the disk use.

Integrity: orbax checksums only its shard indices, not the array data, so each save records a
digest of every state leaf in `meta` (`state_digest`, computed on the devices from the arrays
being saved; written atomically with the checkpoint). `restore` recomputes it from the restored
arrays and refuses a mismatch. `restore_latest` walks back from the newest checkpoint past any
damaged one (unreadable files, a missing `_METADATA`, an empty iterator state, a digest mismatch),
moves each damaged step aside to `<workdir>/checkpoints_damaged/` and logs why it was skipped.

Preemption: `PreemptionWatch` turns SIGTERM (single process) into a flag, and asks orbax for
JAX's multi-host preemption sync point (`reached_preemption`, all hosts agree on the step);
the loop checks it at every step boundary, saves, waits for the save, and stops cleanly.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
# orbax 0.12 names the default array handler's metadata store only here (pinned <0.13).
from orbax.checkpoint._src.metadata import array_metadata_store
from etils import epath

from data_pipelines import storage
from posebh_jax.errors import CheckpointDamagedError, CheckpointMismatchError

log = logging.getLogger("posebh")


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: every input bit affects every output bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of every element as uint32 (same shape as `x`)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size not in (1, 2, 4):
    raise TypeError(f"cannot digest a {x.dtype} array")
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_digest(x: jax.Array) -> jax.Array:
  """[2] uint32: two position-keyed hashes of `x`'s bits, summed (mod 2**32) over elements.

  A sum of hashed (value, position) pairs: exact in integers, hence the same whatever the
  sharding (1 or N devices), and a changed element changes it with probability 1 - 2**-64.
  Position is the row-major index, built from iotas (no reshape of a sharded array).
  """
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
    stride *= w.shape[d]
  a = _fmix32(w ^ _fmix32(index + jnp.uint32(0x9E3779B9)))
  b = _fmix32(w + _fmix32(index ^ jnp.uint32(0x7F4A7C15)))
  return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


# The inner jit traces `_leaf_digest` once per leaf shape and dtype (params, Adam's mu and nu
# repeat the same shapes); XLA inlines the calls. The first digest of a tiny model's state
# (~230 leaves) went from 3.2 s to 2.3 s, 1.7 s of which is the XLA compile that the persistent
# cache serves.
_leaf_digest_jit = jax.jit(_leaf_digest)
_digest_fn = jax.jit(lambda tree: jax.tree_util.tree_map(_leaf_digest_jit, tree))


def state_digest(state: Any) -> dict[str, str]:
  """Digest of every leaf of `state`: {leaf path: 16 hex digits}. Runs on the devices.

  Every process must call it (a collective over the state's shardings); every process gets the
  same answer.
  """
  digests = _digest_fn(state)
  out = {}
  for path, d in jax.tree_util.tree_leaves_with_path(digests):
    # Replicated result: each process reads its own copy.
    a, b = (int(v) for v in np.asarray(d.addressable_data(0)))
    out[jax.tree_util.keystr(path)] = f"{a:08x}{b:08x}"
  return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dicts → {"a.b.c": leaf}; lists/tuples stay values."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def meta_differences(saved: dict, meta: dict) -> dict[str, tuple[Any, Any]]:
  """Fields that a checkpoint's meta records and that differ from `meta`: {field: (saved, now)}.

  Compared field by field (e.g. `model_config.proto.num_in_class`); a field the checkpoint does
  not record (written by an older version) is not compared.
  """
  a, b = _flatten(saved), _flatten(meta)
  return {k: (a[k], b.get(k)) for k in sorted(a) if k in b and a[k] != b[k]}


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  if len(text) > 300:
    text = text[:300] + "..."
  return f"{type(e).__name__}: {text}"


# Replica-parallel saving (each replica of a replicated array writes a slice of it) only for
# arrays of at least this many bytes per replica slice. Each sliced array costs a `jit(slice)`
# compile and dispatch per replica on the first save of a process (3,438 of them, 6 s of a 20 s
# tiny run on 8 devices); below a few MiB per slice, one replica writing the array is faster.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 16 * 2**20


@functools.cache  # Once per process.
def use_replica_parallel_for_large_arrays_only() -> None:
  """Registers orbax's `jax.Array` handler with `REPLICA_PARALLEL_MIN_SLICE_BYTES`.

  orbax's handler registry is process-wide: this applies to every save of the process. The
  handler is orbax's default otherwise (its array metadata store included: typed PRNG keys
  need it), and the files it writes are the same.
  """
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES), override=True)


class Checkpointer:
  """Saves and restores (state, data iterator, meta) under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    use_replica_parallel_for_large_arrays_only()
    # Strings, not os.path: the workdir may be a URL (gs://...), which orbax takes as it is.
    self.workdir = storage.absolute(workdir)
    self.directory = storage.join(self.workdir, "checkpoints")
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
    # The digest is computed from the arrays being saved and stored in the same atomic commit.
    meta = dict(meta, state_digest=state_digest(state))
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None, meta: dict) -> Any:
    """Restores `step` into the shapes/shardings of `abstract_state` (and the iterator in place).

    Raises:
      CheckpointMismatchError: the checkpoint's meta differs from `meta` (another model/datasets),
        every differing field named.
      CheckpointDamagedError: the restored arrays differ from the digest recorded at save time.
      Exception: whatever orbax/tensorstore/grain raise for unreadable files.
    """
    saved = self.read_meta(step)
    diffs = meta_differences({k: v for k, v in saved.items() if k != "state_digest"}, meta)
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
    state = restored["state"]
    recorded = saved.get("state_digest")
    if recorded is None:
      log.warning("checkpoint %s/%d records no digest (written by an older version): restored "
                  "unverified", self.directory, step)
    else:
      now = state_digest(state)
      bad = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
      if bad:
        raise CheckpointDamagedError(
            f"{len(bad)} state arrays differ from the digest recorded when step {step} was "
            f"saved (bit rot or a modified file): {', '.join(bad[:5])}"
            + (", ..." if len(bad) > 5 else ""))
    return state

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None,
                     meta: dict) -> tuple[int, Any] | None:
    """Restores the newest intact checkpoint: (step, state), or None where there is none.

    A damaged checkpoint (unreadable, incomplete, or differing from its digest) is skipped with a
    warning saying why, and moved to `<workdir>/checkpoints_damaged/<step>` (kept for
    inspection; out of orbax's way, so that training can save that step again).

    Raises:
      CheckpointMismatchError: the newest readable meta belongs to another model (not damage:
        the config is wrong, so nothing falls back).
      CheckpointDamagedError: every checkpoint is damaged (each one's reason named).
    """
    skipped: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator, meta)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # Damage shows as many error types (tensorstore, JSON, grain, ...).
        reason = _one_line(e)
        log.warning("checkpoint step %d in %s is damaged, skipped: %s", step, self.directory,
                    reason)
        skipped.append((step, reason))
        continue
      if skipped:
        self._set_aside([s for s, _ in skipped])
        log.warning("resumed from step %d, the newest intact checkpoint; skipped damaged steps "
                    "%s (moved to %s)", step, ", ".join(str(s) for s, _ in skipped),
                    self._damaged_dir())
      return step, state
    if skipped:
      reasons = "; ".join(f"step {s}: {r}" for s, r in skipped)
      raise CheckpointDamagedError(
          f"every checkpoint in {self.directory} is damaged ({reasons}); move the directory "
          "away to start afresh")
    return None

  def _damaged_dir(self) -> str:
    return storage.join(self.workdir, "checkpoints_damaged")

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged step directories out of orbax's directory (never deletes them)."""
    if jax.process_index() == 0:
      dest = epath.Path(self._damaged_dir())
      for step in steps:
        target = dest / str(step)
        if target.exists():  # Damaged twice at the same step: keep both.
          target = dest / f"{step}.{time.time_ns()}"
        storage.move_tree(storage.join(self.directory, str(step)), str(target))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("posebh_checkpoint_set_aside")
    self._manager.reload()

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
