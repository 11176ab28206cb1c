r"""The synthetic study (issue 18): can the laptop-scale setup tell PoseBH from the baseline?

Two synthetic datasets in two domains (`render.STYLES`): `synth_coco` (COCO's 17 keypoints) on
bright, round-headed "coco_like" figures and `synth_aic` (AIC's 14, with head top and neck) on
dark, box-headed "aic_like" figures. A keypoint is *cross-domain novel* when a head predicts it on
the other domain's images, where no label for it exists: the COCO head's nose, eyes and ears on
AIC-like images, the AIC head's head top and neck on COCO-like images. That is what PoseBH's
prototypes and cross-type self-supervision (CSS) are for.

Per seed, with the package's own model, train state, optimizer, freeze-hook schedule and
compiled train step (`posebh_jax.train.loop.StageSteps`), on images rendered in memory at the
network's input size (no files, no crop: one run is seconds to a minute on 2 CPU cores):

  1. power check: the oracle (both heads supervised on both domains: the union of the labels)
     against the baseline, on cross-domain novel keypoints; the oracle − baseline gap is what a
     method that transfers keypoints across datasets could at most gain;
  2. equal budget: a multi-head model is pretrained for P steps, then branches for B steps:
     (a) the baseline continues; (b) PoseBH's stages — B/3 steps of the prototype head alone
     (backbone and heads frozen, prototypes by EMA), B/3 with the heads thawed and CPS + CSS on,
     B/3 with the backbone thawed too. Reported: novel PCK through the heads and through the
     prototypes (argmax of the cosine similarity to the keypoint's prototypes), per-dataset PCK,
     the fraction of the oracle gap closed, and paired seed differences with 95 % t intervals;
  3. low data: the same two branches with `synth_aic` cut to 100 training images;
  4. transfer: a skeleton unseen in training (11 mid-body points: pelvis, thorax, head centre,
     mid upper arms, forearms, thighs and shins) in a third domain ("third" style). From each
     branch's final state, `posebh_jax.convert.transfer.derive_transfer_weights` makes the
     one-dataset start (backbone with COCO's expert; fresh head), then it is
     trained with the reference's transfer hooks (backbone frozen except a short thaw at 3/4 of
     the run; the prototype head, frozen there throughout, is left out) on 50 and on 200
     labelled images.

  python benchmarks/synthetic_study.py --out=runs/synthetic_study          # full (5 seeds)
  python benchmarks/synthetic_study.py --quick --out=/tmp/study_quick       # machinery check

Writes `<out>/synthetic_study.md` (tables), `<out>/synthetic_study.png` (plot) and
`<out>/synthetic_study.json` (every number of every seed). PCK: box-normalised
(`posebh_jax.evaluation.pck.pck_box`) at 0.05 (and 0.1) of the figure's longer box side, over
labelled keypoints inside the image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

if __package__ in (None, ""):  # `python benchmarks/synthetic_study.py` from the repository root.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from configs import synthetic as synthetic_configs
from data_pipelines import datasets, device_targets, pipeline
from data_pipelines.skeletons import SYNTHETIC_SKELETONS
from data_pipelines.synthetic import render
from posebh_jax import experiment
from posebh_jax.convert import transfer as transfer_lib
from posebh_jax.convert import weights as weights_lib
from posebh_jax.evaluation import pck as pck_lib
from posebh_jax.train import loop
from posebh_jax.train import sharding as sharding_lib

DATASETS = ("synth_coco", "synth_aic")
DOMAINS = {"synth_coco": "coco_like", "synth_aic": "aic_like"}
THIRD_DOMAIN = "third"
IMAGE_HW = (64, 48)
HEATMAP_HW = (16, 12)

# The new skeleton of the transfer: midpoints of pairs of rendered landmarks, none of which is a
# keypoint of any training skeleton.
MID_POINTS = (
    ("pelvis", "left_hip", "right_hip"), ("thorax", "left_shoulder", "right_shoulder"),
    ("head_centre", "neck", "head_top"),
    ("left_upper_arm", "left_shoulder", "left_elbow"),
    ("right_upper_arm", "right_shoulder", "right_elbow"),
    ("left_forearm", "left_elbow", "left_wrist"), ("right_forearm", "right_elbow", "right_wrist"),
    ("left_thigh", "left_hip", "left_knee"), ("right_thigh", "right_hip", "right_knee"),
    ("left_shin", "left_knee", "left_ankle"), ("right_shin", "right_knee", "right_ankle"))
MID_SKELETON = dict(
    name="synth_mid11", keypoint_names=[m[0] for m in MID_POINTS],
    flip_pairs=[[3, 4], [5, 6], [7, 8], [9, 10]],
    sigmas=[0.1] * len(MID_POINTS), upper_body_ids=list(range(7)),
    limbs=[[0, 1], [1, 2], [1, 3], [1, 4], [3, 5], [4, 6], [0, 7], [0, 8], [7, 9], [8, 10]])

# Two-sided 95 % Student t quantiles by degrees of freedom (1..30; beyond: 1.96 + 2.4/df).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes of one study run.

  Attributes:
    num_train: training images per domain; low_data: synth_aic's in the low-data arm.
    num_val: held-out images per domain.
    pretrain: P, steps of the multi-head pretraining; branch: B, steps of each branch (a
      multiple of 3: PoseBH's three stages).
    transfer_steps: steps of each transfer fine-tune; transfer_labels: its label counts.
    batch: global batch (half per dataset).
  """
  num_train: int = 600
  low_data: int = 100
  num_val: int = 200
  pretrain: int = 240
  branch: int = 120
  transfer_steps: int = 60
  transfer_labels: tuple[int, ...] = (50, 200)
  transfer_val: int = 200
  batch: int = 32


