"""Keypoint prototypes: non-gradient state in one embedding space shared by all skeletons.

The prototype table `P [J, M, E]` (J keypoints over all datasets, M in-class prototypes, E the
embedding width) lives in the train state as a plain array, outside the optimizer. The model's
prototype head embeds every heatmap pixel; |cos| similarity with the prototypes gives a
"prototype heatmap" per keypoint (spec §2.4), and the prototypes follow the embeddings of their
keypoint's pixels by an exponential moving average under `stop_gradient`.

Everything here works on fixed shapes: the pixels of a class are a mask over all B·H·W pixels
and class sums are `segment_sum`s with a static number of segments, so the update runs inside the
jitted, sharded train step with no host round trip. Because the sums run over the *global* batch
under `jit`, the update does not depend on how many devices the batch is split over.

The learning rule (Sinkhorn assignment, EMA update, prototype CE) is in
`posebh_jax.objective.prototype_learning`; this module holds the shared basics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||₂, eps) along `axis` (PyTorch's F.normalize semantics)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def init_prototypes(rng: jax.Array, num_keypoints: int, num_in_class: int, dim: int) -> jax.Array:
  """Truncated normal (std 0.02, ±2σ), then L2-normalised along E (spec §2.4). → [J, M, E]."""
  p = 0.02 * jax.random.truncated_normal(rng, -2.0, 2.0, (num_keypoints, num_in_class, dim),
                                         jnp.float32)
  return l2_normalize(p)


def similarity(embedding: jax.Array, prototypes: jax.Array) -> jax.Array:
  """|cos| between every pixel embedding and every prototype.

  Args:
    embedding: [B, H, W, E] raw embeddings (normalised here).
    prototypes: [J, M, E].

  Returns:
    [B, H, W, J, M] float32 in [0, 1].
  """
  f = l2_normalize(embedding.astype(jnp.float32))
  p = l2_normalize(prototypes.astype(jnp.float32))
  return jnp.abs(jnp.einsum("bhwe,jme->bhwjm", f, p))


def prototype_heatmap(embedding: jax.Array, prototypes: jax.Array) -> jax.Array:
  """Prototype heatmaps `clip(max_m |cos|, 1e-4, 1 - 1e-4)` (spec §2.4). → [B, J, H, W].

  Gradients reach the embedding; the prototypes are treated as constants.
  """
  sim = similarity(embedding, jax.lax.stop_gradient(prototypes))
  phm = jnp.clip(jnp.max(sim, axis=-1), 1e-4, 1.0 - 1e-4)
  return jnp.transpose(phm, (0, 3, 1, 2))


def gather_dataset_channels(per_keypoint: jax.Array, dataset_index: jax.Array,
                            global_index: jax.Array) -> jax.Array:
  """Picks each sample's own skeleton channels out of a global [B, J, ...] array.

  Args:
    per_keypoint: [B, J, ...] (e.g. the prototype heatmap over all J keypoints).
    dataset_index: [B] int.
    global_index: [D, K_max] int, global id of (dataset, channel) (`SkeletonLayout.global_index`).

  Returns:
    [B, K_max, ...]; channels beyond a sample's K_d hold keypoint 0 and must be masked by the
    caller (their target weight is zero).
  """
  ids = global_index[dataset_index]  # [B, K_max]
  ids = ids.reshape(ids.shape + (1,) * (per_keypoint.ndim - 2))
  return jnp.take_along_axis(per_keypoint, ids, axis=1)
