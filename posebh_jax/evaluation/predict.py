"""Top-down prediction: crops → keypoints on device, and the batched host driver around it.

For a skeleton a (= dataset a), the model runs with expert a; the heatmaps of a's keypoints come
either from head a (`through="head"`, the reference's per-dataset inference, spec §5.1) or from
the prototype heatmaps of a's global keypoint range (`through="prototypes"`, spec §2.4: the
prototype embedding × the keypoint prototypes, any skeleton from one embedding space). With the
flip test (spec §5.2) the W-flipped crops run in the same forward pass, their heatmaps are
flipped back with a's flip pairs and, for a standard (non-UDP) encoding, shifted right by one
pixel; the two are averaged. Decoding (spec §5.3) follows a's encoding too: DARK-UDP + UDP
back-projection for "udp" datasets (COCO, MPII), argmax + quarter offset + standard
back-projection for the others. Everything from the crops to image-space keypoints is one jitted
function with static shapes, compiled once per (skeleton, route, flip) for a fixed batch size.

The host side (`TopDownPredictor.predict_records`) splits the records between processes
(each predicts a disjoint share; the predictions are gathered), reads each image once for all its
consecutive records, crops with a's affine (UDP or standard, exactly as `TopDownEvalTransform`),
pads the last batch, and overlaps the host work of one batch with the device work of the
previous one (JAX dispatch is asynchronous).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from data_pipelines import pipeline, transforms
from data_pipelines import heatmap_codec
from posebh_jax.objective.prototypes import prototype_heatmap
from posebh_jax.train import distributed

ROUTES = ("head", "prototypes")
DARK_KERNEL = 11  # `test_cfg.modulate_kernel` of every PoseBH benchmark (spec §5.1).


@dataclasses.dataclass(frozen=True)
class SkeletonDecoding:
  """How skeleton a's heatmaps are made, flipped and decoded (spec §5.1, §5.2).

  Attributes:
    index: dataset index a (its expert, head and prototype range).
    num_keypoints: K_a.
    keypoint_offset: global id of a's keypoint 0 in the prototype table.
    flip_pairs: a's mirrored keypoint pairs.
    use_udp: a's encoding is UDP (UDP crop, DARK-UDP decode, no heatmap shift); otherwise
      standard crop, 'default' decode and `shift_heatmap` after the flip.
    image_size_wh: crop (W, H).
    heatmap_size_wh: heatmap (W, H).
  """
  index: int
  num_keypoints: int
  keypoint_offset: int
  flip_pairs: tuple[tuple[int, int], ...]
  use_udp: bool
  image_size_wh: tuple[int, int]
  heatmap_size_wh: tuple[int, int]

  @property
  def shift_heatmap(self) -> bool:
    return not self.use_udp


def skeleton_decoding(td_cfg: pipeline.TopDownConfig, a: int) -> SkeletonDecoding:
  """Skeleton a's settings, derived from the per-dataset `encoding` of the config."""
  layout = td_cfg.layout
  if not 0 <= a < layout.num_datasets:
    raise ValueError(f"skeleton index {a} out of range (the config has {layout.num_datasets} "
                     "datasets)")
  return SkeletonDecoding(
      index=a, num_keypoints=layout.num_keypoints[a], keypoint_offset=layout.offsets[a],
      flip_pairs=layout.skeletons[a].flip_pairs, use_udp=td_cfg.use_udp(a),
      image_size_wh=td_cfg.image_size_wh, heatmap_size_wh=td_cfg.heatmap_size_wh)


def _check_route(through: str) -> None:
  if through not in ROUTES:
    raise ValueError(f"through={through!r}; expected one of {ROUTES}")