QUICK = Plan(num_train=48, low_data=16, num_val=24, pretrain=6, branch=6, transfer_steps=4,
             transfer_labels=(8, 16), transfer_val=16, batch=16)


# --- Data ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Domain:
  """Images of one domain with the ground truth of every biped landmark.

  Attributes:
    images: [N, H, W, 3] uint8 RGB (the network input: the render is the crop).
    points: name → ([N, 2] float32 x, y; [N] int32 visibility 0/1/2).
    box_wh: [N, 2] the figure's box size (PCK normaliser).
  """
  images: np.ndarray
  points: dict[str, tuple[np.ndarray, np.ndarray]]
  box_wh: np.ndarray

  def take(self, n: int) -> "Domain":
    return Domain(self.images[:n], {k: (p[:n], v[:n]) for k, (p, v) in self.points.items()},
                  self.box_wh[:n])

  def keypoints(self, names) -> tuple[np.ndarray, np.ndarray]:
    """([N, K, 2] joints, [N, K] int visibility) for keypoint `names`."""
    return (np.stack([self.points[n][0] for n in names], 1),
            np.stack([self.points[n][1] for n in names], 1))


def render_domain(style: str, n: int, seed: int, split: int) -> Domain:
  """Renders `n` bipeds in `style` (image i from `default_rng([seed, split, i])`)."""
  images = np.empty((n, *IMAGE_HW, 3), np.uint8)
  pts = {k: np.zeros((n, 2), np.float32) for k in render.BIPED_LANDMARKS}
  vis = {k: np.zeros((n,), np.int32) for k in render.BIPED_LANDMARKS}
  box = np.zeros((n, 2), np.float32)
  for i in range(n):
    s = render.render_sample(np.random.default_rng([seed, split, i]), render.BIPED, IMAGE_HW,
                             style)
    images[i] = s.image[..., ::-1]  # BGR → RGB.
    for k, (x, y, v) in s.keypoints.items():
      pts[k][i], vis[k][i] = (x, y), v
    box[i] = s.bbox[2:]
  points = {k: (pts[k], vis[k]) for k in pts}
  for name, a, b in MID_POINTS:  # The transfer skeleton's points.
    both = (vis[a] > 0) & (vis[b] > 0)
    p = 0.5 * (pts[a] + pts[b])
    inside = np.all((p >= 0) & (p <= [IMAGE_HW[1] - 1, IMAGE_HW[0] - 1]), axis=1)
    points[name] = (np.where(both[:, None], p, 0.0).astype(np.float32),
                    np.where(both & inside, np.minimum(vis[a], vis[b]), 0).astype(np.int32))
  return Domain(images, points, box)


@dataclasses.dataclass
class Pool:
  """Training samples of one head: (domain, image index) pairs with that head's labels."""
  images: np.ndarray  # [N, H, W, 3] uint8
  joints: np.ndarray  # [N, K, 2]
  vis: np.ndarray  # [N, K]


