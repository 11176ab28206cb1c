"""From a config to the objects an experiment needs: skeleton layout, model, data files, records.

The config is the only indirection: every builder here reads named fields and constructs classes
by explicit import. Shared by training (`posebh_jax.train.loop`) and evaluation
(`posebh_jax.main_eval`), so both see the same model and data for the same config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax.numpy as jnp
import ml_collections

from data_pipelines import coco_reader, pipeline, readers, tfds_builders
from data_pipelines.skeletons import REAL_SKELETONS, SkeletonLayout, get_skeleton
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
      rot_factor=aug.rot_factor, rot_prob=aug.rot_prob,
      half_body=tuple(bool(e.get("half_body", True)) for e in dataset_entries(config)))


@dataclasses.dataclass(frozen=True)
class DatasetFiles:
  """One dataset's files, resolved against `data.root`.

  `val_image_dir` is where the validation annotations' images are ("" = `image_dir`; COCO and
  AIC keep them in a separate directory).
  """

  name: str
  train_ann: str
  val_ann: str
  image_dir: str
  val_image_dir: str = ""

  def split_image_dir(self, split: str) -> str:
    """The image directory of `split` ("train", "val" or "val_det")."""
    if split == "train":
      return self.image_dir
    return self.val_image_dir or self.image_dir


def dataset_format(name: str, entry: ml_collections.ConfigDict) -> str:
  """The entry's annotation format (`readers.FORMATS`).

  Raises:
    readers.UnknownFormatError: naming the dataset and the known formats.
  """
  fmt = entry.get("format", "coco")
  try:
    return readers.check_format(fmt)
  except readers.UnknownFormatError as e:
    raise readers.UnknownFormatError(f"data.datasets.{name}.format: {e}") from None


class DuplicateFormatError(ValueError):
  """Two datasets of one format in a config that reads TFDS builds (keyed by format)."""


def tfds_formats(config: ml_collections.ConfigDict) -> list[str]:
  """Each dataset's TFDS build (= its format), in dataset order; checks they can be built.

  A build is `<tfds_dir>/posebh_keypoints/<format>/`: one per format per directory, with that
  format's reference skeleton (`skeletons.REAL_SKELETONS`). Two datasets of one format would
  read the same build, so they are refused; so is a skeleton whose keypoint count differs from
  its format's.

  Raises:
    readers.UnknownFormatError, DuplicateFormatError, ValueError: naming the datasets.
  """
  seen: dict[str, str] = {}
  formats = []
  for name, entry in zip(config.data.dataset_names, dataset_entries(config)):
    fmt = dataset_format(name, entry)
    if fmt in seen:
      raise DuplicateFormatError(
          f"datasets {seen[fmt]!r} and {name!r} both have format {fmt!r}: TFDS builds are one "
          f"per format per directory (posebh_keypoints/{fmt}), so they would read the same "
          f"records; read this config from the annotation files (data.tfds_dir='')")
    seen[fmt] = name
    want, have = REAL_SKELETONS[fmt].num_keypoints, get_skeleton(entry.skeleton).num_keypoints
    if want != have:
      raise ValueError(f"data.datasets.{name}: skeleton {entry.skeleton!r} has {have} keypoints "
                       f"but TFDS builds of format {fmt!r} store {want}")
    formats.append(fmt)
  return formats


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
  return [DatasetFiles(n, join_root(root, e.train_ann), join_root(root, e.val_ann),
                       join_root(root, e.image_dir), join_root(root, e.get("val_image_dir", "")))
          for n, e in zip(names, entries)]


def join_root(root: str, path: str) -> str:
  """`path` under `root` unless it is empty, absolute or a URL (gs://...)."""
  return path if not path or os.path.isabs(path) or "://" in path else os.path.join(root, path)


def load_records(config: ml_collections.ConfigDict, layout: SkeletonLayout,
                 files: list[DatasetFiles], split: str) -> tuple[list[Sequence[dict[str, Any]]],
                                                                 list[coco_reader.ReadReport]]:
  """Every dataset's `split` ("train" or "val") instance records, by its `format`.

  From `data.tfds_dir` (built ArrayRecord, random access without loading it all) when set,
  otherwise from the annotation files (`readers.read_dataset`). Training records of
  COCO-format datasets get the seeded centre jitter when `data.center_jitter` is on.

  Raises:
    ValueError: a dataset has no usable training instance (its skip report is in the message).
    readers.UnknownFormatError / coco_reader.AnnotationError: bad format name or annotation.
    DuplicateFormatError: two datasets of one format reading TFDS builds (`tfds_formats`).
  """
  records, reports = [], []
  image_size_hw = tuple(config.data.image_size)
  tfds_dir = config.data.get("tfds_dir", "")
  entries = dataset_entries(config)
  formats = (tfds_formats(config) if tfds_dir else
             [dataset_format(f.name, e) for f, e in zip(files, entries)])
  for d, (f, entry, fmt) in enumerate(zip(files, entries, formats)):
    jitter = (config.seed if split == "train" and config.data.get("center_jitter", False)
              and fmt != "mpii" else None)
    det = entry.get("val_det", "") if split == "val" else ""
    if tfds_dir:
      tfds_split = "val_det" if det else split
      recs = tfds_builders.TfdsRecords(
          tfds_dir, fmt, tfds_split, dataset_index=d, center_jitter_seed=jitter,
          image_size_hw=image_size_hw, padding=config.data.bbox_padding)
      report = tfds_builders.stored_reports(tfds_builders.open_builder(tfds_dir, fmt)).get(
          tfds_split, coco_reader.ReadReport(source=f"{tfds_dir}:{fmt}/{tfds_split}"))
    else:
      ann = f.train_ann if split == "train" else f.val_ann
      det_path = join_root(config.data.root, det) if det else None
      recs, report = readers.read_dataset(
          fmt, ann, f.split_image_dir(split), layout.skeletons[d], d,
          image_size_hw=image_size_hw, padding=config.data.bbox_padding, det_path=det_path,
          center_jitter_seed=jitter)
    if split == "train" and not len(recs):
      raise ValueError(f"dataset {f.name!r}: no usable training instances ({report})")
    records.append(recs)
    reports.append(report)
  return records, reports


def checkpoint_meta(config: ml_collections.ConfigDict, layout: SkeletonLayout) -> dict:
  """What a checkpoint must agree on with the config that restores it.

  `model_config` is every field of `config.model` (as JSON: tuples become lists), compared
  field by field on restore (`checkpoint.meta_differences`).
  """
  m = config.model
  model_config = json.loads(json.dumps(m.to_dict(), default=str))
  return dict(
      model_config=model_config,
      datasets=list(config.data.dataset_names),
      num_keypoints=list(layout.num_keypoints),
      model=dict(embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                 patch_size=m.patch_size, part_features=m.part_features,
                 image_size=list(config.data.image_size),
                 head_deconv_filters=list(m.head_deconv_filters),
                 use_proto_head=bool(m.use_proto_head), proto_dim=m.proto.out_channels,
                 num_clusters=m.proto.num_clusters))
