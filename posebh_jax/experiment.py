"""From a config to the model an experiment trains, and the data it reads on every process.

The data half (layout, dataset files, records, TFDS builds) is `data_pipelines.datasets`; this
module adds what needs the trainer package: the model, the checkpoint's metadata and the
multi-process start of generated synthetic data. Shared by training (`posebh_jax.train.loop`),
evaluation (`posebh_jax.evaluation.evaluate`), inference and conversion.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import ml_collections

from data_pipelines import datasets
from data_pipelines.skeletons import SkeletonLayout
from posebh_jax.models.heads import ProtoHeadConfig
from posebh_jax.models.posebh import PoseBHModel
from posebh_jax.models.vit_moe import ViTMoEConfig
from posebh_jax.train import distributed


def build_model(config: ml_collections.ConfigDict, layout: SkeletonLayout) -> PoseBHModel:
  m = config.model
  # `ViTMoEConfig`'s fields are the one list of backbone sizes: each is read from `config.model`
  # under its own name, except the two the data decides.
  from_data = dict(img_size=tuple(config.data.image_size), num_experts=layout.num_datasets)
  sizes = {f.name: m[f.name] for f in dataclasses.fields(ViTMoEConfig) if f.name not in from_data}
  backbone = ViTMoEConfig(**from_data, **sizes)
  proto = ProtoHeadConfig(deconv_filters=tuple(m.proto.deconv_filters),
                          channels=m.proto.channels, out_channels=m.proto.out_channels)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.dtype]
  return PoseBHModel(backbone=backbone, num_keypoints=layout.num_keypoints,
                     head_deconv_filters=tuple(m.head_deconv_filters), proto_head=proto,
                     use_proto_head=m.use_proto_head,
                     proto_detach_backbone=m.proto.detach_backbone, dtype=dtype,
                     bn_groups=m.bn_groups)


def checkpoint_meta(config: ml_collections.ConfigDict, layout: SkeletonLayout) -> dict:
  """What a checkpoint must agree on with the config that restores it.

  `model_config` is every field of `config.model` (as JSON: tuples become lists), compared
  field by field on restore (`checkpoint.meta_differences`), with the crop size the position
  embedding was made for. Checkpoints written before also carry a `model` summary that repeated
  some of these fields; fields only one side records are not compared.
  """
  return dict(
      model_config=json.loads(json.dumps(config.model.to_dict(), default=str)),
      image_size=list(config.data.image_size),
      datasets=list(config.data.dataset_names),
      num_keypoints=list(layout.num_keypoints))


def resolve_dataset_files(config: ml_collections.ConfigDict, workdir: str
                          ) -> list[datasets.DatasetFiles]:
  """Where each dataset's annotations and images are; renders the synthetic data if enabled
  (`datasets.generate_synthetic`), the same way on every process."""
  out_dir = datasets.synthetic_dir(config, workdir)
  if out_dir is not None:
    # The same command on every host: process 0 generates while the others wait; then the
    # others find the data (shared workdir) or, on a host-local disk, generate the identical
    # data themselves (every image is a function of its seed and index).
    if distributed.is_main():
      datasets.generate_synthetic(config, workdir)
    distributed.barrier(f"synthetic data {out_dir}")
  return datasets.dataset_files(config, datasets.generate_synthetic(config, workdir))
