"""The train step: a pure function of (state, batch) → (state, metrics).

Randomness comes from `fold_in(state.rng, state.step)`, so the step is a pure function of its
inputs and a resumed run replays the same random numbers. `make_train_step` returns the jitted,
sharded version: batch split over the mesh's `data` axis, state replicated and donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from data_pipelines import pipeline
from posebh_jax import losses
from posebh_jax import prototypes as proto_lib
from posebh_jax.train import sharding
from posebh_jax.train.state import TrainState

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the step (hashable, closed over by jit)."""

  num_keypoints: tuple[int, ...]  # K_d per dataset.
  global_index: tuple[tuple[int, ...], ...]  # [D][K_max] global keypoint ids.
  heatmap_weight: float = 1.0
  phm_weight: float = 1.0
  proto_gamma: float = 0.999
  proto_threshold: float = 0.5
  use_proto_head: bool = True


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, cfg: StepConfig) -> tuple[TrainState, dict]:
  """One optimizer step plus one EMA step of the prototypes.

  Args:
    state: the train state.
    batch: `image [B,H,W,3]`, `target [B,K_max,Hh,Wh]`, `target_weight [B,K_max]`,
      `dataset_index [B]`, `skeleton_mask [B,K_max]`.
    model: the Flax module (static).
    tx: the optimizer (static).
    cfg: static loss/prototype settings.

  Returns:
    (new state, scalar metrics).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  global_index = jnp.asarray(np.asarray(cfg.global_index, np.int32))
  target = batch["target"]
  weight = batch["target_weight"] * batch["skeleton_mask"]
  dataset_index = batch["dataset_index"]

  def loss_fn(params):
    outputs, mutated = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], dataset_index,
        train=True, mutable=["batch_stats"], rngs={"droppath": rng})
    hm_loss, per_head = losses.multi_head_heatmap_loss(
        outputs.heatmaps, target, weight, dataset_index)
    total = cfg.heatmap_weight * hm_loss
    aux = {"loss/heatmap": hm_loss}
    for d in range(len(cfg.num_keypoints)):
      aux[f"loss/heatmap_{d}"] = per_head[d]
    if cfg.use_proto_head:
      phm = proto_lib.prototype_heatmap(outputs.embedding, state.prototypes)  # [B, J, H, W]
      phm_own = proto_lib.gather_dataset_channels(phm, dataset_index, global_index)
      phm_loss = losses.per_dataset_joints_mse(phm_own, target, weight, dataset_index,
                                               cfg.num_keypoints)
      total += cfg.phm_weight * phm_loss
      aux["loss/phm"] = phm_loss
    aux["loss/total"] = total
    return total, (aux, mutated["batch_stats"], outputs.embedding)

  (_, (metrics, batch_stats, embedding)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  prototypes = state.prototypes
  if cfg.use_proto_head:
    prototypes = proto_lib.ema_update(
        state.prototypes, embedding, target, weight, dataset_index, global_index,
        gamma=cfg.proto_gamma, threshold=cfg.proto_threshold)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["param_norm"] = optax.tree.norm(params)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, prototypes=prototypes)
  return new_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, cfg: StepConfig,
                    mesh: Mesh, state_sharding: Any) -> Callable[[TrainState, Batch],
                                                                tuple[TrainState, dict]]:
  """jit-compiles `train_step` over the mesh: batch sharded on 'data', state replicated and
  donated (without donation the step's peak memory holds two copies of params and moments)."""
  step = lambda state, batch: train_step(state, batch, model=model, tx=tx, cfg=cfg)
  return jax.jit(step, in_shardings=(state_sharding, pipeline.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
