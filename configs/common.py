"""Fields every experiment config shares; experiment files override what differs.

Kept deliberately small: one section per concern (data, model, loss, train, eval, mesh).
Tuples, not lists, so that every field can be overridden on the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import ml_collections


@dataclasses.dataclass(frozen=True)
class ConfigArg:
  """`get_config(arg)`'s argument, parsed (`parse_arg`).

  Attributes:
    name: the one name of `names` the argument gave (or the default).
    options: the flags of `options` it gave.
    values: `key=<N>` settings it gave (positive integers).
  """
  name: str | None
  options: frozenset[str]
  values: dict[str, int]


def parse_arg(arg: str | None, where: str, *, names: Sequence[str] = (), default: str | None = None,
              options: Sequence[str] = (), values: Sequence[str] = ()) -> ConfigArg:
  """The one parser of every config file's `get_config(arg)`: comma-separated items, each one of
  `names` (at most one; `default` if none), a flag of `options`, or `key=<N>` for a key of
  `values` (a positive integer).

  E.g. `configs/transfer.py:interhand2d,steps_per_epoch=100,tiny`.

  Raises:
    ValueError: naming `where`, for an unknown or repeated item, two names, or a bad value.
  """
  items = [o for o in (arg or "").split(",") if o]
  name, opts, vals, bad = None, set(), {}, []
  for item in items:
    key, eq, value = item.partition("=")
    if eq and key in values and key not in vals and value.isdigit() and int(value) > 0:
      vals[key] = int(value)
    elif not eq and item in names and name is None:
      name = item
    elif not eq and item in options and item not in opts:
      opts.add(item)
    else:
      bad.append(item)
  if bad:
    expected = ([f"one of {tuple(names)}"] if names else []) + (
        [f"options {tuple(options)}"] if options else []) + [f"'{k}=<N>'" for k in values]
    raise ValueError(f"{where}: unknown or bad options {bad} in {arg!r}; expected "
                     + (", ".join(expected) or "no argument"))
  return ConfigArg(name if name is not None else default, frozenset(opts), vals)


def dataset_entry(*, skeleton: str | Mapping[str, Any], train_ann: str, val_ann: str, image_dir: str,
                  weight: float = 1.0, encoding: str = "msra", format: str = "coco",
                  half_body: bool = True, val_det: str = "", val_image_dir: str = "",
                  predict_with: str = "") -> ml_collections.ConfigDict:
  """One dataset: which skeleton it annotates, its files, mixing weight, target encoding.

  `skeleton` is a known name ("coco", ...), a mapping of `SkeletonInfo.from_dict` keys (names,
  flip pairs, sigmas, upper body, limbs, colours; see README "Add a dataset") or the path (local
  or gs://) of a JSON file holding one. `train_ann` "" makes the dataset evaluation-only: its
  head is evaluated on `val_ann` but never trained.

  `encoding` is "udp" (UDP affine + UDP target, spec §4.4) or "msra" (standard affine + MSRA).
  `format` is the annotation format (`data_pipelines.readers.FORMATS`: "coco", "aic", "mpii",
  "ap10k", "apt36k", "coco_wholebody"); it is also the TFDS builder config when the records come
  from `data.tfds_dir`. `half_body`: whether the half-body transform runs for this dataset
  (MPII: off, spec §4.1). `val_det`: detection boxes for evaluation (COCO formats; "" = ground
  truth boxes). `val_image_dir`: where the validation images are ("" = `image_dir`).
  `predict_with`: for an entry of `data.eval_datasets`, the dataset (of `data.dataset_names`)
  whose expert and head predict it ("" = its own).
  """
  return ml_collections.ConfigDict(dict(
      skeleton=skeleton, train_ann=train_ann, val_ann=val_ann, image_dir=image_dir,
      weight=weight, encoding=encoding, format=format, half_body=half_body, val_det=val_det,
      val_image_dir=val_image_dir, predict_with=predict_with))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.root = ""
  # Where the datasets' TFDS ArrayRecord builds are (`python -m data_pipelines.build_tfds`);
  # "" = read the annotation files and images directly. Local or gs://.
  c.data.tfds_dir = ""
  # The reference's training-time box-centre jitter of COCO-format ground truth (spec §4.3
  # step 4), seeded by `seed`; never for MPII, detections or evaluation.
  c.data.center_jitter = False
  c.data.dataset_names = ()
  c.data.datasets = ml_collections.ConfigDict()
  # Evaluation-only entries of `data.datasets` that the model predicts with another dataset's
  # expert and head (their entry's `predict_with`, a name in `dataset_names`; e.g. OCHuman
  # through COCO's). Scored by posebh-eval, not by training's own evaluation.
  c.data.eval_datasets = ()
  c.data.image_size = (256, 192)  # (H, W).
  c.data.heatmap_size = (64, 48)  # (H, W).
  c.data.sigma = 2.0
  c.data.bbox_padding = 1.25
  # grain worker processes; 0 reads in the main process; -1 (auto): 0 where the devices are
  # the CPU (workers would compete with the step for the same cores), else half the host's
  # CPUs, at most 16 (datasets.num_input_workers): a TPU/GPU host decodes and augments in
  # parallel while its accelerators compute.
  c.data.num_workers = -1
  c.data.prefetch = 2
  # Training images that are missing, undecodable (corrupt, truncated) or not their annotated
  # size are skipped (a zero-weight stand-in, logged with the file); more than this many in one
  # run of posebh-train stops it with a message naming the last one. -1: no limit.
  c.data.max_bad_images = 100
  # Compact batches: the host ships uint8 crops and crop-space joints (~150 KB per PoseBH-B
  # sample instead of 2.2 MB); the step normalises and draws the MSRA/UDP heatmaps on the
  # device (data_pipelines/device_targets.py; same losses: tests/test_train_step.py).
  # False: float crops and heatmaps made on the host.
  c.data.device_targets = True
  c.data.aug = ml_collections.ConfigDict(dict(
      flip=True, half_body_prob=0.3, num_joints_half_body=8, scale_factor=0.5,
      rot_factor=40.0, rot_prob=0.6))

  c.model = ml_collections.ConfigDict()
  c.model.patch_size = 16
  c.model.patch_padding = 2
  c.model.embed_dim = 768
  c.model.depth = 12
  c.model.num_heads = 12
  c.model.mlp_ratio = 4
  c.model.part_features = 192
  c.model.drop_path_rate = 0.3
  c.model.head_deconv_filters = (256, 256)
  c.model.use_proto_head = True
  c.model.dtype = "float32"
  # The heads' BatchNorm statistics: 1 = over the whole global batch (SyncBN under GSPMD);
  # G > 1 = per group of train.batch_size / G consecutive rows, i.e. per device with
  # G = mesh.data × mesh.fsdp (the reference's per-GPU BN). See heads.GroupedBatchNorm.
  c.model.bn_groups = 1
  c.model.proto = ml_collections.ConfigDict(dict(
      deconv_filters=(256, 256), channels=64, out_channels=64,
      num_in_class=3,  # M prototypes per keypoint.
      gamma=0.999,  # EMA momentum of the keypoint prototypes.
      sinkhorn_epsilon=0.05, sinkhorn_iterations=3,
      # Gumbel-max sampling of the in-class assignment that drives the EMA (spec §2.5 / §6.10);
      # False uses the deterministic Sinkhorn argmax.
      gumbel=True,
      # Pixels whose target maximum exceeds this take part in prototype learning (reference 0.0).
      sample_threshold=0.0,
      num_clusters=96,  # C cluster prototypes (the reference's cp_size).
      cluster_iterations=500, cluster_beta=20.0,
      # False, as the reference: prototype (PPC/PPD, CPS) and CSS gradients reach the backbone
      # whenever it trains. True feeds the prototype head stop_gradient(features).
      detach_backbone=False))

  c.loss = ml_collections.ConfigDict(dict(
      heatmap_weight=1.0,
      # PixelPrototypeCE (spec §2.6.3): proto_weight · (ppc_weight·PPC + ppd_weight·PPD).
      proto_weight=1.25e-5, ppc_weight=0.01, ppd_weight=0.001,
      # Prototype-heatmap MSE (spec §2.6.3 step 4).
      phm_weight=3.33e-6,
      cps_weight=1.0e-2,  # Cluster-prototype supervision (spec §2.6.4).
      css_weight=1.0e-3,  # Cross-type self-supervision (spec §2.6.5).
      css_conf_thr=0.25, css_match_dist=2.1, css_sigma=2.0, css_dark_kernel=11,
  ))

  # The stage schedule (spec §3.2; posebh_jax/train/schedule.py). Steps; -1 = never.
  c.schedule = ml_collections.ConfigDict(dict(
      proto_freeze_step=-1,  # Keypoint prototypes stop their EMA updates.
      cps_start_step=-1,  # Prototypes are clustered and the CPS loss starts.
      css_start_step=-1,  # Cross-type self-supervision starts.
      # The reference's freeze hooks per parameter group: ("freeze", <step>) / ("thaw", <step>)
      # events in order, e.g. (("freeze", 0), ("thaw", 500)); empty = trains throughout. On the
      # command line: --config.schedule.freeze_hooks.backbone='(("freeze", 0),)'.
      freeze_hooks=ml_collections.ConfigDict(dict(backbone=(), heads=(), proto_head=())),
  ))

  # Reference-implementation behaviour per defect of spec §6 (posebh_jax/objective/compat.py);
  # all False = the intended behaviour.
  c.reference_compat = ml_collections.ConfigDict(dict(
      css_pseudo_keypoint=False, css_peak_distance=False, proto_logit_offset=False,
      sinkhorn_local_column=False, correct_mask_local=False, cps_topk_sort=False,
      cps_target_order=False,
      # 6.8: the freeze hooks' bookkeeping (a second 'freeze' locks a group: ViT-B's backbone
      # is never thawed). Acts on the schedule (posebh_jax/train/schedule.py).
      freeze_hook_bookkeeping=False,
      # 6.14: frozen groups run in train mode (BN statistics update, DropPath on).
      frozen_train_mode=False,
      # 6.15: the centre jitter drawn once when the records are read, not per example/epoch.
      center_jitter_at_build=False))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=64, num_steps=1000, learning_rate=1e-3, weight_decay=0.1, b1=0.9, b2=0.999,
      # The learning-rate schedule (the stage schedule is `schedule` above): linear warmup from
      # warmup_ratio·lr, then "step" (×decay_factor from each of decay_steps on), "cosine" or
      # "constant" (posebh_jax/train/optimizer.py).
      warmup_steps=500, warmup_ratio=1e-3, lr_schedule="cosine", decay_steps=(),
      decay_factor=0.1,
      # Layer-wise lr decay rate^(L−1−layer) over num_layers + 2 layers (-1: model.depth);
      # 1.0 = off.
      layer_decay=1.0, layer_decay_num_layers=-1,
      clip_norm=1.0, log_every=50, checkpoint_every=500, keep_checkpoints=3, eval_at_end=True,
      # Evaluate (posebh_jax/train/loop.py::evaluate) every this many steps; -1 = off.
      eval_every=-1,
      # JAX's persistent compilation cache: restarts, resumed jobs and stage changes reuse
      # compiled steps. "auto" = $JAX_COMPILATION_CACHE_DIR if set, else
      # <workdir>/compilation_cache; "" = off; or any directory/URL.
      compilation_cache="auto",
      # jax.profiler trace of `profile_num_steps` steps from `profile_start_step` (-1: off)
      # into <workdir>/profile (TensorBoard's profile plugin / Perfetto read it).
      profile_start_step=-1, profile_num_steps=3))

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=64, pck_thresholds=(0.05, 0.1), flip_test=False))

  # Converted weights to start from when the workdir has no checkpoint yet (`posebh-convert`
  # output, e.g. ViTPose++ for PoseBH, spec §3.1); "" = random initialisation.
  c.init = ml_collections.ConfigDict(dict(weights=""))

  # Devices per parameter shard group (fsdp) and data-parallel replicas (data; -1: all the
  # remaining devices); leaves under fsdp_min_size elements stay replicated.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2 ** 14))

  # Multi-process runs (posebh_jax/train/distributed.py): jax.distributed.initialize() arguments; empty
  # / -1 = detected from the environment (TPU pods, SLURM, JAX_COORDINATOR_ADDRESS, ...).
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=-1, process_id=-1))
  return c


def epochs(n: float, steps_per_epoch: int) -> int:
  """The first step of epoch `n` (0-based), for schedules written in epochs as the reference's."""
  return int(n * steps_per_epoch + 1e-9)  # Floor; the epsilon absorbs float error.


def set_stage2(c: ml_collections.ConfigDict, step: int) -> None:
  """The reference's stage change at one step: prototypes freeze, CPS and CSS start (-1: never)."""
  for name in ("proto_freeze_step", "cps_start_step", "css_start_step"):
    c.schedule[name] = step


def make_tiny(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config in place to test size: seconds per step on one CPU core."""
  c.data.image_size = (64, 48)
  c.data.heatmap_size = (16, 12)
  c.model.patch_size = 8
  c.model.patch_padding = 0
  c.model.embed_dim = 32
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.part_features = 8
  c.model.drop_path_rate = 0.1
  c.model.head_deconv_filters = (16,)
  c.model.proto.deconv_filters = (16,)
  c.model.proto.channels = 8
  c.model.proto.out_channels = 8
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.warmup_steps = 1
  # A constant lr keeps `num_steps` out of the compiled step (a cosine schedule bakes it in), so
  # tiny runs of any length compile to the same programs and the test suite's ~50 processes share
  # them through the persistent compilation cache. The schedules are tested on their own.
  c.train.lr_schedule = "constant"
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.eval.batch_size = 8
