"""Heatmap losses with the reference's exact normalisation (spec §2.6).

All losses are float32 and take padded, static-shape inputs; "which samples count" is a mask,
never a boolean index.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def joints_mse(pred: jax.Array, gt: jax.Array, weight: jax.Array) -> jax.Array:
  """mmpose JointsMSELoss with target weights: Σ w²(pred − gt)² / (K·N·H·W) (spec §2.6.1).

  Args:
    pred, gt: [N, K, H, W].
    weight: [N, K].
  """
  pred = pred.astype(jnp.float32)
  w = weight.astype(jnp.float32)[:, :, None, None]
  return jnp.mean(jnp.square(w * pred - w * gt))


def multi_head_heatmap_loss(
    heatmaps: Sequence[jax.Array],
    target: jax.Array,
    target_weight: jax.Array,
    dataset_index: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Σ_d MSE_J(head_d, target of d's samples, weight of d's samples) (spec §2.6.2).

  Every head runs on the whole batch; samples of other datasets get zero target and weight, and
  each head's mean runs over the whole batch (spec §6.13).

  Args:
    heatmaps: per dataset d, head d's output [B, K_d, H, W].
    target: [B, K_max, H, W] padded targets.
    target_weight: [B, K_max].
    dataset_index: [B] int.

  Returns:
    (total loss, per-head losses [D]).
  """
  per_head = []
  for d, hm in enumerate(heatmaps):
    k = hm.shape[1]
    is_d = (dataset_index == d).astype(jnp.float32)
    t = target[:, :k] * is_d[:, None, None, None]
    w = target_weight[:, :k] * is_d[:, None]
    per_head.append(joints_mse(hm, t, w))
  per_head = jnp.stack(per_head)
  return jnp.sum(per_head), per_head


def per_dataset_joints_mse_terms(
    pred: jax.Array,
    target: jax.Array,
    target_weight: jax.Array,
    dataset_index: jax.Array,
    num_keypoints: Sequence[int],
) -> jax.Array:
  """MSE_J of each dataset d over its own samples only, with d's own K_d (spec §2.6.3 step 4).

  Args:
    pred: [B, K_max, H, W], each sample's own skeleton channels (padded).
    target: [B, K_max, H, W].
    target_weight: [B, K_max] (zero beyond K_d).
    dataset_index: [B] int.
    num_keypoints: K_d per dataset.

  Returns:
    [D] per-dataset mean losses; 0 for a dataset with no sample in the batch.
  """
  _, _, h, w = pred.shape
  wt = target_weight.astype(jnp.float32)[:, :, None, None]
  per_sample = jnp.sum(jnp.square(wt * pred.astype(jnp.float32) - wt * target), axis=(1, 2, 3))
  terms = []
  for d, k in enumerate(num_keypoints):
    is_d = (dataset_index == d).astype(jnp.float32)
    n_d = jnp.sum(is_d)
    terms.append(jnp.sum(per_sample * is_d) / (jnp.maximum(n_d, 1.0) * k * h * w))
  return jnp.stack(terms)
