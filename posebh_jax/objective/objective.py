"""The PoseBH training objective (spec §2.6): every loss term of one step, and the prototype EMA.

    L = Σ_d L_hm^d                                   multi-head heatmaps       (§2.6.2)
      + w_p · Σ_d (0.01·PPC_d + 0.001·PPD_d)         prototype CE              (§2.6.3)
      + w_phm · Σ_d MSE_J(PHM_d, T_d, W_d)            prototype heatmaps        (§2.6.3)
      [+ w_cps · (L_pc + w_phm · L_ch)]              cluster prototypes        (§2.6.4)
      [+ w_css · Σ_d (hm_d + w_phm · ph_d + pp_d)]   cross-type self-sup.      (§2.6.5)

All terms work on the whole (global) batch with static shapes: the pixels of a class or of a
dataset are masks over all B·H·W heatmap pixels. The |cos| similarity between pixel embeddings
and prototypes is computed once and shared by the prototype heatmaps, the prototype update and
every prototype-CE term. Prototypes never receive gradients; the EMA update runs on
`stop_gradient` embeddings and is returned as new non-gradient state.

Which stage a step is in is static (`ObjectiveConfig.update_prototypes`, `.cps`, `.css`): the
loop compiles one step function per stage (spec §3.2: prototypes frozen, CPS and CSS on at
epoch 50).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from data_pipelines import skeletons
from data_pipelines.heatmap_codec import argmax_first
from posebh_jax.objective import clustering
from posebh_jax.objective import css as css_lib
from posebh_jax.objective import losses
from posebh_jax.objective import prototype_learning as pl
from posebh_jax.objective import prototypes as proto_lib
from posebh_jax.objective.compat import ReferenceCompat


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static loss settings (hashable; closed over by jit).

  Attributes:
    num_keypoints: K_d per dataset, in dataset-index order.
    heatmap_weight: weight of the multi-head heatmap loss.
    use_proto_head: the model has a prototype head (False: the ViTPose++ baseline).
    proto_weight, ppc_weight, ppd_weight: PixelPrototypeCE weights (1.25e-5, 0.01, 0.001).
    phm_weight: prototype-heatmap MSE weight (3.33e-6); also scales the CPS cluster-heatmap and
      the CSS prototype-heatmap terms, as in the reference.
    gamma: EMA momentum of the keypoint prototypes (0.999).
    sinkhorn_epsilon, sinkhorn_iterations: Sinkhorn settings (0.05, 3).
    gumbel: sample the EMA assignment by Gumbel-max (reference); False uses the argmax.
    sample_threshold: pixels whose target maximum exceeds it take part in prototype learning.
    update_prototypes: stage flag, EMA updates on (False once the prototypes are frozen).
    cps, css: stage flags, cluster-prototype supervision / cross-type self-supervision on.
    cps_weight, css_weight: their weights (1e-2, 1e-3).
    css_conf_thr, css_match_dist, css_sigma, css_dark_kernel: CSS pseudo-label settings.
    compat: reference-implementation switches (spec §6).
  """
  num_keypoints: tuple[int, ...]
  heatmap_weight: float = 1.0
  use_proto_head: bool = True
  proto_weight: float = 1.25e-5
  ppc_weight: float = 0.01
  ppd_weight: float = 0.001
  phm_weight: float = 3.33e-6
  gamma: float = 0.999
  sinkhorn_epsilon: float = 0.05
  sinkhorn_iterations: int = 3
  gumbel: bool = True
  sample_threshold: float = 0.0
  update_prototypes: bool = True
  cps: bool = False
  css: bool = False
  cps_weight: float = 1e-2
  css_weight: float = 1e-3
  css_conf_thr: float = 0.25
  css_match_dist: float = 2.1
  css_sigma: float = 2.0
  css_dark_kernel: int = 11
  compat: ReferenceCompat = ReferenceCompat()

  @property
  def offsets(self) -> tuple[int, ...]:
    """Global id of each dataset's first keypoint (spec §1 table)."""
    return skeletons.keypoint_offsets(self.num_keypoints)

  @property
  def total_keypoints(self) -> int:
    return int(sum(self.num_keypoints))


