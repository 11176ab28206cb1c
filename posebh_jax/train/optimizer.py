"""AdamW as the reference trains (spec §3.4), with parameter groups that can be frozen (§3.2).

  * Layer-wise lr decay: `lr_scale = rate^(L − 1 − layer_id)`, `L = num_layers + 2`; layer 0 is
    the patch and position embedding, block i is layer i + 1, everything else (last norm, heads,
    prototype head) is layer L − 1.
  * No weight decay for 1-D parameters, names ending in `bias`, and the position embedding.
  * Gradients clipped to global L2 norm ≤ `clip_norm`, the norm taken over TRAINABLE groups only
    (PyTorch's `clip_grad_norm_` over params with `requires_grad`).
  * Linear warmup from `warmup_ratio · lr`, then step decay (×`decay_factor` at `decay_steps`,
    mmcv `StepLrUpdaterHook`) or cosine; the lr follows the GLOBAL step.
  * One Adam state (moments and step count) per freeze group (`GROUPS`): a frozen group gets no
    update, no weight decay, and its state is left untouched; the loop re-initialises a group's
    state when it is thawed (`reset_groups`), so its bias correction restarts. For the
    reference's schedules, where every thawed group was frozen from step 0, this is exactly
    PyTorch's lazily created per-parameter state (spec §3.2 JAX notes).

The frozen/trainable split is static (one compiled step per stage), so a frozen group's weight
gradients are never computed.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Freeze groups of the reference's hooks: BackboneFreezeHook, MultiheadFreezeHook (all heatmap
# heads) and the prototype head network.
GROUPS = ("backbone", "heads", "proto_head")

# Backbone parameters at layer 0 (spec §3.4 step 3).
_EMBEDDING_NAMES = ("pos_embed", "cls_token", "mask_token", "patch_embed")

Params = dict[str, Any]
OptState = dict[str, optax.ScaleByAdamState]


def param_group(top_key: str) -> str:
  """The freeze group of a top-level parameter collection (`backbone`, `heads_3`, ...)."""
  if top_key == "backbone":
    return "backbone"
  if top_key.startswith("heads_"):
    return "heads"
  if top_key == "proto_head":
    return "proto_head"
  raise ValueError(f"parameter collection {top_key!r} belongs to no freeze group {GROUPS}")


def split_groups(tree: Params) -> dict[str, Params]:
  """`{top_key: subtree}` → `{group: {top_key: subtree}}`."""
  out: dict[str, Params] = {}
  for k, v in tree.items():
    out.setdefault(param_group(k), {})[k] = v
  return out


def merge_groups(groups: dict[str, Params]) -> Params:
  return {k: v for g in groups.values() for k, v in g.items()}


def _keys(path) -> list[str]:
  return [str(getattr(k, "key", k)) for k in path]


def layer_id(path: Iterable[str], num_layers: int) -> int:
  """The reference's layer id of a parameter (spec §3.4 step 3), `path` = its tree keys."""
  keys = list(path)
  if keys[0] == "backbone" and len(keys) > 1:
    if keys[1] in _EMBEDDING_NAMES:
      return 0
    if keys[1].startswith("blocks_"):
      return int(keys[1].removeprefix("blocks_")) + 1
  return num_layers + 1


def lr_scales(params: Params, rate: float, num_layers: int) -> Params:
  """Per-leaf learning-rate multiplier `rate^(L − 1 − layer_id)` (Python floats)."""
  top = num_layers + 1
  return jax.tree_util.tree_map_with_path(
      lambda p, _: float(rate) ** (top - layer_id(_keys(p), num_layers)), params)


def weight_decay_mask(params: Params) -> Params:
  """True for parameters that get weight decay.

  The reference exempts every 1-D parameter (biases, LayerNorm/BatchNorm scales), every name
  ending in `bias`, and the position embedding (spec §3.4 step 2).
  """
  def decays(path, leaf) -> bool:
    name = "/".join(_keys(path))
    return leaf.ndim > 1 and not name.endswith("bias") and "pos_embed" not in name
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """lr at a global step: linear warmup from `warmup_ratio · lr` over `warmup_steps`, then decay.

  `train.lr_schedule`: "step" (×`decay_factor` from each of `decay_steps` on; the reference: ×0.1
  at epochs 50 and 90), "cosine" (to 0 at `num_steps`) or "constant".
  """
  warmup = max(int(train.warmup_steps), 1)
  lr, ratio = float(train.learning_rate), float(train.warmup_ratio)
  if train.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(train.num_steps - warmup, 1))
    start = optax.linear_schedule(lr * ratio, lr, warmup)
    return optax.join_schedules([start, decay], [warmup])
  if train.lr_schedule == "step":
    regular = optax.piecewise_constant_schedule(
        lr, {int(s): float(train.decay_factor) for s in train.decay_steps})
  elif train.lr_schedule == "constant":
    regular = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown train.lr_schedule {train.lr_schedule!r}; use 'step', 'cosine' or "
                     "'constant'")

  def schedule(step):
    # mmcv's linear warmup multiplies the regular lr by 1 − (1 − it/W)·(1 − ratio), written as
    # ratio + (1 − ratio)·it/W (no float32 cancellation at it = 0).
    t = jnp.minimum(jnp.asarray(step, jnp.float32), warmup)
    warm = ratio + (1.0 - ratio) * (t / warmup)
    return regular(step) * warm
  return schedule