def predicted_heatmaps(model: nn.Module, dec: SkeletonDecoding, params: Any, batch_stats: Any,
                       prototypes: jax.Array | None, crops: jax.Array, *, through: str = "head",
                       flip_test: bool = True, expert: int | None = None) -> jax.Array:
  """Skeleton a's heatmaps of normalised crops, flip test included (spec §5.2). Traceable.

  Args:
    model: the `PoseBHModel`.
    dec: skeleton a's settings.
    params, batch_stats: the model's variables.
    prototypes: `[J, M, E]` keypoint prototypes (only read with `through="prototypes"`).
    crops: `[B, H, W, 3]` normalised crops (cropped with a's affine).
    through: "head" (head a) or "prototypes" (prototype heatmaps of a's keypoints).
    flip_test: average with the flipped-back heatmaps of the W-flipped crops.
    expert: MoE expert to run the backbone with; default a.

  Returns:
    `[B, K_a, Hh, Wh]` float32 heatmaps.
  """
  _check_route(through)
  b = crops.shape[0]
  if flip_test:  # One forward over [crops; flipped crops]: BN runs on running statistics.
    crops = jnp.concatenate([crops, crops[:, :, ::-1]], axis=0)
  expert = dec.index if expert is None else expert
  dataset_index = jnp.full((crops.shape[0],), expert, jnp.int32)
  out = model.apply({"params": params, "batch_stats": batch_stats}, crops, dataset_index,
                    train=False)
  if through == "head":
    heatmaps = out.heatmaps[dec.index]  # XLA drops the heads that are not read.
  else:
    if out.embedding is None or prototypes is None:
      raise ValueError("through='prototypes' needs a model with a prototype head and prototypes")
    own = prototypes[dec.keypoint_offset:dec.keypoint_offset + dec.num_keypoints]
    heatmaps = prototype_heatmap(out.embedding, own)
  heatmaps = heatmaps.astype(jnp.float32)
  if not flip_test:
    return heatmaps
  return merge_flipped(dec, heatmaps[:b], heatmaps[b:])


def merge_flipped(dec: SkeletonDecoding, heatmaps: jax.Array, flipped: jax.Array) -> jax.Array:
  """Spec §5.2 steps 3–5: flip back with a's pairs, shift if standard, average. Traceable.

  Args:
    dec: skeleton a's settings.
    heatmaps: `[B, K_a, Hh, Wh]` heatmaps of the crops.
    flipped: `[B, K_a, Hh, Wh]` heatmaps of the W-flipped crops.

  Returns:
    `[B, K_a, Hh, Wh]` flip-test heatmaps.
  """
  flipped = heatmap_codec.flip_back(flipped, dec.flip_pairs)
  if dec.shift_heatmap:
    flipped = heatmap_codec.shift_heatmap_right(flipped)
  return (heatmaps + flipped) * 0.5


def heatmaps_to_keypoints(dec: SkeletonDecoding, heatmaps: jax.Array, center: jax.Array,
                          scale: jax.Array) -> jax.Array:
  """Decodes with a's encoding and maps back to the image (spec §5.3). Traceable.

  Args:
    dec: skeleton a's settings.
    heatmaps: `[B, K_a, Hh, Wh]`.
    center: `[B, 2]` box centres (image px).
    scale: `[B, 2]` box sizes / 200.

  Returns:
    `[B, K_a, 3]` float32 (x, y, score) in image pixels; score = the raw heatmap maximum.
  """
  coords, maxvals = heatmap_codec.decode_heatmaps_jax(heatmaps, center, scale, use_udp=dec.use_udp,
                                               post_process="default", kernel=DARK_KERNEL)
  return jnp.concatenate([coords, maxvals], axis=-1)


def predict_keypoints(model: nn.Module, dec: SkeletonDecoding, params: Any, batch_stats: Any,
                      prototypes: jax.Array | None, crops: jax.Array, center: jax.Array,
                      scale: jax.Array, *, through: str = "head", flip_test: bool = True,
                      expert: int | None = None) -> jax.Array:
  """Crops → image keypoints of skeleton a: forward, flip test, decode. Traceable.

  Args: as `predicted_heatmaps` plus `center`, `scale` `[B, 2]` of each crop's box.

  Returns:
    `[B, K_a, 3]` float32 (x, y, score) in image pixels.
  """
  heatmaps = predicted_heatmaps(model, dec, params, batch_stats, prototypes, crops,
                                through=through, flip_test=flip_test, expert=expert)
  return heatmaps_to_keypoints(dec, heatmaps, center, scale)


