"""AdamW with warmup, a decay schedule, global-norm clipping and the reference's no-decay set."""

from __future__ import annotations

import jax
import ml_collections
import optax


def no_weight_decay_mask(params) -> object:
  """True for parameters that get weight decay.

  The reference exempts every 1-D parameter (biases, LayerNorm/BatchNorm scales), every name
  ending in `bias`, and the position embedding (spec §3.4 step 2).
  """
  def decays(path, leaf) -> bool:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return leaf.ndim > 1 and not name.endswith("bias") and "pos_embed" not in name
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0.1 % of the peak (the reference's warmup_ratio), then the decay."""
  warmup = max(int(train.warmup_steps), 1)
  if train.schedule == "cosine":
    decay = optax.cosine_decay_schedule(train.learning_rate, max(train.num_steps - warmup, 1))
  elif train.schedule == "constant":
    decay = optax.constant_schedule(train.learning_rate)
  else:
    raise ValueError(f"unknown train.schedule {train.schedule!r}; use 'cosine' or 'constant'")
  start = optax.linear_schedule(train.learning_rate * 1e-3, train.learning_rate, warmup)
  return optax.join_schedules([start, decay], [warmup])


def make_optimizer(train: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """Clip the global gradient norm, then AdamW (decoupled decay on the decay set only)."""
  return optax.chain(
      optax.clip_by_global_norm(train.clip_norm),
      optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=1e-8,
                  weight_decay=train.weight_decay, mask=no_weight_decay_mask(params)),
  )
