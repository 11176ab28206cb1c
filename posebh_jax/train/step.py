"""The train step: a pure function of (state, batch) → (state, metrics).

Randomness comes from `fold_in(state.rng, state.step)`, so the step is a pure function of its
inputs and a resumed run replays the same random numbers. `make_train_step` returns the jitted,
sharded version: batch split over the mesh's `data` axis, state replicated and donated.

The loss terms live in `posebh_jax.train.objective`; this module only differentiates, applies the
optimizer and writes the new non-gradient state (prototypes) back.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from data_pipelines import pipeline
from posebh_jax.train import sharding
from posebh_jax.train.objective import ObjectiveConfig, PrototypeState, posebh_objective
from posebh_jax.train.state import TrainState

Batch = dict[str, jax.Array]

# The step's static settings are the objective's (kept under the old name for callers).
StepConfig = ObjectiveConfig


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, cfg: ObjectiveConfig) -> tuple[TrainState, dict]:
  """One optimizer step plus (in the first stage) one EMA step of the keypoint prototypes.

  Args:
    state: the train state.
    batch: `image [B,H,W,3]`, `target [B,K_max,Hh,Wh]`, `target_weight [B,K_max]`,
      `dataset_index [B]`, `skeleton_mask [B,K_max]`.
    model: the Flax module (static).
    tx: the optimizer (static).
    cfg: static loss/prototype/stage settings.

  Returns:
    (new state, scalar metrics).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  drop_rng, proto_rng = jax.random.split(rng)
  weight = batch["target_weight"] * batch["skeleton_mask"]
  protos = PrototypeState(state.prototypes, state.cluster_prototypes, state.cluster_keypoint)

  def loss_fn(params):
    outputs, mutated = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        batch["dataset_index"], train=True, mutable=["batch_stats"], rngs={"droppath": drop_rng})
    total, metrics, prototypes = posebh_objective(outputs, batch, weight, protos, proto_rng, cfg)
    return total, (metrics, mutated["batch_stats"], prototypes)

  (_, (metrics, batch_stats, prototypes)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["param_norm"] = optax.tree.norm(params)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, prototypes=prototypes)
  return new_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, cfg: ObjectiveConfig,
                    mesh: Mesh, state_sharding: Any) -> Callable[[TrainState, Batch],
                                                                tuple[TrainState, dict]]:
  """jit-compiles `train_step` over the mesh: batch sharded on 'data', state replicated and
  donated (without donation the step's peak memory holds two copies of params and moments)."""
  step = lambda state, batch: train_step(state, batch, model=model, tx=tx, cfg=cfg)
  return jax.jit(step, in_shardings=(state_sharding, pipeline.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