def make_predict_fn(model: nn.Module, dec: SkeletonDecoding, *, through: str = "head",
                    flip_test: bool = True, expert: int | None = None) -> Callable[..., jax.Array]:
  """The jitted `fn(params, batch_stats, prototypes, crops, center, scale) -> [B, K_a, 3]`."""
  _check_route(through)

  def fn(params, batch_stats, prototypes, crops, center, scale):
    return predict_keypoints(model, dec, params, batch_stats, prototypes, crops, center, scale,
                             through=through, flip_test=flip_test, expert=expert)
  return jax.jit(fn)


def crop_instance(image: np.ndarray, center: np.ndarray, scale: np.ndarray,
                  dec: SkeletonDecoding) -> np.ndarray:
  """The normalised crop of one box with a's affine (as `TopDownEvalTransform`, rotation 0).

  Args:
    image: `[H_img, W_img, 3]` uint8 RGB.
    center: `[2]` float32 box centre; scale: `[2]` float32 box size / 200.
    dec: skeleton a's settings (crop size, UDP or standard affine).

  Returns:
    `[H, W, 3]` float32 normalised crop.
  """
  trans = transforms.crop_matrix(center, scale, 0.0, dec.image_size_wh, dec.use_udp)
  return transforms.normalize_image(transforms.warp_image(image, trans, dec.image_size_wh))


def prediction_record(record: Mapping[str, Any], keypoints: np.ndarray, index: int
                      ) -> dict[str, Any]:
  """One instance's prediction in the form the COCO-style metrics consume (spec §5.3 step 5).

  Keys: image_id, category_id (record's, default 1), keypoints `[K, 3]`, center `[2]`,
  scale `[2]`, area = s_x·s_y·200², bbox_score (record's, default 1), bbox_id (record's, default
  its position `index`), plus ann_id and bbox when the record has them.
  """
  center = np.asarray(record["center"], np.float32)
  scale = np.asarray(record["scale"], np.float32)
  out = dict(
      image_id=int(record["image_id"]), category_id=int(record.get("category_id", 1)),
      keypoints=np.asarray(keypoints, np.float32), center=center, scale=scale,
      area=float(scale[0] * scale[1] * 200.0**2),
      bbox_score=float(record.get("bbox_score", 1.0)),
      bbox_id=int(record.get("bbox_id", index)))
  for key in ("ann_id", "bbox", "image_path"):
    if key in record:
      out[key] = record[key]
  return out


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global order, as numpy.

  On one process this is the whole array; on several it is the rows that this process fed
  (`pipeline.host_batch_rows`): each row range is taken once, however many devices replicate it.
  """
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  shards = {}
  for s in x.addressable_shards:
    start = s.index[0].start or 0
    shards.setdefault(start, s.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def process_share(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, stop) of process `process_index`'s contiguous share of n instances (the first
  processes take one more when n does not divide; consecutive records of an image stay on one
  host except at the share boundaries)."""
  per, extra = divmod(n, process_count)
  start = process_index * per + min(process_index, extra)
  return start, start + per + (process_index < extra)