class LayerDecayAdamW:
  """The reference's AdamW over freeze groups (see the module docstring).

  Static: built from the config and the parameter shapes, closed over by the jitted step. The
  state is `{group: optax.ScaleByAdamState}` (count, mu, nu per group).
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Params):
    train = config.train
    num_layers = (int(config.model.depth) if train.layer_decay_num_layers < 0
                  else int(train.layer_decay_num_layers))
    self.schedule = learning_rate_schedule(train)
    self.weight_decay = float(train.weight_decay)
    self.clip_norm = float(train.clip_norm)
    self._adam = optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=1e-8)
    self._scale = split_groups(lr_scales(params, train.layer_decay, num_layers))
    self._decays = split_groups(weight_decay_mask(params))
    self.groups = tuple(g for g in GROUPS if g in self._scale)

  def init(self, params: Params) -> OptState:
    return {g: self._adam.init(p) for g, p in split_groups(params).items()}

  def reset_groups(self, opt_state: OptState, groups: Iterable[str]) -> OptState:
    """Fresh Adam state (zero moments, count 0) for `groups`; the others unchanged."""
    groups = set(groups)
    return {g: jax.tree_util.tree_map(jnp.zeros_like, s) if g in groups else s
            for g, s in opt_state.items()}

  def group_learning_rates(self, step) -> dict[str, jax.Array]:
    """lr of each group's top layer at `step` (the heads' lr; the backbone's last block)."""
    lr = self.schedule(step)
    return {g: lr * max(jax.tree_util.tree_leaves(self._scale[g])) for g in self.groups}

  def update(self, grads: Params, opt_state: OptState, params: Params, *, step: jax.Array,
             trainable: tuple[str, ...]) -> tuple[Params, OptState, dict[str, jax.Array]]:
    """One AdamW step of the trainable groups.

    Args:
      grads: gradients of the trainable groups' collections only (`{top_key: subtree}`).
      opt_state: the state of every group.
      params: all parameters.
      step: global step (drives the lr schedule).
      trainable: the groups to update (static).

    Returns:
      (new params, new optimizer state, {"grad_norm": pre-clip norm, "clip_scale",
      "learning_rate": the step's base learning rate, before layer decay}).
    """
    g_groups = split_groups(grads) if grads else {}
    if set(g_groups) != set(trainable):
      raise ValueError(f"gradients for groups {sorted(g_groups)}, trainable {sorted(trainable)}")
    norm = optax.tree.norm(grads) if grads else jnp.zeros((), jnp.float32)
    # torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1.
    clip = jnp.minimum(1.0, self.clip_norm / (norm + 1e-6))
    lr = self.schedule(step)
    p_groups = split_groups(params)
    new_state = dict(opt_state)
    for g in trainable:
      clipped = jax.tree_util.tree_map(lambda x: x * clip, g_groups[g])
      u, new_state[g] = self._adam.update(clipped, opt_state[g], p_groups[g])

      def apply(p, u, scale, decays):
        # PyTorch AdamW: p ← p − lr_g·wd·p (decay set only), then p ← p − lr_g·adam(g).
        delta = u + self.weight_decay * p if decays else u
        return (p - (lr * scale) * delta).astype(p.dtype)
      p_groups[g] = jax.tree_util.tree_map(apply, p_groups[g], u, self._scale[g],
                                           self._decays[g])
    return merge_groups(p_groups), new_state, {"grad_norm": norm, "clip_scale": clip,
                                               "learning_rate": lr}


def make_optimizer(config: ml_collections.ConfigDict, params: Params) -> LayerDecayAdamW:
  """The run's optimizer (`params` may be abstract: only shapes and names are read)."""
  return LayerDecayAdamW(config, params)
