"""grain input pipeline: per-dataset sources → top-down crops and targets → weighted mix → batches.

Every training example, whatever its dataset, has the same static shapes (K_max = the largest
keypoint count over the mixed datasets):

  image          [H, W, 3]         f32  normalised RGB crop (NHWC for JAX)
  target         [K_max, Hh, Wh]   f32  Gaussian heatmaps; channels ≥ K_d are zero
  target_weight  [K_max]           f32  1 for labelled, in-crop keypoints of the sample's skeleton
  skeleton_mask  [K_max]           f32  1 for channels that exist in the sample's skeleton
  dataset_index  []                i32  which dataset (= expert, head, prototype range)

Order of operations follows grain's advice: each source is sharded by host, shuffled and repeated
with its own seed, then the sources are mixed with weights, then augmented with a per-record RNG
(so a restored iterator reproduces the same batches), then batched with `drop_remainder`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import cv2
import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipelines import transforms
from data_pipelines.skeletons import SkeletonInfo, SkeletonLayout


class ImageError(IOError):
  """An image that is missing or cannot be decoded; names the file and the record."""


def load_image(record: Mapping[str, Any]) -> np.ndarray:
  """Reads the record's image as RGB uint8 [H, W, 3] (BGR→RGB as mmpose's loader)."""
  path = record["image_path"]
  image = cv2.imread(path, cv2.IMREAD_COLOR)
  if image is None:
    raise ImageError(
        f"cannot read image {path} (dataset {record['dataset_index']}, image_id "
        f"{record['image_id']}, ann_id {record['ann_id']}): missing or corrupt file")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclasses.dataclass(frozen=True)
class TopDownConfig:
  """Static settings of the top-down transform, shared by the train and eval transforms."""

  layout: SkeletonLayout
  encodings: tuple[str, ...]  # Per dataset: "udp" or "msra".
  image_size_hw: tuple[int, int]
  heatmap_size_hw: tuple[int, int]
  sigma: float = 2.0
  flip: bool = True
  half_body_prob: float = 0.3
  num_joints_half_body: int = 8
  scale_factor: float = 0.5
  rot_factor: float = 40.0
  rot_prob: float = 0.6

  @property
  def image_size_wh(self) -> tuple[int, int]:
    return (self.image_size_hw[1], self.image_size_hw[0])

  @property
  def heatmap_size_wh(self) -> tuple[int, int]:
    return (self.heatmap_size_hw[1], self.heatmap_size_hw[0])

  def use_udp(self, dataset_index: int) -> bool:
    return self.encodings[dataset_index] == "udp"


def _pad_example(cfg: TopDownConfig, d: int, target: np.ndarray, weight: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  k_max = cfg.layout.max_keypoints
  k = target.shape[0]
  tgt = np.zeros((k_max,) + target.shape[1:], np.float32)
  tgt[:k] = target
  w = np.zeros((k_max,), np.float32)
  w[:k] = weight
  return tgt, w, cfg.layout.skeleton_mask()[d]


class TopDownTrainTransform(grain.transforms.RandomMap):
  """Record → augmented training example (spec §4.4 order: flip, half body, scale/rotation,
  affine, normalise, target, pad)."""

  def __init__(self, cfg: TopDownConfig):
    self.cfg = cfg

  def random_map(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    cfg = self.cfg
    d = int(record["dataset_index"])
    skeleton: SkeletonInfo = cfg.layout.skeletons[d]
    use_udp = cfg.use_udp(d)
    image = load_image(record)
    joints = record["keypoints"][:, :2].astype(np.float32)
    vis = record["keypoints"][:, 2].astype(np.float32)
    center = record["center"].astype(np.float32)
    scale = record["scale"].astype(np.float32)
    if cfg.flip:
      image, joints, vis, center, _ = transforms.random_flip(
          image, joints, vis, center, skeleton.flip_pairs, rng)
    if cfg.half_body_prob > 0:
      hb = transforms.half_body_center_scale(
          joints, vis, skeleton.upper_body_ids, cfg.image_size_wh[0] / cfg.image_size_wh[1], rng,
          num_joints_half_body=cfg.num_joints_half_body, prob_half_body=cfg.half_body_prob)
      if hb is not None:
        center, scale = hb
    scale, rot = transforms.random_scale_rotation(
        scale, rng, scale_factor=cfg.scale_factor, rot_factor=cfg.rot_factor,
        rot_prob=cfg.rot_prob)
    crop, joints, _ = transforms.top_down_affine(
        image, joints, vis, center, scale, rot, cfg.image_size_wh, use_udp)
    make_target = transforms.udp_target if use_udp else transforms.msra_target
    target, weight = make_target(
        joints, vis, cfg.image_size_wh, cfg.heatmap_size_wh, sigma=cfg.sigma)
    target, weight, mask = _pad_example(cfg, d, target, weight)
    return dict(
        image=transforms.normalize_image(crop), target=target, target_weight=weight,
        skeleton_mask=mask, dataset_index=np.int32(d))


class TopDownEvalTransform(grain.transforms.Map):
  """Record → un-augmented crop plus what decoding and metrics need (spec §4.5).

  `use_udp` overrides the record's dataset encoding: to predict dataset a's skeleton on another
  dataset's images, crop the way a's head was trained.
  """

  def __init__(self, cfg: TopDownConfig, use_udp: bool | None = None):
    self.cfg = cfg
    self.use_udp = use_udp

  def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
    cfg = self.cfg
    d = int(record["dataset_index"])
    image = load_image(record)
    use_udp = cfg.use_udp(d) if self.use_udp is None else self.use_udp
    trans = transforms.crop_matrix(
        record["center"], record["scale"], 0.0, cfg.image_size_wh, use_udp)
    crop = transforms.warp_image(image, trans, cfg.image_size_wh)
    return dict(
        image=transforms.normalize_image(crop), dataset_index=np.int32(d),
        center=record["center"].astype(np.float32), scale=record["scale"].astype(np.float32),
        bbox=record["bbox"].astype(np.float32), image_id=np.int64(record["image_id"]),
        ann_id=np.int64(record["ann_id"]))


def mixed_train_dataset(
    sources: Sequence[Sequence[Mapping[str, Any]]],
    weights: Sequence[float],
    cfg: TopDownConfig,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
  """Builds the infinite, mixed, batched training dataset of one host.

  Args:
    sources: per dataset, its list of records.
    weights: per dataset, the mixing weight (normalised by grain).
    cfg: transform settings.
    batch_size: per-host batch size.
    seed: base seed; source d is shuffled with `seed + d`, augmentation uses `seed`.
    process_index, process_count: this host's shard of every source.

  Returns:
    A `grain.MapDataset` of batches (dicts of stacked arrays).
  """
  if len(sources) != len(weights):
    raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
  parts = []
  for d, records in enumerate(sources):
    # Shard each source by host before mixing: striding the mixed stream instead would alias
    # with the mixer's deterministic interleave and give a host only some of the datasets.
    shard = grain.MapDataset.source(list(records))[process_index::process_count]
    if len(shard) == 0:
      raise ValueError(f"dataset {d} has no records for host {process_index}/{process_count}")
    parts.append(shard.seed(seed + 1000 * (d + 1)).shuffle().repeat())
  mixed = grain.MapDataset.mix(parts, list(weights))
  return (mixed.seed(seed + 7 * process_index).random_map(TopDownTrainTransform(cfg))
          .batch(batch_size, drop_remainder=True))


def make_iterator(dataset: grain.MapDataset, *, num_workers: int = 0, prefetch: int = 2
                  ) -> grain.DatasetIterator:
  """An iterator whose `get_state()`/`set_state()` the checkpoint manager saves and restores."""
  it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh's data axis; everything else replicated."""
  return NamedSharding(mesh, P("data"))


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
                    ) -> dict[str, jax.Array]:
  """Assembles the global batch from this host's slice, placed on the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