class TopDownPredictor:
  """Batched top-down prediction for every (skeleton, route) of one model.

  Holds one jitted predict function per (skeleton a, route, expert); each compiles once for the
  fixed `batch_size` (the last batch is padded). With a `mesh`, batches are split over all its
  devices (`pipeline.batch_sharding`; the variables must then be placed on the mesh, e.g.
  replicated or FSDP-sharded).

  On several processes (`jax.process_count() > 1`), `predict_records` gives each process a
  disjoint contiguous share of the records: each feeds its rows of every global batch (padded
  with masked rows to the same number of batches on every host, so the shapes stay static and
  the collectives line up), then the predictions are gathered (`process_allgather`) so that
  every process returns all of them in record order: the metrics equal a single-process run.
  """

  def __init__(self, model: nn.Module, td_cfg: pipeline.TopDownConfig, *, batch_size: int,
               flip_test: bool = True, mesh: Mesh | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if mesh is not None and batch_size % mesh.devices.size:
      raise ValueError(f"batch size {batch_size} is not divisible by {mesh.devices.size} devices")
    self.model, self.td_cfg, self.mesh = model, td_cfg, mesh
    self.batch_size, self.flip_test = batch_size, flip_test
    # Rows this process feeds per global batch (all of them on one process).
    self.local_batch_size = (batch_size if mesh is None else
                             len(pipeline.host_batch_rows(batch_size, mesh)))
    self._fns: dict[tuple[int, str, int | None], Callable[..., jax.Array]] = {}
    self._compiled: dict[tuple[int, str, int | None], Any] = {}  # Multi-process: AOT, see below.

  def decoding(self, a: int) -> SkeletonDecoding:
    return skeleton_decoding(self.td_cfg, a)

  def predict_fn(self, a: int, through: str = "head", expert: int | None = None
                 ) -> Callable[..., jax.Array]:
    """The jitted predict function of (a, route, expert), built on first use."""
    key = (a, through, expert)
    if key not in self._fns:
      self._fns[key] = make_predict_fn(self.model, self.decoding(a), through=through,
                                       flip_test=self.flip_test, expert=expert)
    return self._fns[key]

  def _device_batch(self, crops: np.ndarray, center: np.ndarray, scale: np.ndarray
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pads this host's rows to the local batch size and places the global batch (split over
    the mesh if any)."""
    n, bs = len(crops), self.local_batch_size
    if n < bs:  # Padding rows: zero crops and unit boxes, dropped after decoding.
      crops = np.concatenate([crops, np.zeros((bs - n,) + crops.shape[1:], crops.dtype)])
      center = np.concatenate([center, np.zeros((bs - n, 2), np.float32)])
      scale = np.concatenate([scale, np.ones((bs - n, 2), np.float32)])
    if self.mesh is None:
      return jnp.asarray(crops), jnp.asarray(center), jnp.asarray(scale)
    b = pipeline.to_global_batch(dict(crops=crops, center=center, scale=scale), self.mesh)
    return b["crops"], b["center"], b["scale"]

  def predict_crops(self, params: Any, batch_stats: Any, prototypes: jax.Array | None,
                    batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], a: int, *,
                    through: str = "head", expert: int | None = None) -> np.ndarray:
    """Keypoints `[N, K_a, 3]` of host batches (crops `[n, H, W, 3]`, center, scale `[n, 2]`).

    Each batch holds at most `local_batch_size` instances (this process's rows of a global
    batch; = `batch_size` on one process). On several processes every process must pass the
    same number of batches (each is one collective step). The next batch is prepared on the
    host while the device works on the current one.
    """
    fn = self.predict_fn(a, through, expert)
    outs, pending = [], None
    for crops, center, scale in batches:
      if len(crops) > self.local_batch_size:
        raise ValueError(f"a batch of {len(crops)} crops exceeds this process's batch size "
                         f"{self.local_batch_size}")
      args = (params, batch_stats, prototypes, *self._device_batch(crops, center, scale))
      if pending is None and jax.process_count() > 1:
        # Hosts compile at different speeds: compile first, then meet at a barrier that waits
        # long, so that the first collective (gloo on CPU: 30 s) finds every peer there.
        key = (a, through, expert)
        if key not in self._compiled:
          self._compiled[key] = fn.lower(*args).compile()
        fn = self._compiled[key]
        distributed.barrier(f"predict {a} {through} {expert}")
      result = fn(*args)
      if pending is not None:
        outs.append(local_rows(pending[0])[:pending[1]])
      pending = (result, len(crops))
    if pending is not None:
      outs.append(local_rows(pending[0])[:pending[1]])
    if not outs:
      return np.zeros((0, self.td_cfg.layout.num_keypoints[a], 3), np.float32)
    return np.concatenate(outs)

  def record_batches(self, records: Sequence[Mapping[str, Any]], a: int,
                     num_batches: int | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Host batches (of `local_batch_size`) of `records` cropped for skeleton a; each image is
    read once per run of consecutive records that share it. `num_batches`: pad with empty
    batches up to this count (every process must step the same number of times)."""
    dec = self.decoding(a)
    cached_path, image = None, None
    bs, count = self.local_batch_size, 0
    for start in range(0, len(records), bs):
      chunk = records[start:start + bs]
      crops, centers, scales = [], [], []
      for record in chunk:
        if "image_path" not in record or record["image_path"] != cached_path:
          # `load_image` names the record in its error; inference records need no dataset.
          image = pipeline.load_image({"dataset_index": a, **record})
          cached_path = record.get("image_path")
        center = np.asarray(record["center"], np.float32)
        scale = np.asarray(record["scale"], np.float32)
        crops.append(crop_instance(image, center, scale, dec))
        centers.append(center)
        scales.append(scale)
      count += 1
      yield np.stack(crops), np.stack(centers), np.stack(scales)
    w, h = dec.image_size_wh
    while num_batches is not None and count < num_batches:
      count += 1
      yield (np.zeros((0, h, w, 3), np.float32), np.zeros((0, 2), np.float32),
             np.zeros((0, 2), np.float32))

  def predict_records(self, params: Any, batch_stats: Any, prototypes: jax.Array | None,
                      records: Sequence[Mapping[str, Any]], a: int, *, through: str = "head",
                      expert: int | None = None) -> list[dict[str, Any]]:
    """Skeleton a's predictions for every record (dicts with image_path, center, scale,
    image_id, ann_id, bbox and optionally bbox_score, category_id, bbox_id).

    On several processes each predicts its `process_share` and all predictions are gathered:
    every process returns the same list.

    Returns:
      One `prediction_record` per input record, in order.
    """
    n, nproc = len(records), jax.process_count()
    if self.mesh is None or nproc == 1:
      keypoints = self.predict_crops(params, batch_stats, prototypes,
                                     self.record_batches(records, a), a, through=through,
                                     expert=expert)
    else:
      shares = [process_share(n, p, nproc) for p in range(nproc)]
      start, stop = shares[jax.process_index()]
      steps = -(-max(hi - lo for lo, hi in shares) // self.local_batch_size)
      mine = self.predict_crops(params, batch_stats, prototypes,
                                self.record_batches(records[start:stop], a, steps), a,
                                through=through, expert=expert)
      keypoints = gather_shares(mine, shares)
    return [prediction_record(r, k, i) for i, (r, k) in enumerate(zip(records, keypoints))]


def gather_shares(mine: np.ndarray, shares: Sequence[tuple[int, int]]) -> np.ndarray:
  """Every process's share (`[n_p, ...]`, n_p = stop - start of `shares[p]`) → all of them in
  order, on every process (one `process_allgather` of equal-size padded arrays)."""
  from jax.experimental import multihost_utils
  distributed.barrier("gather predictions")  # Shares of unequal host work: meet first.
  longest = max(hi - lo for lo, hi in shares)
  padded = np.zeros((longest,) + mine.shape[1:], mine.dtype)
  padded[:len(mine)] = mine
  every = np.asarray(multihost_utils.process_allgather(padded))  # [P, longest, ...]
  return np.concatenate([every[p, :hi - lo] for p, (lo, hi) in enumerate(shares)])
