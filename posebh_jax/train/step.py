"""The train step: a pure function of (state, batch) → (state, metrics).

Randomness comes from `fold_in(state.rng, state.step)`, so the step is a pure function of its
inputs and a resumed run replays the same random numbers. `make_train_step` returns the jitted,
sharded version: batch split over the mesh's devices, state sharded by
`sharding.state_shardings` and donated.

The loss terms live in `posebh_jax.objective.objective`; this module only differentiates, applies the
optimizer and writes the new non-gradient state (prototypes) back.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from data_pipelines import device_targets, pipeline
from posebh_jax.objective.objective import ObjectiveConfig, PrototypeState, posebh_objective
from posebh_jax.train import sharding
from posebh_jax.train.optimizer import LayerDecayAdamW, split_groups
from posebh_jax.train.state import TrainState

Batch = dict[str, jax.Array]

def device_inputs(batch: Batch, targets: device_targets.TargetSpec | None) -> Batch:
  """The compact batch (uint8 `image`, crop-space `joints`, `joint_vis`; see
  `data_pipelines.pipeline`) → the step's inputs: normalised image, `target`, `target_weight`,
  made on the device (element-wise over the batch: sharded with it, no communication). A batch
  that already holds float images and targets passes through."""
  batch = dict(batch)
  if batch["image"].dtype == jnp.uint8:
    batch["image"] = pipeline.normalize_on_device(batch["image"])
  if "target" not in batch:
    if targets is None:
      raise ValueError("a batch of joints needs the step's target spec (make_train_step(..., "
                       "targets=TargetSpec.from_topdown(td_cfg)))")
    batch["target"], batch["target_weight"] = device_targets.dataset_targets(
        batch.pop("joints"), batch.pop("joint_vis"), batch["dataset_index"], targets)
  return batch


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: LayerDecayAdamW, cfg: ObjectiveConfig,
               trainable: tuple[str, ...],
               targets: device_targets.TargetSpec | None = None) -> tuple[TrainState, dict]:
  """One optimizer step plus (in the first stage) one EMA step of the keypoint prototypes.

  Args:
    state: the train state.
    batch: `image [B,H,W,3]`, `target [B,K_max,Hh,Wh]`, `target_weight [B,K_max]`,
      `dataset_index [B]`, `skeleton_mask [B,K_max]`; or the compact batch (uint8 `image`,
      `joints [B,K_max,2]`, `joint_vis [B,K_max]` instead of the targets; `device_inputs`).
    model: the Flax module (static).
    tx: the optimizer (static).
    cfg: static loss/prototype/stage settings.
    trainable: parameter groups that train in this stage (static); the others get no gradient
      (their weight gradients are not even computed), no update and no weight decay.
    targets: how to draw the heatmap targets of a compact batch (static).

  Returns:
    (new state, scalar metrics).
  """
  batch = device_inputs(batch, targets)
  rng = jax.random.fold_in(state.rng, state.step)
  drop_rng, proto_rng = jax.random.split(rng)
  weight = batch["target_weight"] * batch["skeleton_mask"]
  protos = PrototypeState(state.prototypes, state.cluster_prototypes, state.cluster_keypoint)

  groups = split_groups(state.params)
  train_params = {k: v for g in trainable for k, v in groups[g].items()}
  frozen_params = {k: v for k, v in state.params.items() if k not in train_params}
  # Frozen groups run in eval mode (spec §6.14), unless the reference's train mode is asked for.
  frozen = () if cfg.compat.frozen_train_mode else tuple(g for g in groups if g not in trainable)

  def loss_fn(train_params):
    params = {**frozen_params, **train_params}
    outputs, mutated = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        batch["dataset_index"], train=True, frozen=frozen, mutable=["batch_stats"],
        rngs={"droppath": drop_rng})
    total, metrics, prototypes = posebh_objective(outputs, batch, weight, protos, proto_rng, cfg)
    return total, (metrics, mutated["batch_stats"], prototypes)

  (_, (metrics, batch_stats, prototypes)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(train_params)
  params, opt_state, stats = tx.update(grads, state.opt_state, state.params, step=state.step,
                                       trainable=trainable)
  metrics["grad_norm"] = stats["grad_norm"]  # Trainable groups only, before clipping.
  metrics["param_norm"] = optax.tree.norm(params)
  # The base learning rate of this step (before layer decay), for the log: read with the other
  # metrics instead of being rebuilt on the host.
  metrics["learning_rate"] = stats["learning_rate"]
  for g, lr in tx.group_learning_rates(state.step).items():
    metrics[f"lr/{g}"] = lr if g in trainable else jnp.zeros_like(lr)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, prototypes=prototypes)
  # Checked by the host one step late (no wait on the device): the loop stops on a False and
  # never checkpoints a state whose flag it has not seen True. The flag covers the state AFTER
  # the update (a finite loss and gradient can still give infinite weights, e.g. a huge lr).
  finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(stats["grad_norm"])
  for part in STATE_PARTS:
    metrics[f"finite/{part}"] = all_finite(getattr(new_state, part))
    finite = finite & metrics[f"finite/{part}"]
  metrics["finite"] = finite
  return new_state, metrics


# The float parts of the train state whose finiteness the step reports (`finite/<part>`).
STATE_PARTS = ("params", "opt_state", "batch_stats", "prototypes", "cluster_prototypes")


def all_finite(tree: Any) -> jax.Array:
  """[] bool: no NaN or Inf in any floating-point leaf of `tree` (one fused pass over it)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def make_train_step(model: nn.Module, tx: LayerDecayAdamW, cfg: ObjectiveConfig,
                    mesh: Mesh, state_sharding: Any, trainable: tuple[str, ...] | None = None,
                    targets: device_targets.TargetSpec | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """jit-compiles `train_step` over the mesh: batch split over every device
  (`pipeline.batch_sharding`, the sharding the pipeline places it with), state in
  `state_sharding` and donated (without donation the step's peak memory holds two copies of
  params and moments). `trainable=None`: every group trains; `targets`: the target spec of
  compact batches."""
  trainable = tx.groups if trainable is None else tuple(trainable)

  def step(state, batch):
    return train_step(state, batch, model=model, tx=tx, cfg=cfg, trainable=trainable,
                      targets=targets)

  return jax.jit(step, in_shardings=(state_sharding, pipeline.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
