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
  tiny                  PoseBH with a test-sized backbone and heads (seconds per step on CPU).

Datasets are in dataset-index order: COCO, AIC, MPII, AP-10K, APT-36K, COCO-WholeBody; the
annotation and image paths are relative to `data.root` (spec §4.1).
"""

from __future__ import annotations

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

# Reference iterations per epoch: the six training sets hold about 0.75 M instances, the
# reference's global batch is 512 (4 GPUs × 128). Stage boundaries are at epochs 50 and 90.
_STEPS_PER_EPOCH = 1460


def _real_data(config: ml_collections.ConfigDict) -> None:
  config.data.dataset_names = tuple(d[0] for d in _DATASETS)
  for name, skeleton, train_ann, val_ann, image_dir, encoding in _DATASETS:
    config.data.datasets[name] = common.dataset_entry(
        skeleton=skeleton, train_ann=train_ann, val_ann=val_ann, image_dir=image_dir,
        encoding=encoding)


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
  arg = arg or "b"
  known = ("s", "b", "l", "h", "vitpose_s", "vitpose_b", "vitpose_l", "vitpose_h",
           "tiny_reference", "tiny")
  if arg not in known:
    raise ValueError(f"configs/posebh.py: unknown argument {arg!r}; expected one of {known}")
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
  train.num_steps = 100 * _STEPS_PER_EPOCH
  train.checkpoint_every = 10 * _STEPS_PER_EPOCH
  if config.model.use_proto_head:
    common.set_stage2(config, 50 * _STEPS_PER_EPOCH)

  if arg == "tiny_reference":
    # ../shared/golden/README.md "tiny_posebh.pth": ViTMoE 96-d, depth 2, 3 heads, part 24,
    # heads (32, 32), prototype head (32, 32) → 16 channels, 16-d embedding, 96 clusters.
    m = config.model
    m.embed_dim, m.depth, m.num_heads, m.part_features, m.drop_path_rate = 96, 2, 3, 24, 0.0
    m.head_deconv_filters = (32, 32)
    m.proto.deconv_filters = (32, 32)
    m.proto.channels = 16
    m.proto.out_channels = 16
  elif arg == "tiny":
    common.make_tiny(config)
    config.model.proto.num_clusters = 64
    common.set_stage2(config, 2)
  return config
