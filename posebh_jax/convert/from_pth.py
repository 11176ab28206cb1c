"""Reference PyTorch checkpoint (.pth) -> converted weights (the library behind posebh-convert).

Reads the `.pth` without torch and without running pickled code (`convert.pth_reader`), maps
its tensors onto the config's model (`convert.torch_to_flax`) and writes an orbax directory
(`convert.weights`) that `posebh-train --config.init.weights=DIR` and `posebh-eval --weights=DIR`
start from. Accepted inputs (spec §3.1):

  * PoseBH checkpoints (backbone, six heatmap heads, `proto_head.*` incl. the keypoint and
    cluster prototypes);
  * ViTPose++ checkpoints (no `proto_head.*`): for a PoseBH config the prototype head is
    initialised from the model's init with `config.seed`, and the prototypes are left for the
    trainer to initialise;
  * mmcv layouts (`{'meta', 'state_dict', 'optimizer'}`), `{'model': ...}`, `{'module': ...}` or
    a bare state dict, with or without the DDP `module.` key prefix. Optimizer state is ignored.

Any unknown, missing or mis-shaped tensor is reported by name and nothing is written.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from data_pipelines import datasets, storage

if TYPE_CHECKING:
  from posebh_jax.models.posebh import PoseBHModel

log = logging.getLogger("posebh")

_PROTO_PREFIX = "proto_head."
_STATE_DICT_KEYS = ("state_dict", "model", "module")  # mmcv load_checkpoint's order.


class ConversionError(ValueError):
  """The .pth cannot be read, or its tensors do not fit the config's model."""