@flax.struct.dataclass
class PrototypeState:
  """The non-gradient state the objective reads (and, for `prototypes`, writes)."""
  prototypes: jax.Array  # [J, M, E]
  cluster_prototypes: jax.Array  # [C, M, E]
  cluster_keypoint: jax.Array  # [C] int32


def _own_pixels(target: jax.Array, dataset_index: jax.Array, threshold: float
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`hm_sample` over all pixels: class = argmax of the sample's own targets, conf = their max.

  Args:
    target: [B, K, H, W] targets (zero beyond each sample's K_d).
    dataset_index: [B].
    threshold: a pixel counts when its target maximum exceeds it.

  Returns:
    local_class, dataset, conf, valid, each flattened to [B·H·W].
  """
  b, _, h, w = target.shape
  local_class, conf = argmax_first(target, 1)
  dataset = jnp.broadcast_to(dataset_index[:, None, None], (b, h, w)).astype(jnp.int32)
  valid = conf > threshold
  return local_class.reshape(-1), dataset.reshape(-1), conf.reshape(-1), valid.reshape(-1)


def _class_heatmap(sim_flat: jax.Array, num_classes: int, num_in_class: int,
                   shape_bhw: tuple[int, int, int]) -> jax.Array:
  """clip(max_m |cos|, 1e-4, 1 − 1e-4) as heatmaps [B, K, H, W] (spec §2.4 'phm')."""
  b, h, w = shape_bhw
  s = jnp.clip(pl.class_similarity(sim_flat, num_in_class), 1e-4, 1.0 - 1e-4)
  return jnp.transpose(s.reshape(b, h, w, num_classes), (0, 3, 1, 2))


def _proto_ce(cfg: ObjectiveConfig, ppc: jax.Array, ppd: jax.Array) -> jax.Array:
  """PixelPrototypeCELoss summed over the datasets present ([D] per-dataset means in)."""
  return cfg.proto_weight * jnp.sum(cfg.ppc_weight * ppc + cfg.ppd_weight * ppd)


def _learn(cfg: ObjectiveConfig, features, sim_flat, prototypes, local_class, dataset, conf,
           valid, *, offsets, num_keypoints, update, rng, compat) -> pl.ProtoLearnResult:
  """Prototype learning: CE targets and, if `update`, the EMA step (the loss comes separately)."""
  return pl.prototype_learning(
      features, prototypes, local_class, dataset, conf, valid, offsets=offsets,
      num_keypoints=num_keypoints, gamma=cfg.gamma, epsilon=cfg.sinkhorn_epsilon,
      iterations=cfg.sinkhorn_iterations, gumbel_rng=rng if (cfg.gumbel and update) else None,
      update=update, compat=compat, sim_flat=sim_flat)


def _ppce(sim_flat, calls, *, offsets, num_keypoints, num_in_class, compat):
  """PPC and PPD `[T, D]` of T PixelPrototypeCE calls `(target, valid, dataset)` on one table.

  One pass over `sim_flat` for all calls (`pl.ppce_loss_by_dataset`): the main call and the six
  CSS calls of a step share the similarity matrix and differ only in labels and windows.
  """
  start, width = pl.dataset_windows(offsets, num_keypoints, num_in_class, compat)
  target, valid, dataset = (jnp.stack(x) for x in zip(*calls))
  return pl.ppce_loss_by_dataset(sim_flat, target, valid, dataset, window_start=start,
                                 window_width=width)


def posebh_objective(
    outputs: Any,
    batch: dict[str, jax.Array],
    weight: jax.Array,
    protos: PrototypeState,
    rng: jax.Array,
    cfg: ObjectiveConfig,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """Total loss, scalar metrics and the updated keypoint prototypes.

  Args:
    outputs: `ModelOutputs` (heatmaps per head `[B, K_d, H, W]`, embedding `[B, H, W, E]`).
    batch: `target [B, K_max, H, W]`, `dataset_index [B]`.
    weight: `[B, K_max]` target weights (already masked to each sample's skeleton).
    protos: prototype tables.
    rng: key for the Gumbel sampling of the EMA assignment.
    cfg: static settings.

  Returns:
    (total loss, metrics, new prototypes [J, M, E] (stop-gradient)).
  """
  target = batch["target"]
  dataset_index = batch["dataset_index"]
  hm_loss, per_head = losses.multi_head_heatmap_loss(outputs.heatmaps, target, weight,
                                                     dataset_index)
  total = cfg.heatmap_weight * hm_loss
  metrics = {"loss/heatmap": hm_loss}
  for d in range(len(cfg.num_keypoints)):
    metrics[f"loss/heatmap_{d}"] = per_head[d]
  new_prototypes = protos.prototypes
  if not cfg.use_proto_head:
    metrics["loss/total"] = total
    return total, metrics, new_prototypes

  offsets, nkp = cfg.offsets, cfg.num_keypoints
  num_datasets, num_j = len(nkp), cfg.total_keypoints
  m = protos.prototypes.shape[1]
  emb = outputs.embedding.astype(jnp.float32)  # [B, H, W, E]
  b, h, w, e = emb.shape
  features = emb.reshape(-1, e)  # [N, E], N = B·H·W, row-major (b, y, x) like the targets.
  sim = pl.flat_similarity(features, protos.prototypes)  # [N, J·M]
  phm = _class_heatmap(sim, num_j, m, (b, h, w))  # [B, J, H, W]

  # --- Prototype learning and prototype heatmaps on each sample's own keypoints (§2.6.3) ----
  local_class, dataset, conf, valid = _own_pixels(target, dataset_index, cfg.sample_threshold)
  learn_rng, _ = jax.random.split(rng)
  res = _learn(cfg, features, sim, protos.prototypes, local_class, dataset, conf, valid,
               offsets=offsets, num_keypoints=nkp, update=cfg.update_prototypes, rng=learn_rng,
               compat=cfg.compat)
  new_prototypes = jax.lax.stop_gradient(res.prototypes)
  ppce_calls = [(res.target, valid, dataset)]  # The CSS calls join below: one pass for all.
  css_parts = []
  if cfg.css:
    for d, k in enumerate(nkp):
      heads_d = outputs.heatmaps[d]  # [B, K_d, H, W]
      phm_d = phm[:, offsets[d]:offsets[d] + k]
      tg = css_lib.css_targets(
          heads_d, phm_d, dataset_index != d, conf_thr=cfg.css_conf_thr,
          match_dist=cfg.css_match_dist, sigma=cfg.css_sigma, kernel=cfg.css_dark_kernel,
          compat=cfg.compat)
      cls_d, conf_d, valid_d = css_lib.css_pixel_classes(tg)
      cls_d, conf_d, valid_d = cls_d.reshape(-1), conf_d.reshape(-1), valid_d.reshape(-1)
      ds_d = jnp.full_like(cls_d, d)
      res_d = _learn(cfg, features, sim, protos.prototypes, cls_d, ds_d, conf_d, valid_d,
                     offsets=offsets, num_keypoints=nkp, update=False, rng=None, compat=cfg.compat)
      ppce_calls.append((res_d.target, valid_d, ds_d))
      css_parts.append((heads_d, phm_d, tg, valid_d))
  ppc_all, ppd_all = _ppce(sim, ppce_calls, offsets=offsets, num_keypoints=nkp, num_in_class=m,
                           compat=cfg.compat)
  ppc, ppd = ppc_all[0], ppd_all[0]
  proto_loss = _proto_ce(cfg, ppc, ppd)
  # A dataset whose samples have no target pixel at all is skipped by the reference, phm too.
  has_pixels = jax.ops.segment_sum(valid.astype(jnp.float32), dataset,
                                   num_segments=num_datasets) > 0
  global_index = jnp.asarray(skeletons.global_index_table(nkp))
  phm_own = proto_lib.gather_dataset_channels(phm, dataset_index, global_index)
  phm_terms = losses.per_dataset_joints_mse_terms(phm_own, target, weight, dataset_index, nkp)
  phm_loss = jnp.sum(jnp.where(has_pixels, phm_terms, 0.0))
  total += proto_loss + cfg.phm_weight * phm_loss
  metrics.update({"loss/proto_ce": proto_loss, "loss/phm": phm_loss,
                  "proto/ppc": jnp.sum(ppc), "proto/ppd": jnp.sum(ppd),
                  "proto/pixels": jnp.sum(valid.astype(jnp.float32))})

  # --- Cluster-prototype supervision (§2.6.4) --------------------------------------------------
  if cfg.cps:
    c = protos.cluster_prototypes.shape[0]
    sim_c = pl.flat_similarity(features, protos.cluster_prototypes)  # [N, C·M]
    chm = _class_heatmap(sim_c, c, m, (b, h, w))  # [B, C, H, W]
    tc, wc = clustering.cluster_targets(target, weight, dataset_index, protos.cluster_keypoint,
                                        offsets=offsets, num_keypoints=nkp, compat_order=False)
    c_class, _, c_conf, c_valid = _own_pixels(tc, dataset_index, cfg.sample_threshold)
    zeros = jnp.zeros_like(c_class)  # The cluster table is one "dataset" with C classes.
    res_c = _learn(cfg, features, sim_c, protos.cluster_prototypes, c_class, zeros, c_conf,
                   c_valid, offsets=(0,), num_keypoints=(c,), update=False, rng=None,
                   compat=cfg.compat)
    ppc_c, ppd_c = _ppce(sim_c, [(res_c.target, c_valid, zeros)], offsets=(0,),
                         num_keypoints=(c,), num_in_class=m, compat=cfg.compat)
    ppc_c, ppd_c = ppc_c[0], ppd_c[0]
    if cfg.compat.cps_target_order:
      tc, wc = clustering.cluster_targets(target, weight, dataset_index, protos.cluster_keypoint,
                                          offsets=offsets, num_keypoints=nkp, compat_order=True)
    l_ch = losses.joints_mse(chm, tc, wc)
    l_pc = _proto_ce(cfg, ppc_c, ppd_c)
    cps_loss = cfg.cps_weight * (l_pc + cfg.phm_weight * l_ch)
    total += cps_loss
    metrics.update({"loss/cps": cps_loss, "cps/cluster_heatmap": l_ch, "cps/proto_ce": l_pc})

  # --- Cross-type self-supervision (§2.6.5) -----------------------------------------------------
  if cfg.css:
    css_total = jnp.zeros((), jnp.float32)
    kept = jnp.zeros((), jnp.float32)
    for d, (heads_d, phm_d, tg, valid_d) in enumerate(css_parts):
      hm_d = css_lib.css_heatmap_loss(heads_d, tg)
      ph_d = cfg.phm_weight * css_lib.css_heatmap_loss(phm_d, tg)
      pp_d = _proto_ce(cfg, ppc_all[1 + d], ppd_all[1 + d])
      # The reference drops d entirely (hm and ph too) when no pseudo-label pixel is sampled.
      css_total += jnp.where(jnp.any(valid_d), hm_d + ph_d + pp_d, 0.0)
      kept += jnp.sum(tg.weight > 0)
    css_loss = cfg.css_weight * css_total
    total += css_loss
    metrics.update({"loss/css": css_loss, "css/kept_pairs": kept})

  metrics["loss/total"] = total
  return total, metrics, new_prototypes