def make_pool(domains: list[Domain], names) -> Pool:
  parts = [d.keypoints(names) for d in domains]
  return Pool(np.concatenate([d.images for d in domains]),
              np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def sampler(pools: list[Pool], k_max: int, batch: int, seed: int, tag: int
            ) -> Callable[[int], dict[str, np.ndarray]]:
  """Step → compact batch: batch / len(pools) samples of each head's pool, drawn with
  `default_rng([seed, tag, step])` (the batch of a step does not depend on what ran before)."""
  per = batch // len(pools)
  masks = np.zeros((len(pools), k_max), np.float32)
  for d, p in enumerate(pools):
    masks[d, :p.joints.shape[1]] = 1.0

  def get(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, tag, step])
    images, joints, vis, ds = [], [], [], []
    for d, p in enumerate(pools):
      idx = rng.integers(0, len(p.images), per)
      j = np.zeros((per, k_max, 2), np.float32)
      v = np.zeros((per, k_max), np.float32)
      j[:, :p.joints.shape[1]] = p.joints[idx]
      v[:, :p.joints.shape[1]] = p.vis[idx] > 0
      images.append(p.images[idx])
      joints.append(j)
      vis.append(v)
      ds.append(np.full((per,), d, np.int32))
    ds = np.concatenate(ds)
    return dict(image=np.concatenate(images), joints=np.concatenate(joints),
                joint_vis=np.concatenate(vis), dataset_index=ds, skeleton_mask=masks[ds])
  return get


# --- Configs ------------------------------------------------------------------------------------