def extract_state_dict(checkpoint: Any, path: str = "checkpoint"
                       ) -> tuple[dict[str, Any], str | None]:
  """The state dict inside a loaded checkpoint, as mmcv's `load_checkpoint` finds it (spec §3.1).

  Takes `checkpoint['state_dict']`, else `['model']`, else `['module']`, else the dict itself,
  and strips a leading `module.` (DDP) when the first key has it.

  Args:
    checkpoint: what `load_pth` returned.
    path: the file, for messages.

  Returns:
    (state dict name -> numpy array, the top-level key it was under or None for a bare dict).

  Raises:
    ConversionError: no state dict of tensors in it.
  """
  if not isinstance(checkpoint, Mapping):
    raise ConversionError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
  where = next((k for k in _STATE_DICT_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
  state_dict = checkpoint[where] if where is not None else checkpoint
  non_tensors = [str(k) for k, v in state_dict.items() if not isinstance(v, np.ndarray)]
  if not state_dict or non_tensors:
    raise ConversionError(
        f"{path}: no state dict of tensors found (top-level keys {sorted(map(str, checkpoint))}"
        + (f"; non-tensor entries: {non_tensors[:10]}" if non_tensors else "") + ")")
  keys = [str(k) for k in state_dict]
  if keys[0].startswith("module."):
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v
                  for k, v in state_dict.items()}
  return dict(state_dict), where


def _jsonable(value: Any, depth: int = 0) -> Any:
  """A JSON-safe copy of the checkpoint's `meta` (arrays summarised, odd objects as text)."""
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  if isinstance(value, np.ndarray):
    return value.tolist() if value.size <= 16 else f"array{list(value.shape)} {value.dtype}"
  if isinstance(value, np.generic):
    return value.item()
  if depth > 4:
    return repr(value)[:200]
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
  if isinstance(value, (list, tuple, set, frozenset)):
    return [_jsonable(v, depth + 1) for v in value]
  return repr(value)[:200]


def _init_proto_head(model: PoseBHModel, seed: int) -> dict:
  """Initial variables of `model`'s prototype head from `seed` (numpy, flax paths).

  Only the head itself is initialised, on a small dummy feature map: its conv and BN variables
  do not depend on the spatial size, and initialising the whole model would cost a full ViT-H.
  """
  import dataclasses

  import jax
  import jax.numpy as jnp

  from posebh_jax.models.heads import ProtoHead

  head = ProtoHead(**dataclasses.asdict(model.proto_head), dtype=model.dtype)
  features = jnp.zeros((1, 4, 3, model.backbone.embed_dim), jnp.float32)
  # One jitted program: eager init would compile every initialiser op separately.
  init = jax.jit(lambda rng: head.init({"params": rng}, features, train=False))
  variables = jax.device_get(init(jax.random.key(seed)))
  return {c: {"proto_head": v} for c, v in variables.items() if c in ("params", "batch_stats")}


def convert_pth(model: PoseBHModel, pth_path: str, out_dir: str, *, num_in_class: int,
                seed: int = 0, model_meta: Mapping[str, Any] | None = None,
                overwrite: bool = False) -> dict[str, Any]:
  """Converts `pth_path` for an explicitly built `PoseBHModel` (see `convert_checkpoint`).

  Args:
    model: the model the weights are for.
    pth_path: reference checkpoint.
    out_dir: where to write (`convert.weights` layout).
    num_in_class: M, prototypes per keypoint the model's training uses.
    seed: initialises the prototype head when the checkpoint has none (ViTPose++).
    model_meta: what the weights are for, merged into the meta (`experiment.checkpoint_meta`:
      datasets, num_keypoints, model sizes; the same fields a training checkpoint records).
    overwrite: replace an existing `out_dir`.

  Returns:
    The summary described in `convert_checkpoint`.

  Raises:
    FileNotFoundError: `pth_path` does not exist.
    FileExistsError: `out_dir` exists and not `overwrite` (it is left untouched).
    ConversionError: unreadable / forbidden pickle, or tensors that do not fit the model
      (every unknown, missing and mis-shaped one named).
  """
  import jax

  from posebh_jax.objective import clustering
  from posebh_jax.convert import pth_reader, torch_to_flax
  from posebh_jax.convert import weights as weights_lib

  # Local paths or URLs (gs://...): never os.path on them.
  pth_path = storage.absolute(pth_path)
  out_dir = storage.absolute(out_dir)
  if not storage.is_file(pth_path):
    raise FileNotFoundError(f"{pth_path}: no such checkpoint file")
  if storage.exists(out_dir) and not overwrite:  # Fail before the slow part.
    raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
  if storage.exists(out_dir):  # --overwrite replaces converted weights only.
    weights_lib.check_replaceable(out_dir)

  try:
    checkpoint = _load_pth(pth_reader, pth_path)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  state_dict, where = extract_state_dict(checkpoint, pth_path)
  has_optimizer = where is not None and "optimizer" in checkpoint
  proto_keys = [k for k in state_dict if k.startswith(_PROTO_PREFIX)]
  kind = "posebh" if proto_keys else "vitpose++"
  notes: list[str] = []
  ignored: list[str] = []
  initialised: list[str] = []
  ignore_prefixes: tuple[str, ...] = ()
  allow_missing: tuple[str, ...] = ()
  base_variables = None
  if proto_keys and not model.use_proto_head:
    # E.g. PoseBH weights for a ViTPose++ config: the heatmap path is all that is used.
    ignore_prefixes = (_PROTO_PREFIX,)
    ignored.append(f"{len(proto_keys)} proto_head.* tensors (the config has no prototype head)")
  elif not proto_keys and model.use_proto_head:
    # ViTPose++ -> PoseBH (spec §3.1): the prototype head starts from its initialisation.
    allow_missing = ("proto_head",)
    base_variables = _init_proto_head(model, seed)
    initialised.append(f"proto_head (model init, seed {seed})")
    notes.append("no prototypes in the checkpoint: the trainer initialises them")

  log.info("converting %s (%s, %d tensors)", pth_path, kind, len(state_dict))
  try:
    params, batch_stats, extras = torch_to_flax.convert_state_dict(
        state_dict, model, ignore_prefixes=ignore_prefixes, allow_missing=allow_missing,
        base_variables=base_variables)
  except ValueError as e:
    raise ConversionError(f"{pth_path}: {e}") from e

  prototypes = extras.get("kpt_prototypes")
  cluster_prototypes = extras.get("cluster_prototypes")
  bad = [f"proto_head.{name}.prototypes: {tuple(a.shape)}, expected M = {num_in_class} "
         "prototypes per class" for name, a in (("kpt_prototype", prototypes),
                                                ("cluster_prototype", cluster_prototypes))
         if a is not None and a.shape[1] != num_in_class]
  if bad:
    raise ConversionError(f"{pth_path}: state_dict does not match the model:\nmis-shaped keys "
                          f"({len(bad)}):\n  " + "\n  ".join(bad))
  cluster_keypoint = None
  if cluster_prototypes is not None:
    if prototypes is None:
      notes.append("cluster prototypes kept, but without keypoint prototypes their keypoints "
                   "cannot be recovered; CPS will cluster at its start step")
    else:
      # The .pth lacks the cluster -> keypoint link; every cluster's row 0 is one keypoint
      # prototype (spec §3.3 step 4), which gives it back; a random placeholder matches none.
      cluster_keypoint = clustering.cluster_keypoint_from_prototypes(cluster_prototypes,
                                                                     prototypes)
      if cluster_keypoint is None:
        notes.append(weights_lib.PLACEHOLDER_NOTE)
  want_c = (model_meta or {}).get("model_config", {}).get("proto", {}).get("num_clusters")
  if cluster_prototypes is not None and want_c not in (None, cluster_prototypes.shape[0]):
    # Legitimate (CPS picks C from [64, 96, 128]), but the config's table size differs.
    notes.append(f"the checkpoint has {cluster_prototypes.shape[0]} cluster prototypes, the "
                 f"config's model.proto.num_clusters is {want_c}")
  if has_optimizer:
    ignored.append("optimizer state")

  weights = weights_lib.PretrainedWeights(
      params=params, batch_stats=batch_stats, prototypes=prototypes,
      cluster_prototypes=cluster_prototypes, cluster_keypoint=cluster_keypoint)
  num_tensors = sum(1 for k in state_dict if not k.endswith("num_batches_tracked")
                    and not k.startswith(ignore_prefixes))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  meta = dict(
      model_meta or {},
      source=dict(path=pth_path, kind=kind, state_dict_key=where, num_tensors=len(state_dict),
                  pth_meta=_jsonable(checkpoint.get("meta")) if where else None),
      num_in_class=num_in_class,
      num_prototype_keypoints=int(sum(model.num_keypoints)),
      initialised=initialised, ignored=ignored, notes=notes)
  weights_lib.save_weights(out_dir, weights, meta, overwrite=overwrite)

  def shape(a):
    return None if a is None else list(a.shape)
  return dict(
      source=pth_path, out=out_dir, kind=kind, num_tensors_converted=num_tensors,
      num_params=num_params,
      extras=dict(prototypes=shape(prototypes), cluster_prototypes=shape(cluster_prototypes),
                  cluster_keypoint=shape(cluster_keypoint)),
      initialised=initialised, ignored=ignored, notes=notes)


def _load_pth(pth_reader, pth_path: str) -> Any:
  """`pth_reader.load_pth` of a local file, or of a remote one through a local temporary copy
  (the zip reader needs a seekable local file; the copy is deleted afterwards)."""
  if not storage.is_remote(pth_path):
    return pth_reader.load_pth(pth_path)
  with tempfile.TemporaryDirectory(prefix="posebh-convert-") as tmp:
    local = os.path.join(tmp, storage.basename(pth_path))
    with open(local, "wb") as f:
      f.write(storage.read_bytes(pth_path))
    try:
      return pth_reader.load_pth(local)
    except ValueError as e:  # Name the file the user gave, not the temporary copy.
      raise ValueError(str(e).replace(local, pth_path)) from None


def convert_checkpoint(config: ml_collections.ConfigDict, pth_path: str, out_dir: str, *,
                       overwrite: bool = False) -> dict[str, Any]:
  """Converts a reference `.pth` into converted weights for `config`'s model.

  Args:
    config: experiment config (e.g. `configs/posebh.py:b`); its datasets fix the heads and
      prototype count, `config.model` the sizes, `config.seed` the prototype-head init of
      ViTPose++ inputs.
    pth_path: PoseBH or ViTPose++ checkpoint (torch zip format).
    out_dir: where to write; must not exist unless `overwrite`.
    overwrite: replace an existing `out_dir` (only once the new weights are complete).

  Returns:
    Summary dict: source, out, kind ('posebh' | 'vitpose++'), num_tensors_converted,
    num_params, extras (shapes of prototypes / cluster_prototypes / cluster_keypoint, None
    where absent), initialised, ignored (e.g. optimizer state) and notes.

  Raises:
    FileNotFoundError: `pth_path` does not exist.
    FileExistsError: `out_dir` exists and not `overwrite` (it is left untouched).
    ConversionError: unreadable / forbidden pickle, or tensors that do not fit the model.
  """
  from posebh_jax import experiment

  layout = datasets.build_layout(config)
  model = experiment.build_model(config, layout)
  return convert_pth(model, pth_path, out_dir, num_in_class=config.model.proto.num_in_class,
                     seed=config.seed, model_meta=experiment.checkpoint_meta(config, layout),
                     overwrite=overwrite)


def format_summary(summary: Mapping[str, Any]) -> str:
  """Human-readable lines for a `convert_checkpoint` summary."""
  extras = summary["extras"]
  found = [f"{k} {v}" for k, v in extras.items() if v is not None]
  lines = [
      f"converted {summary['source']} ({summary['kind']})",
      f"  -> {summary['out']}",
      f"  tensors converted: {summary['num_tensors_converted']}",
      f"  parameters: {summary['num_params']:,} ({summary['num_params'] / 1e6:.2f}M)",
      f"  extras: {', '.join(found) if found else 'none'}",
  ]
  lines += [f"  initialised: {x}" for x in summary["initialised"]]
  lines += [f"  ignored: {x}" for x in summary["ignored"]]
  lines += [f"  note: {x}" for x in summary["notes"]]
  return "\n".join(lines)
