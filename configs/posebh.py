r"""PoseBH-B / PoseBH-H and the ViTPose++ multi-head baseline on the six real datasets (spec §1).

  posebh-train --config=configs/posebh.py:b --workdir=gs://bucket/posebh_b \
      --config.data.root=/data --config.init.weights=/ckpt/vitpose_plus_b_converted

Arguments (`get_config(arg)`):
  b, h                  PoseBH-B / PoseBH-H (ViTMoE + 6 heads + prototype head, two stages).
  s, l                  the same recipe on ViT-S (384-d, depth 12) / ViT-L (1024-d, depth 24);
                        not in the reference's release: head dim 64, expert width D/4 as in
                        B and H.
  vitpose_{s,b,l,h}     the ViTPose++ baseline: same backbone and heads, no prototype head,
                        no prototype losses, no CPS/CSS.
  tiny_reference        the tiny model of ../shared/golden/tiny_posebh.pth (checkpoint import
                        tests and demos).
  tiny_reference_samples  the same model on the sample data (../shared/data/samples beside the
                        repository; five of the six datasets, no APT-36K sample), for
                        evaluation only:
                          posebh-convert --config=configs/posebh.py:tiny_reference \
                              --pth=../shared/golden/tiny_posebh.pth --out=/tmp/tiny_converted
                          posebh-eval --config=configs/posebh.py:tiny_reference_samples \
                              --weights=/tmp/tiny_converted --workdir=/tmp/tiny_eval
  tiny                  PoseBH with a test-sized backbone and heads (seconds per step on CPU).

Datasets are in dataset-index order: COCO, AIC, MPII, AP-10K, APT-36K, COCO-WholeBody; the
annotation and image paths are relative to `data.root` (spec §4.1). OCHuman is an evaluation-only
entry (`data.eval_datasets`) predicted with COCO's expert and head:

  posebh-eval --config=configs/posebh.py:b --weights=/ckpt/posebh_b_converted \
      --workdir=/tmp/eval --config.data.root=/data --datasets=ochuman
 Evaluation follows spec
§5.1: flip test, COCO and COCO-WholeBody on the AP_H_56 person detections, MPII PCKh against
`mpii_gt_val.mat`, the others on ground-truth boxes.
"""

from __future__ import annotations

import os

import ml_collections

from configs import common

# (name, skeleton, train annotations, val annotations, image dir, encoding), spec §4.1 / §5.1.
_DATASETS = (
    ("coco", "coco", "coco/annotations/person_keypoints_train2017.json",
     "coco/annotations/person_keypoints_val2017.json", "coco/train2017", "udp"),
    ("aic", "aic", "aic/annotations/aic_train.json", "aic/annotations/aic_val.json",
     "aic/images", "msra"),
    ("mpii", "mpii", "mpii/annotations/mpii_train.json", "mpii/annotations/mpii_val.json",
     "mpii/images", "udp"),
    ("ap10k", "ap10k", "ap10k/annotations/ap10k-train-split1.json",
     "ap10k/annotations/ap10k-val-split1.json", "ap10k/data", "msra"),
    ("apt36k", "apt36k", "ap36k/annotations/train_annotations_1.json",
     "ap36k/annotations/val_annotations_1.json", "ap36k/images", "msra"),
    ("coco_wholebody", "coco_wholebody", "coco/annotations/coco_wholebody_train_v1.0.json",
     "coco/annotations/coco_wholebody_val_v1.0.json", "coco/train2017", "msra"),
)

# OCHuman (evaluation only, spec §5.1; the paper's Table: PoseBH-B 83.1 / -H 87.0 AP on test):
# COCO's 17 keypoints and sigmas on ground-truth boxes, predicted with COCO's expert and head
# as the reference's configs/body/.../ochuman/ configs do. The val file is the default; the
# paper's numbers are on the test file:
#   --config.data.datasets.ochuman.val_ann=ochuman/annotations/ochuman_coco_format_test_range_0.00_1.00.json
_OCHUMAN_VAL = "ochuman/annotations/ochuman_coco_format_val_range_0.00_1.00.json"
_OCHUMAN_IMAGES = "ochuman/images"

# Spec §5.1: the person detections COCO and COCO-WholeBody are evaluated on, and MPII's official
# ground truth (head boxes) for PCKh.
_PERSON_DETECTIONS = "coco/person_detection_results/COCO_val2017_detections_AP_H_56_person.json"
_MPII_GT_MAT = "mpii/annotations/mpii_gt_val.mat"

