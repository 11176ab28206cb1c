"""Maps a reference PyTorch PoseBH / ViTPose++ state_dict onto `PoseBHModel` variables.

Key correspondence (spec §3.1); the flax module names mirror the PyTorch ones, so the mapping is
mechanical: `name.N` becomes `name_N`, and the leaf is renamed/transposed by layer type.

  backbone.pos_embed                                -> params backbone/pos_embed
  backbone.patch_embed.proj.{weight,bias}           -> backbone/patch_embed/proj/{kernel,bias}
  backbone.blocks.{i}.{norm1,norm2}.{weight,bias}   -> backbone/blocks_i/normX/{scale,bias}
  backbone.blocks.{i}.attn.{qkv,proj}.*             -> backbone/blocks_i/attn/{qkv,proj}/*
  backbone.blocks.{i}.mlp.{fc1,fc2}.*               -> backbone/blocks_i/mlp/{fc1,fc2}/*
  backbone.blocks.{i}.mlp.experts.{e}.weight/bias   -> .../mlp/experts_{kernel,bias}[e]
  backbone.last_norm.*                              -> backbone/last_norm/*
  keypoint_head.*                                   -> heads_0/*
  associate_keypoint_heads.{i}.*                    -> heads_{i+1}/*
    deconv_layers.{j}.weight (4-D) / final_layer.*  -> deconv_layers_j/kernel / final_layer/*
    deconv_layers.{j}.{weight,bias} (BN)            -> deconv_layers_j/{scale,bias}
    deconv_layers.{j}.running_{mean,var}            -> batch_stats .../deconv_layers_j/{mean,var}
  proto_head.{deconv_layers.j, neck.{conv1,bn1,conv2,bn2,downsample.{0,1}}, head.{0,1,3}}.*
                                                    -> proto_head/{deconv_layers_j, neck/..., head_k}
  proto_head.kpt_prototype.prototypes               -> extras['kpt_prototypes']     [214, M, E]
  proto_head.cluster_prototype.prototypes           -> extras['cluster_prototypes'] [C, M, E]
  *.num_batches_tracked                             -> ignored

Transposes: Linear `[out, in]` -> `[in, out]`; Conv2d `[O, I, kh, kw]` -> `[kh, kw, I, O]`;
ConvTranspose2d `[I, O, kh, kw]` -> `[kh, kw, O, I]` (the same permutation, see
`models/heads.torch_conv_transpose`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from posebh_jax.models.posebh import PoseBHModel

Tree = dict[str, Any]

_EXTRAS = {
    "proto_head.kpt_prototype.prototypes": "kpt_prototypes",
    "proto_head.cluster_prototype.prototypes": "cluster_prototypes",
}
_IGNORED_LEAVES = ("num_batches_tracked",)
_EXPERT_RE = re.compile(r"^(backbone\.blocks\.\d+\.mlp)\.experts\.(\d+)\.(weight|bias)$")
_ASSOC_RE = re.compile(r"^associate_keypoint_heads\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class _Target:
  """Where one PyTorch tensor goes."""
  collection: str  # 'params' or 'batch_stats'.
  path: tuple[str, ...]  # Flax path of the leaf.
  transform: str  # 'identity' | 'linear' (2-D .T) | 'conv' (4-D permute) | 'expert_*'.
  expert: int | None = None  # Row of a stacked experts leaf.


def expected_variables(model: PoseBHModel) -> dict[str, Tree]:
  """Shapes of the model's variables, traced with `jax.eval_shape` (nothing is allocated).

  Returns:
    {'params': tree of ShapeDtypeStruct, 'batch_stats': tree of ShapeDtypeStruct}.
  """
  h, w = model.backbone.img_size
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  index = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(
      lambda x, i: model.init({"params": jax.random.key(0)}, x, i, train=False), images, index)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _module_path(parts: Sequence[str]) -> tuple[str, ...]:
  """['blocks', '0', 'norm1'] -> ('blocks_0', 'norm1'): nn.Sequential / ModuleList indices."""
  out: list[str] = []
  for p in parts:
    if p.isdigit():
      if not out:
        raise KeyError(p)
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return tuple(out)


def _get(tree: Tree, path: Sequence[str]) -> Any:
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _target(key: str, expected: Mapping[str, Tree]) -> _Target | None:
  """Flax target of a (prefix-stripped) PyTorch key; None when the key has no place."""
  params = expected["params"]
  if (m := _EXPERT_RE.match(key)) is not None:
    module = ("backbone",) + _module_path(m.group(1).split(".")[1:])
    leaf = "experts_kernel" if m.group(3) == "weight" else "experts_bias"
    if _get(params, module + (leaf,)) is None:
      return None
    return _Target("params", module + (leaf,), f"expert_{m.group(3)}", int(m.group(2)))

  # Heads: the reference names dataset 0's head `keypoint_head`, datasets 1..5
  # `associate_keypoint_heads.{0..4}`; ours are `heads_{d}`.
  if key.startswith("keypoint_head."):
    top, rest = ("heads_0",), key[len("keypoint_head."):]
  elif (m := _ASSOC_RE.match(key)) is not None:
    top, rest = (f"heads_{int(m.group(1)) + 1}",), key[m.end():]
  elif key.startswith(("backbone.", "proto_head.")):
    head, rest = key.split(".", 1)
    top = (head,)
  else:
    return None

  parts = rest.split(".")
  leaf = parts[-1]
  try:
    module = top + _module_path(parts[:-1])
  except KeyError:
    return None
  if leaf == "pos_embed" and module == ("backbone",):
    return _Target("params", ("backbone", "pos_embed"), "identity")
  node = _get(params, module)
  if not isinstance(node, Mapping):
    return None
  if leaf == "weight" and "kernel" in node:
    return _Target("params", module + ("kernel",), "kernel")
  if leaf == "weight" and "scale" in node:  # LayerNorm / BatchNorm.
    return _Target("params", module + ("scale",), "identity")
  if leaf == "bias" and "bias" in node:
    return _Target("params", module + ("bias",), "identity")
  stats = {"running_mean": "mean", "running_var": "var"}
  if leaf in stats and _get(expected["batch_stats"], module + (stats[leaf],)) is not None:
    return _Target("batch_stats", module + (stats[leaf],), "identity")
  return None


def _torch_shape(target: _Target, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape that maps onto a flax leaf of `flax_shape` under `target.transform`."""
  t = target.transform
  if t == "identity":
    return flax_shape
  if t == "kernel" and len(flax_shape) == 2:  # Linear: [in, out] <- [out, in].
    return flax_shape[::-1]
  if t == "kernel" and len(flax_shape) == 4:  # (De)conv: [kh, kw, X, Y] <- [Y, X, kh, kw].
    kh, kw, x, y = flax_shape
    return (y, x, kh, kw)
  if t == "expert_weight":  # experts_kernel [E, 4D, P] <- experts.e.weight [P, 4D].
    return (flax_shape[2], flax_shape[1])
  if t == "expert_bias":  # experts_bias [E, P] <- experts.e.bias [P].
    return (flax_shape[1],)
  raise ValueError(f"no transform {t} for a leaf of shape {flax_shape}")