def base_config(names, skeletons, plan: Plan, num_steps: int) -> ml_collections.ConfigDict:
  """The study's model and optimizer (a small ViT on 64×48 crops) for datasets `names`."""
  c = synthetic_configs.get_config()
  c.data.synthetic.enabled = False
  c.data.dataset_names = tuple(names)
  c.data.datasets = ml_collections.ConfigDict({
      n: common.dataset_entry(skeleton=s, train_ann="", val_ann="", image_dir="")
      for n, s in zip(names, skeletons)})
  c.data.image_size, c.data.heatmap_size = IMAGE_HW, HEATMAP_HW
  m = c.model
  # Patch 8: an 8×6 token grid and one deconv to the 16×12 heatmap, as the package's synthetic
  # default at half its input size; a step is a fraction of a second on 2 CPU cores.
  m.patch_size, m.embed_dim, m.depth, m.num_heads, m.part_features = 8, 48, 3, 2, 12
  m.head_deconv_filters = (32,)
  m.proto.deconv_filters, m.proto.channels, m.proto.out_channels = (16,), 16, 16
  m.proto.num_clusters = 12  # 31 keypoints over the two skeletons.
  t = c.train
  t.batch_size, t.num_steps, t.learning_rate = plan.batch, num_steps, 3e-3
  t.warmup_steps = max(1, min(30, num_steps // 10))
  t.schedule = "cosine"
  t.compilation_cache = ""
  c.mesh.data = -1
  return c


def multihead_config(plan: Plan, num_steps: int) -> ml_collections.ConfigDict:
  """Pretraining, the baseline branch and the oracle: the multi-head model, no prototype head
  (the PoseBH branch adds a fresh one: `start_posebh`)."""
  c = base_config(DATASETS, DATASETS, plan, num_steps)
  c.model.use_proto_head = False
  common.set_stage2(c, -1)
  return c


def posebh_config(plan: Plan, start: int, num_steps: int) -> ml_collections.ConfigDict:
  """PoseBH's stages from step `start` (the end of pretraining) to `start + plan.branch`."""
  c = base_config(DATASETS, DATASETS, plan, num_steps)
  s2, s3 = start + plan.branch // 3, start + 2 * plan.branch // 3
  h = c.schedule.freeze_hooks
  h.proto_head = (("freeze", 0), ("thaw", start))
  h.heads = (("freeze", start), ("thaw", s2))
  h.backbone = (("freeze", start), ("thaw", s3))
  common.set_stage2(c, s2)  # Prototypes freeze, clustered (CPS), CSS on.
  return c


def transfer_config(plan: Plan) -> ml_collections.ConfigDict:
  """The new skeleton alone, with the reference's transfer hooks scaled to `transfer_steps`."""
  t = plan.transfer_steps
  c = base_config(("synth_mid11",), (MID_SKELETON,), plan, t)
  # The reference's transfer freezes the prototype head (the keypoint embedding) throughout, and
  # its prototypes do not feed the heatmap head: with or without them the head trains the same,
  # so the transfer model leaves the prototype head out (a third of the step's cost).
  c.model.use_proto_head = False
  thaw, freeze = (3 * t) // 4, (4 * t) // 5
  c.schedule.freeze_hooks.backbone = (("freeze", 0), ("thaw", thaw),
                                      ("freeze", max(freeze, thaw + 1)))
  common.set_stage2(c, -1)
  return c


# --- Training and evaluation --------------------------------------------------------------------


class Trainer:
  """The package's train state and compiled stage steps for one config (shared by seeds)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.layout = datasets.build_layout(config)
    loop.validate_config(config, self.layout)
    self.model = experiment.build_model(config, self.layout)
    td = datasets.topdown_config(config, self.layout)
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.init_fn, _, self.shardings, self.tx = loop.abstract_train_state(
        config, self.model, self.layout, self.mesh)
    self.steps = loop.StageSteps(config, self.layout, self.model, self.tx, self.mesh,
                                 self.shardings, targets=device_targets.TargetSpec.from_topdown(td))
    self._batch_sharding = pipeline.batch_sharding(self.mesh)
    self._init = jax.jit(self.init_fn, out_shardings=self.shardings)
    self.predict_fns: dict[int, Callable] = {}  # Compiled once per head (see `predict`).

  def init(self, seed: int):
    return self._init(jax.random.key(seed))

  def run(self, state, get_batch, start: int, stop: int):
    for step in range(start, stop):
      state = loop.enter_step(self.config, state, step, self.tx, self.shardings,
                               self.steps.schedule)
      batch = jax.device_put(get_batch(step), self._batch_sharding)
      state, metrics = self.steps.run(step, state, batch)
    if stop > start and not bool(metrics["finite"]):
      raise FloatingPointError(f"non-finite loss or state by step {stop}")
    return state

  def start_from(self, state, seed: int, step: int):
    """A fresh state of this trainer's model holding `state`'s parameters and BN statistics
    (a model without a prototype head → one with a fresh head and prototypes), at `step`.

    The optimizer state is fresh: the PoseBH stages freeze the backbone and heads at `step`
    and restart their Adam state when they thaw, as a continued run would.
    """
    fresh = self.init(seed)
    merge = lambda new, old: {**new, **jax.tree_util.tree_map(jnp.copy, old)}
    return fresh.replace(params=merge(fresh.params, state.params),
                         batch_stats=merge(fresh.batch_stats, state.batch_stats),
                         step=jnp.asarray(step, fresh.step.dtype))


def _decode(heatmaps: np.ndarray) -> np.ndarray:
  """[N, K, Hh, Wh] → [N, K, 2] input-pixel (x, y): argmax with the quarter-pixel shift towards
  the higher neighbour (mmpose's `get_max_preds` + post-processing), × the heatmap stride."""
  n, k, hh, wh = heatmaps.shape
  flat = heatmaps.reshape(n, k, -1)
  idx = flat.argmax(-1)
  y, x = np.divmod(idx, wh)
  xs, ys = x.astype(np.float64), y.astype(np.float64)
  ni, ki = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
  inner_x = (x > 0) & (x < wh - 1)
  inner_y = (y > 0) & (y < hh - 1)
  xl, xr = np.clip(x - 1, 0, wh - 1), np.clip(x + 1, 0, wh - 1)
  yu, yd = np.clip(y - 1, 0, hh - 1), np.clip(y + 1, 0, hh - 1)
  xs += np.where(inner_x, 0.25 * np.sign(heatmaps[ni, ki, y, xr] - heatmaps[ni, ki, y, xl]), 0)
  ys += np.where(inner_y, 0.25 * np.sign(heatmaps[ni, ki, yd, x] - heatmaps[ni, ki, yu, x]), 0)
  stride = IMAGE_HW[0] / hh
  return np.stack([xs, ys], -1) * stride


def predict(trainer: Trainer, state, images: np.ndarray, dataset: int, batch: int = 128
            ) -> tuple[np.ndarray, np.ndarray | None]:
  """Head `dataset`'s heatmaps and the prototype similarity maps on `images`.

  Returns:
    ([N, K_d, Hh, Wh] heatmaps, [N, J, Hh, Wh] max-over-prototypes cosine similarity of every
    global keypoint, or None without a prototype head).
  """
  model = trainer.model

  def fwd(params, batch_stats, protos, x):
    out = model.apply({"params": params, "batch_stats": batch_stats},
                      _normalize(x), jnp.full((x.shape[0],), dataset, jnp.int32), train=False)
    sim = None
    if out.embedding is not None:
      e = out.embedding / (jnp.linalg.norm(out.embedding, axis=-1, keepdims=True) + 1e-6)
      p = protos / (jnp.linalg.norm(protos, axis=-1, keepdims=True) + 1e-6)
      sim = jnp.einsum("bhwe,jme->bjmhw", e, p).max(2)
    return out.heatmaps[dataset], sim

  fwd = trainer.predict_fns.setdefault(dataset, jax.jit(fwd))
  hms, sims = [], []
  for i in range(0, len(images), batch):
    h, s = fwd(state.params, state.batch_stats, state.prototypes, images[i:i + batch])
    hms.append(np.asarray(h))
    sims.append(None if s is None else np.asarray(s))
  return np.concatenate(hms), (None if sims[0] is None else np.concatenate(sims))


def _normalize(x):
  return pipeline.normalize_on_device(x)


def pck(pred: np.ndarray, dom: Domain, names, thr: float) -> float:
  joints, vis = dom.keypoints(names)
  inside = np.all((joints >= 0) & (joints <= [IMAGE_HW[1] - 1, IMAGE_HW[0] - 1]), -1)
  return pck_lib.pck_box(pred, joints, (vis > 0) & inside, dom.box_wh, thr)[1]


NOVEL = {  # head → (the other domain, the head's keypoints the other dataset does not label).
    d: (o, [k for k in SYNTHETIC_SKELETONS[d].keypoint_names
            if k not in SYNTHETIC_SKELETONS[o].keypoint_names])
    for d, o in ((DATASETS[0], DATASETS[1]), (DATASETS[1], DATASETS[0]))}


def evaluate(trainer: Trainer, state, val: dict[str, Domain], protos: bool) -> dict[str, float]:
  """Per-dataset PCK (own domain), cross-domain novel PCK through heads and prototypes."""
  out: dict[str, float] = {}
  offsets = trainer.layout.offsets
  for d, name in enumerate(DATASETS):
    names = SYNTHETIC_SKELETONS[name].keypoint_names
    hm, _ = predict(trainer, state, val[name].images, d)
    for thr in (0.05, 0.1):
      out[f"own/{name}@{thr}"] = pck(_decode(hm), val[name], names, thr)
    other, novel = NOVEL[name]
    hm, sim = predict(trainer, state, val[other].images, d)
    idx = [names.index(k) for k in novel]
    for thr in (0.05, 0.1):
      out[f"novel_heads/{name}@{thr}"] = pck(_decode(hm[:, idx]), val[other], novel, thr)
    if protos:
      psim = sim[:, [offsets[d] + i for i in idx]]
      for thr in (0.05, 0.1):
        out[f"novel_protos/{name}@{thr}"] = pck(_decode(psim), val[other], novel, thr)
  for kind in ("novel_heads", "novel_protos", "own"):
    for thr in (0.05, 0.1):
      vals = [out[f"{kind}/{n}@{thr}"] for n in DATASETS if f"{kind}/{n}@{thr}" in out]
      if vals:
        out[f"{kind}/mean@{thr}"] = float(np.mean(vals))
  return out


# --- One seed -----------------------------------------------------------------------------------


def run_seed(seed: int, plan: Plan, trainers: dict[str, Trainer], data: dict, log) -> dict:
  """Every arm of the study for one seed (initialisation and batch order; the data is fixed)."""
  P, B = plan.pretrain, plan.branch
  total = P + B
  res: dict[str, Any] = {}
  train, val = data["train"], data["val"]
  kmax = trainers["multi"].layout.max_keypoints
  t0 = time.time()

  def pools(domains_per_head):
    return [make_pool(doms, SYNTHETIC_SKELETONS[n].keypoint_names)
            for n, doms in zip(DATASETS, domains_per_head)]

  multi, pose = trainers["multi"], trainers["posebh"]
  own = pools([[train["synth_coco"]], [train["synth_aic"]]])
  union = pools([[train["synth_coco"], train["synth_aic"]]] * 2)
  low = pools([[train["synth_coco"]], [train["synth_aic"].take(plan.low_data)]])

  def branches(tag: str, pool, tag_id: int):
    get = sampler(pool, kmax, plan.batch, seed, tag_id)
    state = multi.run(multi.init(seed), get, 0, P)
    pre = pose.start_from(state, seed, P)
    base = multi.run(state, get, P, total)
    res[f"{tag}baseline"] = evaluate(multi, base, val, protos=False)
    ours = pose.run(pre, get, P, total)
    res[f"{tag}posebh"] = evaluate(pose, ours, val, protos=True)
    log(f"seed {seed}: {tag or 'full '}branches done ({time.time() - t0:.0f} s)")
    return base, ours

  base, ours = branches("", own, 0)
  oracle = multi.run(multi.init(seed), sampler(union, kmax, plan.batch, seed, 1), 0, total)
  res["oracle"] = evaluate(multi, oracle, val, protos=False)
  log(f"seed {seed}: oracle done ({time.time() - t0:.0f} s)")
  del oracle
  res["transfer"] = transfer_arm(seed, plan, {"baseline": base, "posebh": ours}, trainers, data)
  log(f"seed {seed}: transfer done ({time.time() - t0:.0f} s)")
  del base, ours
  branches("low/", low, 2)
  res["seconds"] = time.time() - t0
  return res


def transfer_arm(seed: int, plan: Plan, states: dict, trainers: dict[str, Trainer],
                 data: dict) -> dict[str, float]:
  """Fine-tunes the new skeleton's head from each branch (module docstring, item 4)."""
  tgt = trainers["transfer"]
  source_configs = dict(baseline=trainers["multi"].config, posebh=trainers["posebh"].config)
  names = tgt.layout.skeletons[0].keypoint_names
  out = {}
  with tempfile.TemporaryDirectory(prefix="synthetic_study_") as tmp:
    for branch, state in states.items():
      src = os.path.join(tmp, f"{branch}_src")
      host = jax.device_get(state)
      weights_lib.save_weights(src, weights_lib.PretrainedWeights(
          params=host.params, batch_stats=host.batch_stats, prototypes=None,
          cluster_prototypes=None, cluster_keypoint=None), dict(source=f"study {branch}"))
      dst = os.path.join(tmp, f"{branch}_transfer")
      transfer_lib.derive_transfer_weights(source_configs[branch], src, tgt.config, dst,
                                           expert=0, seed=seed)
      cfg = tgt.config.copy_and_resolve_references()
      cfg.init.weights = dst
      for n in plan.transfer_labels:
        pool = make_pool([data["third_train"].take(n)], names)
        state0 = loop.init_from_weights(cfg, tgt.init(seed), tgt.model, tgt.layout,
                                        tgt.shardings)
        get = sampler([pool], tgt.layout.max_keypoints, plan.batch, seed, 10 + n)
        final = tgt.run(state0, get, 0, plan.transfer_steps)
        hm, _ = predict(tgt, final, data["third_val"].images, 0)
        for thr in (0.05, 0.1):
          out[f"{branch}/{n}@{thr}"] = pck(_decode(hm), data["third_val"], names, thr)
  return out


# --- Report -------------------------------------------------------------------------------------


def _t95(df: int) -> float:
  return _T95[df - 1] if df <= len(_T95) else 1.96 + 2.4 / df


def mean_ci(values: list[float]) -> tuple[float, float]:
  """(mean, half-width of the 95 % t interval; NaN with one value)."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()), float("nan")
  return float(v.mean()), float(_t95(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def _fmt(values: list[float]) -> str:
  m, h = mean_ci(values)
  return f"{m:.3f}" if math.isnan(h) else f"{m:.3f} ± {h:.3f}"


def summarize(results: list[dict], plan: Plan, seconds: float, quick: bool) -> tuple[str, dict]:
  """Markdown tables and the numbers the plot shows."""
  seeds = [r["seed"] for r in results]
  get = lambda arm, key: [r[arm][key] for r in results]
  lines = [f"# Synthetic study ({'quick: machinery check, not a result' if quick else 'full'})",
           "",
           f"Seeds {seeds}; {plan.num_train} training images per domain, {plan.num_val} held "
           f"out; pretraining {plan.pretrain} steps, branches {plan.branch} steps, batch "
           f"{plan.batch}, input {IMAGE_HW[0]}×{IMAGE_HW[1]}. Wall time {seconds:.0f} s. "
           "Values: mean ± 95 % t interval over seeds; differences are paired by seed.", ""]
  # 1. Power check.
  key = "novel_heads/mean@0.05"
  gap = [o - b for o, b in zip(get("oracle", key), get("baseline", key))]
  lines += ["## Power check: oracle − baseline, cross-domain novel keypoints (PCK@0.05)", "",
            "| | baseline | oracle | oracle − baseline |", "|---|---|---|---|"]
  for n in DATASETS + ("mean",):
    k = f"novel_heads/{n}@0.05"
    lines.append(f"| {n} head on the other domain | {_fmt(get('baseline', k))} | "
                 f"{_fmt(get('oracle', k))} | "
                 f"{_fmt([o - b for o, b in zip(get('oracle', k), get('baseline', k))])} |")
  lines.append("")
  # 2/3. Equal budget and low data.
  rows = [("novel via heads (mean)", "novel_heads/mean@0.05"),
          ("novel via heads, COCO head on AIC-like", "novel_heads/synth_coco@0.05"),
          ("novel via heads, AIC head on COCO-like", "novel_heads/synth_aic@0.05"),
          ("novel via prototypes (mean)", "novel_protos/mean@0.05"),
          ("own domain, synth_coco", "own/synth_coco@0.05"),
          ("own domain, synth_aic", "own/synth_aic@0.05"),
          ("novel via heads (mean), PCK@0.1", "novel_heads/mean@0.1"),
          ("own domain (mean), PCK@0.1", "own/mean@0.1")]
  plot: dict[str, Any] = {}
  for tag, title in (("", "Equal budget"), ("low/", f"Low data (synth_aic cut to {plan.low_data} "
                                                     "training images)")):
    lines += [f"## {title} (PCK@0.05 unless noted)", "",
              "| | baseline | PoseBH | PoseBH − baseline (paired) |", "|---|---|---|---|"]
    for label, k in rows:
      b = get(f"{tag}baseline", k) if k in results[0][f"{tag}baseline"] else None
      p = get(f"{tag}posebh", k)
      diff = _fmt([x - y for x, y in zip(p, b)]) if b else "—"
      lines.append(f"| {label} | {_fmt(b) if b else '— (no prototypes)'} | {_fmt(p)} | {diff} |")
    b, p = get(f"{tag}baseline", key), get(f"{tag}posebh", key)
    plot[title.split(" (")[0]] = dict(baseline=mean_ci(b), posebh=mean_ci(p),
                                      diff=mean_ci([x - y for x, y in zip(p, b)]))
    if not tag:
      closed = (np.mean(p) - np.mean(b)) / np.mean(gap) if abs(np.mean(gap)) > 1e-9 else math.nan
      lines += ["", f"Fraction of the oracle gap closed (novel via heads, PCK@0.05): "
                f"(PoseBH − baseline) / (oracle − baseline) = {closed:.2f}"]
      plot["oracle"] = mean_ci(get("oracle", key))
    lines.append("")
  # 4. Transfer.
  lines += [f"## Transfer to a new skeleton ({len(MID_POINTS)} mid-body points, third domain; "
            f"{plan.transfer_steps} steps; PCK@0.05 / PCK@0.1 on {plan.transfer_val} images)", "",
            "| labels | from baseline | from PoseBH | PoseBH − baseline (paired, @0.05) |",
            "|---|---|---|---|"]
  tr = [r["transfer"] for r in results]
  plot["transfer"] = {}
  for n in plan.transfer_labels:
    b5, p5 = [t[f"baseline/{n}@0.05"] for t in tr], [t[f"posebh/{n}@0.05"] for t in tr]
    b1, p1 = [t[f"baseline/{n}@0.1"] for t in tr], [t[f"posebh/{n}@0.1"] for t in tr]
    lines.append(f"| {n} | {_fmt(b5)} / {_fmt(b1)} | {_fmt(p5)} / {_fmt(p1)} | "
                 f"{_fmt([x - y for x, y in zip(p5, b5)])} |")
    plot["transfer"][n] = dict(baseline=mean_ci(b5), posebh=mean_ci(p5))
  lines += ["", "Per seed (novel via heads, PCK@0.05: baseline / PoseBH / oracle; seconds):"]
  for r in results:
    lines.append(f"- seed {r['seed']}: {r['baseline'][key]:.3f} / {r['posebh'][key]:.3f} / "
                 f"{r['oracle'][key]:.3f}; {r['seconds']:.0f} s")
  return "\n".join(lines) + "\n", plot


def draw_plot(plot: dict, path: str) -> None:
  """A bar chart with 95 % interval whiskers, drawn with OpenCV (no matplotlib dependency)."""
  groups = [("Equal budget", "novel, equal budget"), ("Low data", "novel, low data")]
  bars: list[tuple[str, str, tuple[float, float], tuple[int, int, int]]] = []
  colors = dict(baseline=(180, 130, 70), posebh=(60, 140, 240), oracle=(90, 170, 90))
  for key, label in groups:
    for arm in ("baseline", "posebh"):
      bars.append((label, arm, plot[key][arm], colors[arm]))
    if key == "Equal budget":
      bars.append((label, "oracle", plot["oracle"], colors["oracle"]))
  for n, v in plot["transfer"].items():
    for arm in ("baseline", "posebh"):
      bars.append((f"transfer, {n} labels", arm, v[arm], colors[arm]))
  w, h, left, bottom, top = 900, 420, 60, 90, 40
  img = np.full((h, w, 3), 255, np.uint8)
  vmax = max(0.05, max(m + (0 if math.isnan(c) else c) for _, _, (m, c), _ in bars)) * 1.1
  # Whiskers are clipped to the axis (intervals of a few seeds can reach below zero).
  y = lambda v: int(round(h - bottom - (h - bottom - top) * min(max(v, 0.0), vmax) / vmax))
  cv2.line(img, (left, y(0)), (w - 10, y(0)), (0, 0, 0), 1)
  for i in range(6):
    v = vmax * i / 5
    cv2.line(img, (left - 4, y(v)), (left, y(v)), (0, 0, 0), 1)
    cv2.putText(img, f"{v:.2f}", (5, y(v) + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                cv2.LINE_AA)
  slot = (w - left - 20) / (len(bars) + len(set(b[0] for b in bars)))
  x, prev = left + slot / 2, None
  for label, arm, (m, c), col in bars:
    if prev is not None and label != prev:
      x += slot
    if label != prev:
      cv2.putText(img, label, (int(x), h - bottom + 40), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                  (0, 0, 0), 1, cv2.LINE_AA)
    x0, x1 = int(x), int(x + slot * 0.85)
    cv2.rectangle(img, (x0, y(m)), (x1, y(0)), col, -1)
    if not math.isnan(c):
      xc = (x0 + x1) // 2
      cv2.line(img, (xc, y(m - c)), (xc, y(m + c)), (0, 0, 0), 1)
      for v in (m - c, m + c):
        cv2.line(img, (xc - 4, y(v)), (xc + 4, y(v)), (0, 0, 0), 1)
    cv2.putText(img, arm, (x0, h - bottom + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1,
                cv2.LINE_AA)
    prev = label
    x += slot
  cv2.putText(img, "PCK@0.05: cross-domain novel keypoints (heads) and transfer; "
              "whiskers: 95% interval over seeds", (left, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
              (0, 0, 0), 1, cv2.LINE_AA)
  if not cv2.imwrite(path, img):
    raise OSError(f"could not write {path}")


# --- Main ---------------------------------------------------------------------------------------


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output directory (tables, plot, JSON)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, 2 seeds: checks the machinery (minutes), not a result")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0..4; "
                      "quick: 0,1)")
  args = parser.parse_args(argv)
  plan = QUICK if args.quick else Plan()
  seeds = ([int(s) for s in args.seeds.split(",") if s] if args.seeds
           else ([0, 1] if args.quick else [0, 1, 2, 3, 4]))
  os.makedirs(args.out, exist_ok=True)
  t_start = time.time()
  log = lambda msg: print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

  # The data is fixed across seeds: the seeds vary initialisation and batch order.
  n_third = max(plan.transfer_labels)
  data = dict(
      train={n: render_domain(DOMAINS[n], plan.num_train, 100 + i, 0)
             for i, n in enumerate(DATASETS)},
      val={n: render_domain(DOMAINS[n], plan.num_val, 100 + i, 1)
           for i, n in enumerate(DATASETS)},
      third_train=render_domain(THIRD_DOMAIN, n_third, 200, 0),
      third_val=render_domain(THIRD_DOMAIN, plan.transfer_val, 200, 1))
  log(f"rendered the data ({time.time() - t_start:.0f} s)")
  total = plan.pretrain + plan.branch
  trainers = dict(multi=Trainer(multihead_config(plan, total)),
                  posebh=Trainer(posebh_config(plan, plan.pretrain, total)),
                  transfer=Trainer(transfer_config(plan)))
  results = []
  json_path = os.path.join(args.out, "synthetic_study.json")
  for seed in seeds:
    r = run_seed(seed, plan, trainers, data, log)
    r["seed"] = seed
    results.append(r)
    seconds = time.time() - t_start
    # Written after every seed: an interrupted full run still leaves its finished seeds.
    with open(json_path, "w") as f:
      json.dump(dict(plan=dataclasses.asdict(plan), quick=args.quick, seconds=seconds,
                     results=results), f, indent=1)
    text, plot = summarize(results, plan, seconds, args.quick)
    with open(os.path.join(args.out, "synthetic_study.md"), "w") as f:
      f.write(text)
    draw_plot(plot, os.path.join(args.out, "synthetic_study.png"))
  print(text)
  log(f"done: {len(seeds)} seeds in {time.time() - t_start:.0f} s; wrote {args.out}")


if __name__ == "__main__":
  main()
