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

This module holds the foundation rule (hard in-class assignment by nearest prototype, class mean
of confident pixels); the full ProtoSeg rule with Sinkhorn assignment is a separate function.
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


def ema_update(
    prototypes: jax.Array,
    embedding: jax.Array,
    target: jax.Array,
    target_weight: jax.Array,
    dataset_index: jax.Array,
    global_index: jax.Array,
    *,
    gamma: float,
    threshold: float,
) -> jax.Array:
  """One EMA step of the prototypes towards the class means of confident pixel embeddings.

  A pixel belongs to keypoint class g (global id) if g's target is the largest of its sample's
  channels there and exceeds `threshold`; it is assigned to the nearest of g's M in-class
  prototypes. Each (g, m) with at least one pixel moves as
  `P ← normalize(γ·P + (1−γ)·normalize(Σ f))`; the others stay as they are.

  Args:
    prototypes: [J, M, E].
    embedding: [B, H, W, E] pixel embeddings (gradient is stopped here).
    target: [B, K_max, H, W] Gaussian targets of each sample's own skeleton.
    target_weight: [B, K_max]; keypoints with zero weight do not contribute.
    dataset_index: [B] int.
    global_index: [D, K_max] int.
    gamma: EMA momentum (0.999 in the reference).
    threshold: minimum target value of a pixel to count for its class.

  Returns:
    Updated prototypes [J, M, E], L2-normalised.
  """
  num_kpts, num_in_class, dim = prototypes.shape
  f = l2_normalize(jax.lax.stop_gradient(embedding).astype(jnp.float32))  # [B, H, W, E]
  t = target * (target_weight[:, :, None, None] > 0)  # Unlabelled keypoints never claim a pixel.
  conf = jnp.max(t, axis=1)  # [B, H, W]
  local = jnp.argmax(t, axis=1)  # [B, H, W]
  valid = conf > threshold
  g = jnp.take_along_axis(global_index[dataset_index][:, :, None, None],
                          local[:, None], axis=1)[:, 0]  # [B, H, W] global class
  p = l2_normalize(prototypes)
  sim = jnp.abs(jnp.einsum("bhwe,bhwme->bhwm", f, p[g]))  # Only the pixel's own class.
  m = jnp.argmax(sim, axis=-1)
  seg = jnp.where(valid, g * num_in_class + m, num_kpts * num_in_class)  # Extra "drop" segment.
  n_seg = num_kpts * num_in_class + 1
  sums = jax.ops.segment_sum(f.reshape(-1, dim), seg.reshape(-1), num_segments=n_seg)
  counts = jax.ops.segment_sum(valid.reshape(-1).astype(jnp.float32), seg.reshape(-1),
                               num_segments=n_seg)
  sums = sums[:-1].reshape(num_kpts, num_in_class, dim)
  counts = counts[:-1].reshape(num_kpts, num_in_class, 1)
  mean = l2_normalize(sums)
  updated = l2_normalize(gamma * p + (1.0 - gamma) * mean)
  return jnp.where(counts > 0, updated, prototypes)  # Untouched prototypes stay bit-identical.