# The sample data (../shared/data/samples beside the repository): per dataset the annotation
# file and detections ("" = none), relative to it; images lie beside the annotations. APT-36K
# has no sample.
_SAMPLES_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "..", "..", "shared", "data", "samples"))
_SAMPLE_FILES = {
    "coco": ("coco/test_coco.json", "coco/test_coco_det_AP_H_56.json"),
    "aic": ("aic/test_aic.json", ""),
    "mpii": ("mpii/test_mpii.json", ""),
    "ap10k": ("ap10k/test_ap10k.json", ""),
    "apt36k": ("", ""),
    "coco_wholebody": ("coco/test_coco_wholebody.json", "coco/test_coco_det_AP_H_56.json"),
    "ochuman": ("ochuman/test_ochuman.json", ""),
}

# COCO's validation images have their own directory; the other datasets keep one (AIC: put the
# training and validation images together in aic/images, their file names are unique).
_VAL_IMAGE_DIRS = {"coco": "coco/val2017", "coco_wholebody": "coco/val2017"}

# Reference iterations per epoch: the six training sets hold about 0.75 M instances, the
# reference's global batch is 512 (4 GPUs × 128). Stage boundaries are at epochs 50 and 90.
_STEPS_PER_EPOCH = 1460


def _real_data(config: ml_collections.ConfigDict) -> None:
  config.data.dataset_names = tuple(d[0] for d in _DATASETS)
  for name, skeleton, train_ann, val_ann, image_dir, encoding in _DATASETS:
    # The format is the skeleton's name for all six; MPII has no half-body transform (§4.1).
    config.data.datasets[name] = common.dataset_entry(
        skeleton=skeleton, train_ann=train_ann, val_ann=val_ann, image_dir=image_dir,
        encoding=encoding, format=skeleton, half_body=name != "mpii",
        val_det=_PERSON_DETECTIONS if name in ("coco", "coco_wholebody") else "",
        val_image_dir=_VAL_IMAGE_DIRS.get(name, ""))
  config.data.datasets.ochuman = common.dataset_entry(
      skeleton="coco", train_ann="", val_ann=_OCHUMAN_VAL, image_dir=_OCHUMAN_IMAGES,
      encoding="udp", format="coco", predict_with="coco")
  config.data.eval_datasets = ("ochuman",)
  # Read by posebh_jax/evaluation/benchmark.py ("" = head sizes approximated from the JSON).
  config.data.datasets.mpii.val_gt_mat = _MPII_GT_MAT
  config.data.center_jitter = True  # Spec §4.3 step 4.
  config.eval.flip_test = True  # Every benchmark of spec §5.1.


def _sample_data(config: ml_collections.ConfigDict) -> None:
  """Points the six datasets at the sample files (evaluation only: no APT-36K sample)."""
  config.data.root = _SAMPLES_ROOT
  for name, (ann, det) in _SAMPLE_FILES.items():
    entry = config.data.datasets[name]
    entry.train_ann = entry.val_ann = ann
    entry.image_dir = os.path.dirname(ann)
    entry.val_image_dir = ""
    entry.val_det = det
  config.data.datasets.mpii.val_gt_mat = ""  # No mpii_gt_val.mat in the samples.


# (embed_dim, depth, num_heads, part_features, drop_path_rate) per size; B and H are spec §1,
# S and L follow ViTPose's S/L backbones with the expert slice at D/4 like B and H.
_SIZES = {
    "s": (384, 12, 6, 96, 0.1),
    "b": (768, 12, 12, 192, 0.3),
    "l": (1024, 24, 16, 256, 0.5),
    "h": (1280, 32, 16, 320, 0.55),
}


def _set_size(model: ml_collections.ConfigDict, size: str) -> None:
  (model.embed_dim, model.depth, model.num_heads, model.part_features,
   model.drop_path_rate) = _SIZES[size]


