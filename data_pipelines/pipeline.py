"""grain input pipeline: per-dataset sources → top-down crops and targets → weighted mix → batches.

Every training example, whatever its dataset, has the same static shapes (K_max = the largest
keypoint count over the mixed datasets, 133 with COCO-WholeBody):

  image          [H, W, 3]         f32  normalised RGB crop (NHWC for JAX)
  target         [K_max, Hh, Wh]   f32  Gaussian heatmaps; channels ≥ K_d are zero
  target_weight  [K_max]           f32  1 for labelled, in-crop keypoints of the sample's skeleton
  skeleton_mask  [K_max]           f32  1 for channels that exist in the sample's skeleton
  dataset_index  []                i32  which dataset (= expert, head, prototype range)
  skipped        []                f32  1 if the record's image was unusable (a blank, zero-weight
                                        stand-in; counted by the train loop), else 0

With `TopDownConfig.host_targets=False` (the compact batch, every config's default through
`data.device_targets`) the heatmaps and the normalisation are left to the accelerator
(`device_targets.dataset_targets`, `normalize_on_device`, inside the jitted step) and
`image`/`target`/`target_weight` are replaced by

  image          [H, W, 3]         u8   RGB crop, not normalised (¼ of the float32 bytes)
  joints         [K_max, 2]        f32  keypoints in crop pixels after the affine (0 if padded)
  joint_vis      [K_max]           f32  visibility after flip (0 if padded)

about 150 KB per PoseBH-B sample (256×192 crop, K_max = 133) instead of 2.2 MB.

Order of operations: each source is shuffled and repeated with its own seed, then the sources
are mixed with weights, then augmented with a per-sample RNG (seeded by the global sample index,
so a restored iterator reproduces the same batches), then each host takes its rows of every
global batch (`HostRows`) and batches them with `drop_remainder`. All of this is a
`grain.MapDataset`, so an iterator's state is its position and restores exactly, with or without
worker processes (no `IterDataset`-level mixing needed).

Sources are in-memory record lists or any random-access sequence of the same record dicts (e.g.
`tfds_builders.TfdsRecords` over an ArrayRecord data source), whose records hold either an
`image_path` or the encoded file under `image_bytes`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import cv2
import grain
from absl import flags
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipelines import coco_reader, heatmap_codec, image_files
from data_pipelines import transforms
from data_pipelines.skeletons import SkeletonLayout
ENCODINGS = ("udp", "msra")

# The mesh axes the batch is split over (`posebh_jax.train.sharding.make_mesh` builds them).
BATCH_AXES = ("data", "fsdp")


# One error type and one read-then-decode path for every caller (see `image_files`).
ImageError = image_files.ImageError
_load_bgr = image_files.load_record_bgr


def load_image(record: Mapping[str, Any]) -> np.ndarray:
  """Reads the record's image as RGB uint8 [H, W, 3] (BGR→RGB as mmpose's loader).

  The image comes from `record["image_bytes"]` (encoded file) if present, else from
  `record["image_path"]`.

  Raises:
    ImageError: missing file or undecodable bytes; the message names the file and the record.
  """
  return cv2.cvtColor(_load_bgr(record), cv2.COLOR_BGR2RGB)


# `transforms.normalize_image` of every uint8 value per RGB channel, [256, 1, 3] float32: the same
# float32 operations, done once per value instead of once per pixel.
_NORMALIZE_LUT = np.ascontiguousarray(
    ((np.arange(256, dtype=np.float32)[:, None] / np.float32(255) - transforms.IMAGENET_MEAN)
     / transforms.IMAGENET_STD).astype(np.float32)[:, None, :])


def normalize_on_device(image: jax.Array) -> jax.Array:
  """uint8 RGB crops `[..., 3]` → normalised float32, bit-identical to the host's
  `transforms.normalize_image` (the same float32 table, gathered: no reassociated arithmetic).
  Traceable; element-wise, so it runs sharded with the batch."""
  import jax.numpy as jnp
  lut = jnp.asarray(_NORMALIZE_LUT[:, 0, :].reshape(-1))  # [256·3], value-major.
  return lut[image.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)]


def _normalize_bgr_crop(crop_bgr: np.ndarray) -> np.ndarray:
  """Normalised RGB crop [H, W, 3] float32 from a BGR uint8 crop, bit-identical to
  `transforms.normalize_image` of the RGB crop (a table lookup: ~9× faster).

  Warping is per channel, so warping the BGR image and converting the small crop gives the same
  bytes as converting the whole image first (the reference's order).
  """
  return cv2.LUT(cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2RGB), _NORMALIZE_LUT)


@dataclasses.dataclass(frozen=True)
class TopDownConfig:
  """Static settings of the top-down transform, shared by the train and eval transforms.

  Per-dataset settings are tuples indexed by dataset (the layout's order):
    encodings: "udp" (UDP affine + UDP target) or "msra" (standard affine + MSRA target); spec
      §4.1: UDP for COCO and MPII, MSRA for the others.
    half_body: whether the half-body transform runs for that dataset (the reference has none in
      MPII's pipeline); () = every dataset.
  `host_targets=False` ships the compact batch: uint8 crops and crop-space joints; the
  normalisation and the heatmaps are made on the device (see the module docstring).
  """

  layout: SkeletonLayout
  encodings: tuple[str, ...]
  image_size_hw: tuple[int, int]
  heatmap_size_hw: tuple[int, int]
  sigma: float = 2.0
  flip: bool = True
  half_body_prob: float = 0.3
  num_joints_half_body: int = 8
  scale_factor: float = 0.5
  rot_factor: float = 40.0
  rot_prob: float = 0.6
  half_body: tuple[bool, ...] = ()
  host_targets: bool = True
  # Per dataset: the centre jitter drawn here, per example and epoch (spec §6.15: the reference
  # draws it once when reading the records, `coco_reader.jitter_center`); () = none.
  center_jitter: tuple[bool, ...] = ()
  center_jitter_prob: float = 0.3

  def __post_init__(self):
    d = self.layout.num_datasets
    if len(self.encodings) != d:
      raise ValueError(f"encodings has {len(self.encodings)} entries for {d} datasets")
    bad = [e for e in self.encodings if e not in ENCODINGS]
    if bad:
      raise ValueError(f"unknown encodings {bad}; known: {list(ENCODINGS)}")
    if self.half_body and len(self.half_body) != d:
      raise ValueError(f"half_body has {len(self.half_body)} entries for {d} datasets (or none)")

  @property
  def image_size_wh(self) -> tuple[int, int]:
    return (self.image_size_hw[1], self.image_size_hw[0])

  @property
  def heatmap_size_wh(self) -> tuple[int, int]:
    return (self.heatmap_size_hw[1], self.heatmap_size_hw[0])

  def use_udp(self, dataset_index: int) -> bool:
    return self.encodings[dataset_index] == "udp"

  def use_half_body(self, dataset_index: int) -> bool:
    on = self.half_body[dataset_index] if self.half_body else True
    return bool(on) and self.half_body_prob > 0


class TopDownTrainTransform(grain.transforms.RandomMap):
  """Record → augmented training example (spec §4.4 order: flip, half body, scale/rotation,
  affine, normalise, target, pad)."""

  def __init__(self, cfg: TopDownConfig):
    self.cfg = cfg
    # Per-dataset constants, computed once instead of per sample (the skeleton properties
    # rebuild them on every access: ~5 % of a sample's CPU time).
    self._flip_pairs = tuple(s.flip_pairs for s in cfg.layout.skeletons)
    self._upper_body_ids = tuple(s.upper_body_ids for s in cfg.layout.skeletons)
    self._k_max = cfg.layout.max_keypoints
    self._mask = cfg.layout.skeleton_mask()
    self._mask.flags.writeable = False  # Rows are shared by every example of a dataset.

  def augmented_crop(self, record: Mapping[str, Any], image_bgr: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spec §4.4 steps 2–5 on a decoded image.

    Args:
      record: the instance record (keypoints [K, 3], center [2], scale [2], dataset_index).
      image_bgr: [H_img, W_img, 3] uint8, the record's image as OpenCV decodes it.
      rng: the sample's generator; draws in the reference's order (flip, half body,
        scale/rotation; see the `transforms` functions).

    Returns:
      crop [H, W, 3] uint8 BGR, joints [K, 2] float32 crop pixels, visibility [K] float32.
    """
    cfg = self.cfg
    d = int(record["dataset_index"])
    joints = record["keypoints"][:, :2].astype(np.float32)
    vis = record["keypoints"][:, 2].astype(np.float32)
    center = record["center"].astype(np.float32)
    scale = record["scale"].astype(np.float32)
    if cfg.flip:
      # random_flip needs only the width from the image: give it one row and mirror the whole
      # image with cv2.flip (same pixels as numpy's reversed copy, ~20x faster).
      _, joints, vis, center, flipped = transforms.random_flip(
          image_bgr[:1], joints, vis, center, self._flip_pairs[d], rng)
      if flipped:
        image_bgr = cv2.flip(image_bgr, 1)
    if cfg.use_half_body(d):
      hb = transforms.half_body_center_scale(
          joints, vis, self._upper_body_ids[d], cfg.image_size_wh[0] / cfg.image_size_wh[1], rng,
          num_joints_half_body=cfg.num_joints_half_body, prob_half_body=cfg.half_body_prob)
      if hb is not None:
        center, scale = hb
    scale, rot = transforms.random_scale_rotation(
        scale, rng, scale_factor=cfg.scale_factor, rot_factor=cfg.rot_factor,
        rot_prob=cfg.rot_prob)
    crop, joints, _ = transforms.top_down_affine(
        image_bgr, joints, vis, center, scale, rot, cfg.image_size_wh, cfg.use_udp(d))
    return crop, joints, vis

  def example(self, d: int, crop_bgr: np.ndarray, joints: np.ndarray, vis: np.ndarray
              ) -> dict[str, Any]:
    """Crop and crop-space joints of dataset d → the padded training example (steps 6–7)."""
    cfg = self.cfg
    k_max = self._k_max
    out = dict(skeleton_mask=self._mask[d], dataset_index=np.int32(d))
    if cfg.host_targets:
      out["image"] = _normalize_bgr_crop(crop_bgr)
      make_target = heatmap_codec.udp_target if cfg.use_udp(d) else heatmap_codec.msra_target
      out["target"], out["target_weight"] = make_target(
          joints, vis, cfg.image_size_wh, cfg.heatmap_size_wh, sigma=cfg.sigma,
          num_channels=k_max)
    else:
      out["image"] = cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2RGB)
      k = len(vis)
      out["joints"] = np.zeros((k_max, 2), np.float32)
      out["joints"][:k] = joints
      out["joint_vis"] = np.zeros((k_max,), np.float32)
      out["joint_vis"][:k] = vis
    return out

  def skipped_example(self, d: int) -> dict[str, Any]:
    """The stand-in for a record whose image is unusable: a blank crop that teaches nothing
    (zero heatmaps and weights, so no heatmap loss and no prototype pixel) with `skipped` = 1.

    Batches keep their static shape; the train loop counts the skips (`skipped`).
    """
    cfg = self.cfg
    k = cfg.layout.skeletons[d].num_keypoints
    crop = np.zeros((*cfg.image_size_hw, 3), np.uint8)
    out = self.example(d, crop, np.zeros((k, 2), np.float32), np.zeros((k,), np.float32))
    out["image"] = np.zeros_like(out["image"])
    out["skipped"] = np.float32(1)
    return out

  def random_map(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """One training example (see the module docstring), with `skipped` [] f32: 0, or 1 where the
    record's image is missing, undecodable or not its annotated size (logged with the file;
    the example is `skipped_example`). Training never stops on one bad file; the loop stops
    at `data.max_bad_images`."""
    d = int(record["dataset_index"])
    try:
      image = _load_bgr(record)
    except ImageError as e:
      logging.getLogger("posebh").warning("skipping a training sample: %s", e)
      return self.skipped_example(d)
    if self.cfg.center_jitter and self.cfg.center_jitter[d]:
      record = coco_reader.jitter_center_from(dict(record), rng, self.cfg.center_jitter_prob)
    crop, joints, vis = self.augmented_crop(record, image, rng)
    out = self.example(d, crop, joints, vis)
    out["skipped"] = np.float32(0)
    return out


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
    use_udp = cfg.use_udp(d) if self.use_udp is None else self.use_udp
    trans = transforms.crop_matrix(
        record["center"], record["scale"], 0.0, cfg.image_size_wh, use_udp)
    crop = transforms.warp_image(_load_bgr(record), trans, cfg.image_size_wh)
    return dict(
        image=_normalize_bgr_crop(crop), dataset_index=np.int32(d),
        center=record["center"].astype(np.float32), scale=record["scale"].astype(np.float32),
        bbox=record["bbox"].astype(np.float32), image_id=np.int64(record["image_id"]),
        ann_id=np.int64(record["ann_id"]))


def host_shard(source: grain.MapDataset, *, seed: int, process_index: int, process_count: int
               ) -> grain.MapDataset:
  """One host's infinite share of a source: shuffled per epoch, repeated, strided by host.

  Every host computes the same permutation of the whole source each epoch (`seed + epoch`) and
  takes positions `process_index, process_index + process_count, …` of the repeated stream,
  like the reference's DistributedSampler (spec §4.1): within an epoch the hosts' records are
  disjoint and together cover the source. Each source is split before mixing: striding the
  mixed stream would alias with the mixer's deterministic interleave.
  """
  return source.seed(seed).shuffle().repeat()[process_index::process_count]


def mixed_records(
    sources: Sequence[Sequence[Mapping[str, Any]]],
    weights: Sequence[float] | None,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
  """The infinite, mixed stream of one host's (un-augmented) records.

  Args:
    sources: per dataset, a list or random-access sequence of records (e.g. a TFDS data source
      wrapper); never copied.
    weights: per dataset, the mixing weight (grain normalises them and interleaves
      deterministically in these proportions); None = proportional to the source sizes, the
      reference's uniform sampling over the concatenated datasets (spec §4.1). A dataset with
      weight 0 and no records (an evaluation-only entry) is left out of the mix.
    seed: base seed; source d is shuffled with `seed + 1000·(d + 1)`.
    process_index, process_count: this host's share of every source.

  Returns:
    A `grain.MapDataset` of records (length: effectively infinite).
  """
  if weights is None:
    weights = [len(s) for s in sources]
  if len(sources) != len(weights):
    raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
  parts, kept_weights = [], []
  for d, records in enumerate(sources):
    source = grain.MapDataset.source(records)
    if weights[d] == 0 and len(source) == 0:
      continue  # Evaluation only: its head is evaluated, not trained.
    if len(source) == 0:
      raise ValueError(f"dataset {d} has no records")
    if weights[d] <= 0:
      raise ValueError(f"dataset {d}: mixing weight {weights[d]} must be positive")
    parts.append(host_shard(source, seed=seed + 1000 * (d + 1), process_index=process_index,
                            process_count=process_count))
    kept_weights.append(weights[d])
  if not parts:
    raise ValueError("no dataset has training records")
  return grain.MapDataset.mix(parts, kept_weights)


class HostRows(grain.MapDataset):
  """This host's rows of every global batch of an (augmented) global sample stream.

  Element `j` is global sample `(j // L)·G + rows[j % L]` (G = global batch size, L = len(rows)),
  so batching this dataset by L gives this host's slice of global batch `j // L`. The samples,
  their order and their augmentation (per-index RNG of the parent) are those of the global stream
  whatever the number of hosts: N hosts together feed exactly the batches one host would.
  """

  def __init__(self, parent: grain.MapDataset, global_batch_size: int, rows: Sequence[int]):
    super().__init__(parent)
    rows = [int(r) for r in rows]
    if not rows or min(rows) < 0 or max(rows) >= global_batch_size or len(set(rows)) != len(rows):
      raise ValueError(f"host rows {rows} are not distinct rows of a global batch of "
                       f"{global_batch_size}")
    self._g, self._rows = global_batch_size, rows

  def __len__(self) -> int:
    return (len(self._parent) // self._g) * len(self._rows)

  def __str__(self) -> str:
    return f"HostRows(global_batch_size={self._g}, rows={len(self._rows)})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    q, r = divmod(index, len(self._rows))
    return self._parent[q * self._g + self._rows[r]]


def mixed_train_dataset(
    sources: Sequence[Sequence[Mapping[str, Any]]],
    weights: Sequence[float] | None,
    cfg: TopDownConfig,
    *,
    batch_size: int,
    seed: int,
    rows: Sequence[int] | None = None,
) -> grain.MapDataset:
  """Builds the infinite, mixed, batched training dataset: the global batches, or one host's rows
  of them.

  The global sample stream (mix of the shuffled, repeated sources; augmentation seeded by
  `(seed, global sample index)`) is a function of the config alone. Each host materialises only
  `rows` of each global batch (`HostRows`), so the sequence of global batches does not depend on
  the number of processes (2 hosts × 2 devices train on the batches of 1 host × 4 devices), and
  a resumed job may change its host count without changing the data.

  Args:
    sources: per dataset, its records (list or random-access sequence; see `mixed_records`).
    weights: per dataset, the mixing weight; None = proportional to the source sizes.
    cfg: transform settings.
    batch_size: the GLOBAL batch size.
    seed: base seed (shuffling: see `mixed_records`; augmentation: `seed` and the sample index).
    rows: this host's rows of each global batch (`host_batch_rows`); None = all of them.

  Returns:
    A `grain.MapDataset` of batches of `len(rows)` examples (dicts of stacked arrays, see the
    module docstring).
  """
  augmented = mixed_records(sources, weights, seed=seed).seed(seed).random_map(
      TopDownTrainTransform(cfg))
  if rows is None or list(rows) == list(range(batch_size)):
    return augmented.batch(batch_size, drop_remainder=True)
  return HostRows(augmented, batch_size, rows).batch(len(rows), drop_remainder=True)


def make_iterator(dataset: grain.MapDataset, *, num_workers: int = 0, prefetch: int = 2
                  ) -> grain.DatasetIterator:
  """An iterator whose `get_state()`/`set_state()` the checkpoint manager saves and restores.

  Raises:
    RuntimeError: `num_workers > 0` before absl's flags are parsed. grain's worker processes read
      its absl flags, and parsing them is the application's business (the CLIs run under
      `absl.app.run`; a notebook or test calls `absl.flags.FLAGS.mark_as_parsed()` first).
  """
  it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      raise RuntimeError(
          f"data.num_workers={num_workers}: grain's worker processes read absl flags, which are "
          "not parsed in this process; run under absl.app.run (posebh-train) or call "
          "absl.flags.FLAGS.mark_as_parsed() first (or use data.num_workers=0)")
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The one batch sharding, for placement and compute: the leading (batch) axis split over
  every device of the mesh (`data` × `fsdp`, `BATCH_AXES`; a plain ('data',) mesh works too), the
  rest replicated. Used both to place the batch (`to_global_batch`, `host_batch_rows`) and to
  compute on it (`posebh_jax.train.step.make_train_step`), so every row a host feeds reaches the
  loss exactly once.

  Placing with the axes the step computes with matters: placed on `data` alone, a `data=1`
  mesh would take one host's rows as the whole global batch (rows of the other hosts lost), and
  within one host each device would receive `fsdp`× the rows it computes on.
  """
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def host_batch_rows(global_batch_size: int, mesh: jax.sharding.Mesh) -> list[int]:
  """The rows of each global batch that this process feeds (`to_global_batch`'s local rows).

  The union of the batch ranges of this process's devices under `batch_sharding`, in order,
  which is the order `jax.make_array_from_process_local_data` expects its local rows in.
  """
  indices = batch_sharding(mesh).devices_indices_map((global_batch_size,))
  rows = set()
  for device, index in indices.items():
    if device.process_index == jax.process_index():
      rows.update(range(*index[0].indices(global_batch_size)))
  if not rows:
    raise ValueError(f"process {jax.process_index()} holds no device of the mesh "
                     f"{dict(mesh.shape)}")
  return sorted(rows)


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
                    ) -> dict[str, jax.Array]:
  """Assembles the global batch from this host's rows (`host_batch_rows`), placed on the mesh
  with `batch_sharding`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
