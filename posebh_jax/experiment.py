"""From a config to the objects an experiment needs: skeleton layout, model, data files, records.

The config is the only indirection: every builder here reads named fields and constructs classes
by explicit import. Shared by training (`posebh_jax.train.loop`) and evaluation
(`posebh_jax.main_eval`), so both see the same model and data for the same config.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from data_pipelines import coco_reader, pipeline
from data_pipelines.skeletons import SkeletonLayout, get_skeleton
from data_pipelines.synthetic import generate as synthetic_generate
from posebh_jax.models.heads import ProtoHeadConfig
from posebh_jax.models.posebh import PoseBHModel
from posebh_jax.models.vit_moe import ViTMoEConfig


class UnknownDatasetError(KeyError):
  """A dataset name in `data.dataset_names` with no entry in `data.datasets`."""


def dataset_entries(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The `data.datasets` entries in `data.dataset_names` order (= dataset index order)."""
  entries = []
  for name in config.data.dataset_names:
    if name not in config.data.datasets:
      raise UnknownDatasetError(
          f"data.dataset_names has {name!r} but data.datasets has no entry for it "
          f"(known: {sorted(config.data.datasets.keys())})")
    entries.append(config.data.datasets[name])
  return entries


def build_layout(config: ml_collections.ConfigDict) -> SkeletonLayout:
  return SkeletonLayout(tuple(get_skeleton(e.skeleton) for e in dataset_entries(config)))


def build_model(config: ml_collections.ConfigDict, layout: SkeletonLayout) -> PoseBHModel:
  m = config.model
  backbone = ViTMoEConfig(
      img_size=tuple(config.data.image_size), patch_size=m.patch_size,
      patch_padding=m.patch_padding, embed_dim=m.embed_dim, depth=m.depth,
      num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, part_features=m.part_features,
      num_experts=layout.num_datasets, drop_path_rate=m.drop_path_rate)
  proto = ProtoHeadConfig(deconv_filters=tuple(m.proto.deconv_filters),
                          channels=m.proto.channels, out_channels=m.proto.out_channels)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.dtype]
  return PoseBHModel(backbone=backbone, num_keypoints=layout.num_keypoints,
                     head_deconv_filters=tuple(m.head_deconv_filters), proto_head=proto,
                     use_proto_head=m.use_proto_head,
                     proto_detach_backbone=m.proto.detach_backbone, dtype=dtype)


def topdown_config(config: ml_collections.ConfigDict, layout: SkeletonLayout
                   ) -> pipeline.TopDownConfig:
  aug = config.data.aug
  return pipeline.TopDownConfig(
      layout=layout, encodings=tuple(e.encoding for e in dataset_entries(config)),
      image_size_hw=tuple(config.data.image_size), heatmap_size_hw=tuple(config.data.heatmap_size),
      sigma=config.data.sigma, flip=aug.flip, half_body_prob=aug.half_body_prob,
      num_joints_half_body=aug.num_joints_half_body, scale_factor=aug.scale_factor,
      rot_factor=aug.rot_factor, rot_prob=aug.rot_prob)


@dataclasses.dataclass(frozen=True)
class DatasetFiles:
  name: str
  train_ann: str
  val_ann: str
  image_dir: str


def resolve_dataset_files(config: ml_collections.ConfigDict, workdir: str) -> list[DatasetFiles]:
  """Where each dataset's annotations and images are; generates the synthetic data if enabled."""
  entries = dataset_entries(config)
  names = tuple(config.data.dataset_names)
  syn = config.data.get("synthetic")
  if syn is not None and syn.enabled:
    root = config.data.root or os.path.join(workdir, "synthetic_data")
    generated = synthetic_generate.generate_synthetic_datasets(
        root, num_train=syn.num_train, num_val=syn.num_val, seed=syn.seed,
        image_size=tuple(syn.image_size), skeletons=tuple(e.skeleton for e in entries))
    return [DatasetFiles(n, generated[e.skeleton]["train"], generated[e.skeleton]["val"],
                         generated[e.skeleton]["image_dir"]) for n, e in zip(names, entries)]
  root = config.data.root
  join = lambda p: p if not p or os.path.isabs(p) or "://" in p else os.path.join(root, p)
  return [DatasetFiles(n, join(e.train_ann), join(e.val_ann), join(e.image_dir))
          for n, e in zip(names, entries)]


def load_records(config: ml_collections.ConfigDict, layout: SkeletonLayout,
                 files: list[DatasetFiles], split: str) -> tuple[list[list[dict[str, Any]]],
                                                                 list[coco_reader.ReadReport]]:
  """Reads every dataset's `split` ("train" or "val") annotations into instance records."""
  records, reports = [], []
  for d, f in enumerate(files):
    ann = f.train_ann if split == "train" else f.val_ann
    recs, report = coco_reader.read_coco_keypoints(
        ann, f.image_dir, layout.skeletons[d], d, image_size_hw=tuple(config.data.image_size),
        padding=config.data.bbox_padding)
    if split == "train" and not recs:
      raise ValueError(f"dataset {f.name!r}: no usable training instances in {ann} ({report})")
    records.append(recs)
    reports.append(report)
  return records, reports


def checkpoint_meta(config: ml_collections.ConfigDict, layout: SkeletonLayout) -> dict:
  """What a checkpoint must agree on with the config that restores it."""
  m = config.model
  return dict(
      datasets=list(config.data.dataset_names),
      num_keypoints=list(layout.num_keypoints),
      model=dict(embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                 patch_size=m.patch_size, part_features=m.part_features,
                 image_size=list(config.data.image_size),
                 head_deconv_filters=list(m.head_deconv_filters),
                 use_proto_head=bool(m.use_proto_head), proto_dim=m.proto.out_channels,
                 num_clusters=m.proto.num_clusters))
