"""The train state: one pytree that holds everything a step reads and writes.

Layout (every field is a jax.Array or a pytree of them, so orbax saves it as is):

  step          []          int32  number of optimizer steps taken
  params        pytree      f32    trainable weights (Flax 'params' collection)
  batch_stats   pytree      f32    BatchNorm running statistics (Flax 'batch_stats')
  opt_state     pytree             optax state of `params`
  prototypes    [J, M, E]   f32    keypoint prototypes: non-gradient state, updated by EMA in
                                   the step, never seen by the optimizer
  cluster_prototypes [C, M, E] f32 cluster prototypes for CPS (spec §2.6.4): a random
                                   placeholder (as the reference's) until the CPS stage starts,
                                   then the clustered keypoint prototypes, frozen
  cluster_keypoint [C]      int32  global keypoint id nearest to each cluster (-1 before CPS)
  rng           key                base key; the step's key is fold_in(rng, step)

Static things (the model definition, the optimizer's update rule, the skeleton layout) are not
in the state: they are rebuilt from the config and closed over by the jitted step.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from posebh_jax.objective import prototypes as proto_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  prototypes: jax.Array
  cluster_prototypes: jax.Array
  cluster_keypoint: jax.Array
  rng: jax.Array


def make_init_fn(
    model: nn.Module,
    tx_factory: Callable[[Any], optax.GradientTransformation],
    *,
    image_size_hw: tuple[int, int],
    num_prototype_keypoints: int,
    num_in_class: int,
    out_channels: int,
    num_clusters: int,
) -> Callable[[jax.Array], TrainState]:
  """Returns `init(rng) -> TrainState`, meant for `jax.jit(init, out_shardings=...)`.

  Shapes come from `jax.eval_shape(init, rng)`, shardings are derived from them, and then the
  state is created directly in its sharded layout, never materialised on one device first.
  `num_in_class`, `out_channels` (the prototype embedding E) and `num_clusters` are
  `config.model.proto`'s fields of those names.
  """
  def init(rng: jax.Array) -> TrainState:
    params_rng, drop_rng, proto_rng, cluster_rng, state_rng = jax.random.split(rng, 5)
    images = jnp.zeros((1,) + tuple(image_size_hw) + (3,), jnp.float32)
    variables = model.init({"params": params_rng, "droppath": drop_rng}, images,
                           jnp.zeros((1,), jnp.int32), train=False)
    params = variables["params"]
    tx = tx_factory(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        prototypes=proto_lib.init_prototypes(proto_rng, num_prototype_keypoints, num_in_class,
                                             out_channels),
        cluster_prototypes=proto_lib.init_prototypes(cluster_rng, num_clusters, num_in_class,
                                                     out_channels),
        cluster_keypoint=jnp.full((num_clusters,), -1, jnp.int32),
        rng=state_rng,
    )
  return init