def _to_flax(target: _Target, value: np.ndarray) -> np.ndarray:
  value = np.asarray(value)
  if target.transform == "kernel" and value.ndim == 2:
    value = value.T
  elif target.transform == "kernel" and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif target.transform == "expert_weight":
    value = value.T
  return np.ascontiguousarray(value, dtype=np.float32)


def _flat_leaves(tree: Mapping[str, Any],
                 prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out: dict[tuple[str, ...], Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat_leaves(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _set(tree: Tree, path: Sequence[str], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _strip(key: str) -> str:
  # DDP checkpoints prefix every key with 'module.' (mmcv's load_checkpoint strips it too).
  return key[len("module."):] if key.startswith("module.") else key


def _plan(shapes: Mapping[str, Sequence[int]], model: PoseBHModel, *,
          ignore_prefixes: Sequence[str], allow_missing: Sequence[str]
          ) -> tuple[dict[str, _Target], dict[str, str], dict[str, Tree]]:
  """Assigns every PyTorch key a target and checks names and shapes.

  Returns:
    (targets by original key, extras name by original key, expected variable shapes).

  Raises:
    ValueError: listing unknown, mis-shaped and missing keys together.
  """
  expected = expected_variables(model)
  unknown: list[str] = []
  misshaped: list[str] = []
  targets: dict[str, _Target] = {}
  extras: dict[str, str] = {}
  covered: set[tuple[str, tuple[str, ...], int | None]] = set()
  for key, shape in shapes.items():
    name = _strip(key)
    shape = tuple(int(s) for s in shape)
    if name.endswith(_IGNORED_LEAVES) or name.startswith(tuple(ignore_prefixes)):
      continue
    if name in _EXTRAS:
      if not model.use_proto_head:
        unknown.append(key)
        continue
      e = model.proto_head.out_channels
      if len(shape) != 3 or shape[2] != e or (
          name.endswith("kpt_prototype.prototypes") and shape[0] != sum(model.num_keypoints)):
        misshaped.append(f"{key}: {shape}, expected [num_classes, M, {e}]")
        continue
      extras[key] = _EXTRAS[name]
      continue
    target = _target(name, expected)
    if target is None:
      unknown.append(key)
      continue
    flax_shape = tuple(_get(expected[target.collection], target.path).shape)
    want = _torch_shape(target, flax_shape)
    if shape != want:
      misshaped.append(f"{key}: {shape}, expected {want} (-> {'/'.join(target.path)})")
      continue
    if target.expert is not None and not 0 <= target.expert < flax_shape[0]:
      unknown.append(key)
      continue
    targets[key] = target
    covered.add((target.collection, target.path, target.expert))

  missing: list[str] = []
  for collection in ("params", "batch_stats"):
    for path, leaf in _flat_leaves(expected[collection]).items():
      if "/".join(path).startswith(tuple(allow_missing)):
        continue
      rows = range(leaf.shape[0]) if path[-1] in ("experts_kernel", "experts_bias") else [None]
      for row in rows:
        if (collection, path, row) not in covered:
          missing.append(f"{collection}/{'/'.join(path)}" + (f"[{row}]" if row is not None else ""))
  if unknown or misshaped or missing:
    lines = []
    for title, items in (("unknown keys", unknown), ("mis-shaped keys", misshaped),
                         ("missing variables", missing)):
      if items:
        lines.append(f"{title} ({len(items)}):\n  " + "\n  ".join(items))
    raise ValueError("state_dict does not match the model:\n" + "\n".join(lines))
  return targets, extras, expected


def check_state_dict_shapes(shapes: Mapping[str, Sequence[int]], model: PoseBHModel, *,
                            ignore_prefixes: Sequence[str] = (),
                            allow_missing: Sequence[str] = ()) -> None:
  """Checks that a state_dict layout (key -> shape) maps completely onto `model`, shapes only.

  Use it on a checkpoint manifest before loading real weights; only `jax.eval_shape` runs.

  Raises:
    ValueError: naming every unknown, mis-shaped and missing key.
  """
  _plan(shapes, model, ignore_prefixes=ignore_prefixes, allow_missing=allow_missing)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], model: PoseBHModel, *,
    ignore_prefixes: Sequence[str] = (), allow_missing: Sequence[str] = (),
    base_variables: Mapping[str, Tree] | None = None,
) -> tuple[Tree, Tree, dict[str, np.ndarray]]:
  """Converts a reference state_dict (spec §3.1 key names) into `PoseBHModel` variables.

  Args:
    state_dict: PyTorch key -> numpy array (e.g. `load_pth(path)['state_dict']`); a leading
      'module.' is stripped.
    model: the model to load into; its variable shapes are derived with `jax.eval_shape`.
    ignore_prefixes: PyTorch key prefixes to skip (e.g. ('proto_head.',) for a model without
      the prototype head).
    allow_missing: flax path prefixes ('params'/'batch_stats' excluded, e.g. 'proto_head') that
      the checkpoint may lack, as when loading ViTPose++ weights into PoseBH (spec §3.1); those
      leaves are taken from `base_variables` if given, else left out of the result.
    base_variables: {'params': ..., 'batch_stats': ...} of an initialised model.

  Returns:
    (params, batch_stats, extras): nested dicts of float32 numpy arrays shaped like
    `model.init(...)`'s collections, and extras {'kpt_prototypes': [214, M, E],
    'cluster_prototypes': [C, M, E]} for the keys present.

  Raises:
    ValueError: listing every unknown, mis-shaped or missing key.
  """
  shapes = {k: np.shape(v) for k, v in state_dict.items()}
  targets, extra_names, expected = _plan(
      shapes, model, ignore_prefixes=ignore_prefixes, allow_missing=allow_missing)
  out: dict[str, Tree] = {"params": {}, "batch_stats": {}}
  stacked: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
  for key, target in targets.items():
    value = _to_flax(target, state_dict[key])
    if target.expert is None:
      _set(out[target.collection], target.path, value)
      continue
    slot = (target.collection, target.path)
    if slot not in stacked:
      stacked[slot] = np.zeros(_get(expected[target.collection], target.path).shape, np.float32)
    stacked[slot][target.expert] = value
  for (collection, path), value in stacked.items():
    _set(out[collection], path, value)

  if base_variables is not None:
    for collection in ("params", "batch_stats"):
      have = _flat_leaves(out[collection])
      for path, leaf in _flat_leaves(base_variables.get(collection, {})).items():
        if path not in have:
          _set(out[collection], path, np.asarray(leaf, np.float32))

  extras = {name: np.asarray(state_dict[key], np.float32) for key, name in extra_names.items()}
  return out["params"], out["batch_stats"], extras