def get_config(arg: str | None = "b") -> ml_collections.ConfigDict:
  """Returns the config for `arg` (see the module docstring)."""
  known = ("s", "b", "l", "h", "vitpose_s", "vitpose_b", "vitpose_l", "vitpose_h",
           "tiny_reference", "tiny_reference_samples", "tiny")
  arg = common.parse_arg(arg, "configs/posebh.py", names=known, default="b").name
  config = common.base_config()
  _real_data(config)

  size = arg.removeprefix("vitpose_")
  if size in _SIZES:
    _set_size(config.model, size)
  if arg.startswith("vitpose"):
    config.model.use_proto_head = False

  train = config.train
  train.batch_size = 512
  train.learning_rate = 1e-3
  train.weight_decay = 0.1
  train.warmup_steps = 500
  train.num_steps = common.epochs(100, _STEPS_PER_EPOCH)
  train.checkpoint_every = common.epochs(10, _STEPS_PER_EPOCH)
  # Spec §3.4: step decay ×0.1 at epochs 50 and 90, layer decay 0.75 (B) / 0.8 (H) over the
  # backbone's depth. S and L are not in the release: B's rate for S, H's for L.
  train.lr_schedule = "step"
  train.decay_steps = (common.epochs(50, _STEPS_PER_EPOCH), common.epochs(90, _STEPS_PER_EPOCH))
  train.layer_decay = 0.8 if size in ("l", "h") else 0.75
  if config.model.use_proto_head:
    _posebh_phases(config, size, _STEPS_PER_EPOCH)
  if arg in ("tiny_reference", "tiny_reference_samples"):
    # ../shared/golden/README.md "tiny_posebh.pth": ViTMoE 96-d, depth 2, 3 heads, part 24,
    # heads (32, 32), prototype head (32, 32) → 16 channels, 16-d embedding, 96 clusters.
    m = config.model
    m.embed_dim, m.depth, m.num_heads, m.part_features, m.drop_path_rate = 96, 2, 3, 24, 0.0
    m.head_deconv_filters = (32, 32)
    m.proto.deconv_filters = (32, 32)
    m.proto.channels = 16
    m.proto.out_channels = 16
    if arg == "tiny_reference_samples":
      _sample_data(config)
      config.eval.batch_size = 8  # 14-118 boxes per sample set; divisible by 1-8 devices.
  elif arg == "tiny":
    # The three phases in four steps: 0-1 prototype head only, 2 + heads (CPS, CSS), 3 + backbone
    # (intended; never with reference_compat.freeze_hook_bookkeeping), lr ×0.1 at 2 and 3.
    common.make_tiny(config)
    config.model.proto.num_clusters = 64
    config.train.decay_steps = (2, 3)
    _posebh_phases(config, "b", 1)
  return config


def _posebh_phases(config: ml_collections.ConfigDict, size: str, steps_per_epoch: int) -> None:
  """The reference's hooks (spec §1, §3.2) at epochs 50 and 90 of 100, scaled to the run.

  Epochs 0-49: only the prototype head trains, prototypes EMA-updated; 50: prototypes freeze and
  are clustered, CPS and CSS start, the heatmap heads thaw; 90: the backbone thaws (ViT-B as
  implemented: never, `reference_compat.freeze_hook_bookkeeping`, spec §6.8).
  """
  n = config.train.num_steps / steps_per_epoch / 100  # Epoch scale: 1.0 for the real run.
  e50, e90 = common.epochs(50 * n, steps_per_epoch), common.epochs(90 * n, steps_per_epoch)
  common.set_stage2(config, e50)
  hooks = config.schedule.freeze_hooks
  hooks.heads = (("freeze", 0), ("thaw", e50))
  # B's list freezes twice (bug 6.8 under the reference's bookkeeping); H's thaws directly.
  hooks.backbone = ((("freeze", 0), ("freeze", e50), ("thaw", e90)) if size == "b"
                    else (("freeze", 0), ("thaw", e90)))


def scale_recipe(config: ml_collections.ConfigDict, num_steps: int, size: str = "b") -> None:
  """Shortens a PoseBH-`size` config's recipe to `num_steps` steps, keeping its proportions.

  The lr steps (epochs 50, 90), the stage change (50) and the freeze hooks (0, 50, 90) land at
  the same fractions of the run; warmup stays 500 steps or 1/20 of the run if shorter.
  """
  spe = num_steps / 100  # "Steps per epoch" of a 100-epoch run.
  train = config.train
  train.num_steps = int(num_steps)
  train.warmup_steps = max(1, min(500, num_steps // 20))
  train.decay_steps = (common.epochs(50, spe), common.epochs(90, spe))
  train.checkpoint_every = max(1, common.epochs(10, spe))
  if config.model.use_proto_head:
    _posebh_phases(config, size, spe)
