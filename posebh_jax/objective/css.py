"""Cross-type self-supervision (CSS) pseudo targets and heatmap losses (spec §2.6.5, §8.3).

For one target skeleton d (the caller loops over the datasets in Python), head d's prediction
`H` and the prototype heatmap `G` of d's keypoints are compared on the images of the *other*
datasets. Where both are confident and their peaks agree, the two decoded keypoints are fused
into a pseudo keypoint, rendered as a UDP Gaussian, and used as a soft target for both `H` and
`G` (and, through `css_pixel_classes`, for prototype learning).

The reference selects pairs with boolean indexing and decodes them in numpy. Here everything
runs on the full batch with static shapes: every (sample, keypoint) pair is decoded, and the
keep mask decides which ones produce a target, a weight and a loss term. Decoding is per
channel, so decoding discarded pairs as well changes nothing for the kept ones.

Shapes: `B` batch, `K` = K_d keypoints of skeleton d, `h, w` heatmap height and width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from data_pipelines.heatmap_codec import argmax_first, dark_udp_coords_jax, udp_heatmaps_jax
from posebh_jax.objective.compat import ReferenceCompat


class CSSTargets(NamedTuple):
  """Pseudo targets of one skeleton d; constants (built under `stop_gradient`).

  Attributes:
    target: `[B, K, h, w]` float32 UDP Gaussians at the pseudo keypoints of kept pairs, zero
      elsewhere.
    weight: `[B, K]` float32 `min(c_h, c_g)` for kept pairs, zero elsewhere.
    instances: `[B]` bool, samples with at least one kept pair (the subset I of the spec).
  """
  target: jax.Array
  weight: jax.Array
  instances: jax.Array


def _separable_peaks(heatmaps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Integer peak `(x, y)` `[B, K]` each, as the reference's CSS filter computes it.

  `x = argmax_x max_y`, `y = argmax_y max_x` (first maximum on ties, like torch.argmax). For a
  unique global maximum this is the flat argmax; it differs only on ties across rows/columns.
  """
  x = jnp.argmax(jnp.max(heatmaps, axis=2), axis=-1)
  y = jnp.argmax(jnp.max(heatmaps, axis=3), axis=-1)
  return x, y


def peak_match(heatmaps: jax.Array, proto_heatmaps: jax.Array, *, conf_thr: float = 0.25,
               match_dist: float = 2.1, compat_distance: bool = False) -> jax.Array:
  """Pairs (sample, keypoint) where head and prototype heatmaps agree (spec §2.6.5 steps 2–3).

  Both maxima must exceed `conf_thr`, and the integer peaks must lie within `match_dist`
  heatmap pixels. Does not know which samples are foreign: `css_targets` ANDs in the
  `foreign` mask (the reference only ever looks at samples of other datasets).

  Args:
    heatmaps: `[B, K, h, w]` head d's prediction H.
    proto_heatmaps: `[B, K, h, w]` prototype heatmap G of d's keypoints.
    conf_thr: confidence threshold on each heatmap's maximum.
    match_dist: largest accepted peak distance (heatmap pixels).
    compat_distance: reference's distance `sqrt((hx−gx)² + (gx−gy)²)` (spec §6.2) instead of
      the intended `sqrt((hx−gx)² + (hy−gy)²)`.

  Returns:
    keep: `[B, K]` bool.
  """
  confident = ((jnp.max(heatmaps, axis=(2, 3)) > conf_thr) &
               (jnp.max(proto_heatmaps, axis=(2, 3)) > conf_thr))
  hx, hy = _separable_peaks(heatmaps)
  gx, gy = _separable_peaks(proto_heatmaps)
  second = (gx - gy) if compat_distance else (hy - gy)
  # Integer squares, then a float32 sqrt, like the reference's torch ops (2.1 sits between the
  # attainable sqrt(4) and sqrt(5), so only the integer lattice matters).
  dist = jnp.sqrt(((hx - gx)**2 + second**2).astype(jnp.float32))
  return confident & (dist <= match_dist)


