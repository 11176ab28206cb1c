"""Converted weights: a model's variables plus prototypes, as one orbax checkpoint directory.

This is what `posebh-convert` writes from a PyTorch `.pth` and what training (`init.weights`)
and `posebh-eval --weights` start from. It holds weights only: no optimizer state, no step, no
data-iterator position (those belong to a training workdir's checkpoints).

Layout of `DIR` (an orbax `CompositeCheckpointHandler` checkpoint, written by `save_weights`)::

  DIR/weights/         orbax PyTree (StandardSave) of a plain dict holding only what is present:
                         params              tree, float32       Flax 'params' of `PoseBHModel`
                         batch_stats         tree, float32       Flax 'batch_stats'
                         prototypes          [J, M, E] float32   keypoint prototypes
                         cluster_prototypes  [C, M, E] float32   CPS cluster prototypes
                         cluster_keypoint    [C] int32           global keypoint id per cluster
  DIR/meta/metadata    JSON: format version, source file, model sizes, what is present, notes

Absent entries (a ViTPose++ checkpoint has no prototypes; an un-clustered PoseBH checkpoint has
no cluster→keypoint mapping) are simply not stored and come back as None, so the trainer knows
to initialise them itself.

Atomicity: orbax writes into `DIR.orbax-checkpoint-tmp-*` and renames it to `DIR` only when
complete, so a killed conversion never leaves a `DIR` that loads. With `overwrite=True` the new
weights are first written completely beside the old ones and only then swapped in.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from data_pipelines import storage
from posebh_jax.convert.torch_to_flax import expected_variables
from posebh_jax.errors import CheckpointMismatchError
from posebh_jax.models.posebh import PoseBHModel

FORMAT = "posebh-jax converted weights"
FORMAT_VERSION = 1

# Optional entries of the stored dict, in PretrainedWeights field order.
_OPTIONAL = ("prototypes", "cluster_prototypes", "cluster_keypoint")

PLACEHOLDER_NOTE = ("cluster prototypes are the untrained placeholder; CPS will cluster at its "
                    "start step")


class WeightsMismatchError(CheckpointMismatchError):
  """Converted weights whose leaves do not fit the model they are loaded into."""


@flax.struct.dataclass
class PretrainedWeights:
  """Weights to start training or evaluation from (a pytree; absent parts are None).

  Attributes:
    params: Flax 'params' collection of `PoseBHModel`.
    batch_stats: Flax 'batch_stats' collection (BN running statistics).
    prototypes: keypoint prototypes `[J, M, E]` float32 (J keypoints over all datasets, M
      in-class prototypes, E embedding width), or None (ViTPose++ weights: the trainer
      initialises them).
    cluster_prototypes: CPS cluster prototypes `[C, M, E]` float32, or None.
    cluster_keypoint: `[C]` int32 global keypoint id each cluster stands for (spec §3.3 step 4),
      or None when the cluster prototypes are the untrained placeholder (CPS then clusters at
      its start step) or absent.
  """
  params: Any
  batch_stats: Any
  prototypes: jax.Array | None = None
  cluster_prototypes: jax.Array | None = None
  cluster_keypoint: jax.Array | None = None


def _present(weights: PretrainedWeights) -> dict[str, bool]:
  return {name: getattr(weights, name) is not None for name in _OPTIONAL}


def _to_stored(weights: PretrainedWeights) -> dict[str, Any]:
  """The dict that is saved: params, batch_stats and only the optional entries present."""
  tree: dict[str, Any] = {"params": weights.params}
  if jax.tree_util.tree_leaves(weights.batch_stats):
    tree["batch_stats"] = weights.batch_stats
  for name, present in _present(weights).items():
    if present:
      tree[name] = getattr(weights, name)
  return tree


def _checkpointer() -> ocp.Checkpointer:
  # Handlers named up front so that `metadata()` can describe the stored arrays.
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      weights=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()))


def save_weights(directory: str | epath.PathLike, weights: PretrainedWeights, meta: Mapping,
                 *, overwrite: bool = False) -> epath.Path:
  """Writes `weights` and a JSON `meta` to `directory` (layout in the module docstring).

  Args:
    directory: where to write; must not exist unless `overwrite`.
    weights: arrays (numpy or jax) to store; None entries are not stored.
    meta: JSON-serialisable description (source file, model sizes, notes, ...); `format`,
      `format_version`, `contents` and `num_clusters` are added here.
    overwrite: replace an existing `directory`. The new weights are written completely first,
      so a failure leaves the old directory as it was.

  Returns:
    The directory written.

  Raises:
    FileExistsError: `directory` exists and `overwrite` is False, or it is not converted weights
      (`check_replaceable`); nothing is touched.
  """
  directory = _absolute(directory)
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} already exists (pass overwrite=True / --overwrite to "
                          "replace it)")
  if directory.exists():
    check_replaceable(directory)
  meta = dict(meta)
  meta.update(format=FORMAT, format_version=FORMAT_VERSION,
              contents=dict(params=True, batch_stats=True, **_present(weights)),
              num_clusters=(None if weights.cluster_prototypes is None
                            else int(np.shape(weights.cluster_prototypes)[0])))
  tree = jax.tree_util.tree_map(np.asarray, _to_stored(weights))
  args = ocp.args.Composite(weights=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))

  # Write where nothing exists yet: the final path, or a sibling that is swapped in afterwards
  # (orbax's force=True would delete the old weights before the new ones are complete).
  target = directory
  if directory.exists():
    target = directory.parent / f".{directory.name}.new-{uuid.uuid4().hex[:8]}"
  directory.parent.mkdir(parents=True, exist_ok=True)
  try:
    _checkpointer().save(target, args=args)
  except ValueError as e:
    if "already exists" in str(e):  # Created by someone else since the check above.
      raise FileExistsError(f"{directory} already exists") from e
    raise
  if target != directory:
    old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
    directory.rename(old)
    target.rename(directory)
    old.rmtree()
  return directory


def _absolute(directory: str | epath.PathLike) -> epath.Path:
  """A local directory made absolute; a URL (gs://...) as it is (`epath.Path.absolute()` would
  prefix the working directory to it)."""
  return epath.Path(storage.absolute(os.fspath(directory)))


# What `save_weights` writes at the top of DIR (orbax's commit files, the two items).
_WRITTEN = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", "weights", "meta"})


def check_replaceable(directory: str | epath.PathLike) -> None:
  """Refuses to let `--overwrite` replace anything but converted weights.

  `directory` must hold `meta/metadata` with this format's marker (`"format": FORMAT`, written
  by `save_weights`) and nothing else than what `save_weights` writes, so that a training
  workdir, a repository (`--out=.`) or a folder of unrelated files is never deleted.

  Raises:
    FileExistsError: naming the directory and why it is not replaced (nothing is touched).
  """
  directory = _absolute(directory)
  marker = directory / "meta" / "metadata"
  try:
    meta = json.loads(marker.read_text()) if marker.is_file() else None
  except (ValueError, OSError):
    meta = None
  if not directory.is_dir() or not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise FileExistsError(
        f"{directory} exists and is not converted weights (no {marker} marked "
        f"{FORMAT!r}): --overwrite only replaces a directory written by posebh-convert; "
        "nothing was deleted")
  other = sorted(p.name for p in directory.iterdir() if p.name not in _WRITTEN)
  if other:
    shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
    raise FileExistsError(
        f"{directory} holds converted weights and files posebh-convert did not write "
        f"({shown}): not replaced; nothing was deleted")


def read_meta(directory: str | epath.PathLike) -> dict:
  """The JSON meta of converted weights (no arrays are read).

  Raises:
    FileNotFoundError: no converted weights at `directory`.
  """
  directory = _existing(directory)
  args = ocp.args.Composite(meta=ocp.args.JsonRestore())
  return dict(_checkpointer().restore(directory, args=args)["meta"])


def _existing(directory: str | epath.PathLike) -> epath.Path:
  directory = _absolute(directory)
  if not (directory / "weights").is_dir() or not (directory / "meta").is_dir():
    what = "does not exist" if not directory.exists() else "holds no converted weights"
    raise FileNotFoundError(f"{directory} {what} (expected {directory}/weights and "
                            f"{directory}/meta, as written by posebh-convert)")
  return directory


def _flat(tree: Any) -> dict[str, Any]:
  """'a/b/c' -> leaf, for trees of dicts (what orbax metadata and flax variables are)."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_weights(directory: str | epath.PathLike, model: PoseBHModel, *,
                 num_prototype_keypoints: int, num_in_class: int = 3,
                 sharding: jax.sharding.Sharding | None = None,
                 ) -> tuple[PretrainedWeights, dict]:
  """Restores converted weights into `model`'s variable shapes.

  The expected shapes come from `jax.eval_shape(model.init)` (nothing is allocated for the
  check); the prototype tables are expected as `[num_prototype_keypoints, num_in_class, E]`
  and `[C, num_in_class, E]` with E the model's prototype-head width and C as stored.

  Args:
    directory: written by `save_weights` / `posebh-convert`.
    model: the model the weights are for.
    num_prototype_keypoints: J, total keypoints over all datasets (`layout.total_keypoints`).
    num_in_class: M, prototypes per keypoint.
    sharding: placement of every restored array (e.g. replicated over the mesh); default the
      first local device.

  Returns:
    (weights, meta): float32 params/batch_stats/prototypes and int32 cluster_keypoint as jax
    arrays; absent optional entries are None.

  Raises:
    FileNotFoundError: nothing converted at `directory` (the message names the path).
    WeightsMismatchError: stored leaves missing, unexpected or mis-shaped for `model`
      (each named).
  """
  directory = _existing(directory)
  ckptr = _checkpointer()
  stored = _flat(ckptr.metadata(directory).item_metadata["weights"].tree)

  variables = expected_variables(model)
  expected: dict[str, tuple[tuple[int, ...], Any]] = {}
  for collection in ("params", "batch_stats"):
    for name, leaf in _flat(variables[collection]).items():
      expected[f"{collection}/{name}"] = (tuple(leaf.shape), jnp.float32)
  if model.use_proto_head:
    e = model.proto_head.out_channels
    if "prototypes" in stored:
      expected["prototypes"] = ((num_prototype_keypoints, num_in_class, e), jnp.float32)
    if "cluster_prototypes" in stored:
      c = int(stored["cluster_prototypes"].shape[0])
      expected["cluster_prototypes"] = ((c, num_in_class, e), jnp.float32)
      if "cluster_keypoint" in stored:
        expected["cluster_keypoint"] = ((c,), jnp.int32)

  missing = sorted(set(expected) - set(stored))
  unexpected = sorted(set(stored) - set(expected))
  misshaped = sorted(f"{k}: stored {tuple(stored[k].shape)}, model expects {expected[k][0]}"
                     for k in set(stored) & set(expected)
                     if tuple(stored[k].shape) != expected[k][0])
  if missing or unexpected or misshaped:
    lines = [f"{title} ({len(items)}):\n  " + "\n  ".join(items)
             for title, items in (("missing from the weights", missing),
                                  ("not in the model", unexpected),
                                  ("mis-shaped", misshaped)) if items]
    raise WeightsMismatchError(f"converted weights {directory} do not fit the model:\n"
                               + "\n".join(lines))

  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target: dict[str, Any] = {}
  for key, (shape, dtype) in expected.items():
    node = target
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  restored = ckptr.restore(directory, args=ocp.args.Composite(
      weights=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  tree = restored["weights"]
  weights = PretrainedWeights(params=tree["params"], batch_stats=tree.get("batch_stats", {}),
                              **{name: tree.get(name) for name in _OPTIONAL})
  return weights, dict(restored["meta"])