def css_targets(heatmaps: jax.Array, proto_heatmaps: jax.Array, foreign: jax.Array, *,
                conf_thr: float = 0.25, match_dist: float = 2.1, sigma: float = 2.0,
                kernel: int = 11,
                compat: ReferenceCompat = ReferenceCompat()) -> CSSTargets:
  """CSS pseudo targets for one skeleton d (spec §2.6.5 steps 2–7), static shapes.

  1. `keep = peak_match(H, G) & foreign`.
  2. Decode H and G (argmax + DARK-UDP, `kernel`) → `p_h, c_h, p_g, c_g` in heatmap pixels.
  3. Pseudo keypoint `y = (c_h/s)·p_h + (c_g/s)·p_g`, `s = max(c_h + c_g, 1e-4)`; with
     `compat.css_pseudo_keypoint` (spec §6.1) the reference's `(c_h/s)·p_h + (c_g/s)·c_g`.
  4. UDP Gaussian (sigma) at the pseudo keypoint for kept pairs; weight `min(c_h, c_g)` for kept
     pairs (also when the Gaussian falls off the heatmap and the target stays zero, as in the
     reference), 0 otherwise.

  Args:
    heatmaps: `[B, K, h, w]` head d's prediction H on the whole batch.
    proto_heatmaps: `[B, K, h, w]` prototype heatmaps G of d's keypoints.
    foreign: `[B]` bool, `dataset_index != d`.
    conf_thr: confidence threshold (`css_conf_thr`).
    match_dist: peak-distance threshold in heatmap pixels (`css_match_dist`).
    sigma: pseudo-target Gaussian std.
    kernel: DARK-UDP blur kernel.
    compat: uses `css_peak_distance` (§6.2) and `css_pseudo_keypoint` (§6.1).

  Returns:
    `CSSTargets`, all under `stop_gradient`.
  """
  heatmaps = jax.lax.stop_gradient(heatmaps.astype(jnp.float32))
  proto_heatmaps = jax.lax.stop_gradient(proto_heatmaps.astype(jnp.float32))
  _, _, h, w = heatmaps.shape
  keep = peak_match(heatmaps, proto_heatmaps, conf_thr=conf_thr, match_dist=match_dist,
                    compat_distance=compat.css_peak_distance) & jnp.asarray(foreign, bool)[:, None]

  p_h, c_h = dark_udp_coords_jax(heatmaps, kernel)
  p_g, c_g = dark_udp_coords_jax(proto_heatmaps, kernel)
  s = jnp.maximum(c_h + c_g, 1e-4)
  r_h, r_g = c_h / s, c_g / s
  if compat.css_pseudo_keypoint:
    pseudo = r_h[..., None] * p_h + (r_g * c_g)[..., None]
  else:
    pseudo = r_h[..., None] * p_h + r_g[..., None] * p_g
  # The reference's validity (c_h > thr)·(c_g > thr) is implied by keep (step 2 of the spec).
  target, _ = udp_heatmaps_jax(pseudo, keep, (h, w), sigma)
  weight = jnp.where(keep, jnp.minimum(c_h, c_g), 0.0)
  return CSSTargets(target=jax.lax.stop_gradient(target),
                    weight=jax.lax.stop_gradient(weight),
                    instances=jnp.any(keep, axis=1))


def css_heatmap_loss(pred: jax.Array, targets: CSSTargets) -> jax.Array:
  """JointsMSE over the CSS subset I: `Σ_I Σ_k (w·pred − w·T)² / (K · n_I · h · w)`.

  The reference's `MSE_J(pred[I], T_css, W_css)` (spec §2.6.1, §2.6.5 step 8) with a mask
  instead of boolean indexing; 0 when no sample is kept. The train step uses it with
  `pred = H` (hm) and `pred = G` (ph, scaled by the phm weight).

  Args:
    pred: `[B, K, h, w]` heatmaps (gradients flow through this argument only).
    targets: `CSSTargets` of the same skeleton.

  Returns:
    Scalar float32 loss.
  """
  _, k, h, w = pred.shape
  wt = targets.weight.astype(jnp.float32)[:, :, None, None]
  per_sample = jnp.sum(jnp.square(wt * pred.astype(jnp.float32) - wt * targets.target),
                       axis=(1, 2, 3))
  # `where`, not a product, so a non-finite prediction outside I cannot poison the sum.
  total = jnp.sum(jnp.where(targets.instances, per_sample, 0.0))
  n_i = jnp.sum(targets.instances.astype(jnp.float32))
  return total / (jnp.maximum(n_i, 1.0) * (k * h * w))


def css_pixel_classes(targets: CSSTargets, threshold: float = 0.0
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pixel prototype-learning labels from the CSS targets (the reference's `hm_sample`).

  Over `T·W` (target times weight): class = argmax over K (local keypoint index), confidence =
  the maximum; a pixel is sampled where the maximum exceeds `threshold` (the reference's
  `cluster_conf_thr` = 0.0) and its sample is in I.

  Args:
    targets: `CSSTargets` of skeleton d.
    threshold: sampling threshold on the weighted target.

  Returns:
    local_class: `[B, h, w]` int32.
    conf: `[B, h, w]` float32.
    valid: `[B, h, w]` bool.
  """
  weighted = targets.target * targets.weight[:, :, None, None]
  local_class, conf = argmax_first(weighted, 1)
  valid = (conf > threshold) & targets.instances[:, None, None]
  return local_class, conf, valid
