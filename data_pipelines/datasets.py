"""From a config to the data an experiment reads: skeleton layout, dataset files, records, TFDS
builds.

The config is the only indirection: every builder here reads named fields of `config.data`.
Shared by training, evaluation and `build_tfds` through `posebh_jax.experiment` (which adds the
model and the multi-process start of synthetic data), so all see the same data for one config.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import ml_collections

from data_pipelines import coco_reader, pipeline, readers, storage
from data_pipelines.skeletons import (REAL_SKELETONS, SYNTHETIC_SKELETONS, SkeletonInfo,
                                      SkeletonLayout, resolve_skeleton)
from data_pipelines.synthetic import generate as synthetic_generate


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


def entry_skeleton(name: str, entry: ml_collections.ConfigDict) -> SkeletonInfo:
  """The `SkeletonInfo` of dataset `name` (its entry's `skeleton`: a name, mapping or file).

  Raises:
    ValueError: naming the field, for a skeleton `skeletons.resolve_skeleton` rejects.
  """
  try:
    return resolve_skeleton(entry.skeleton, default_name=name)
  except ValueError as e:
    raise ValueError(f"data.datasets.{name}.skeleton: {e}") from None


def build_layout(config: ml_collections.ConfigDict) -> SkeletonLayout:
  return SkeletonLayout(tuple(entry_skeleton(n, e) for n, e in
                              zip(config.data.dataset_names, dataset_entries(config))))


def train_weights(config: ml_collections.ConfigDict) -> list[float]:
  """Each dataset's mixing weight; 0 for evaluation-only entries (no `train_ann`)."""
  return [float(e.weight) if e.get("train_ann", "") or is_generated(config, n, e) else 0.0
          for n, e in zip(config.data.dataset_names, dataset_entries(config))]


def _synthetic_enabled(config: ml_collections.ConfigDict) -> bool:
  syn = config.data.get("synthetic")
  return syn is not None and bool(syn.enabled)


def is_generated(config: ml_collections.ConfigDict, name: str,
                  entry: ml_collections.ConfigDict) -> bool:
  """Whether the entry's data is rendered by the synthetic generator (a synthetic skeleton's
  name in a config with `data.synthetic.enabled`); other entries read their own files."""
  return (_synthetic_enabled(config) and isinstance(entry.skeleton, str)
          and entry.skeleton in SYNTHETIC_SKELETONS)


def topdown_config(config: ml_collections.ConfigDict, layout: SkeletonLayout
                   ) -> pipeline.TopDownConfig:
  aug = config.data.aug
  return pipeline.TopDownConfig(
      layout=layout, encodings=tuple(e.encoding for e in dataset_entries(config)),
      image_size_hw=tuple(config.data.image_size), heatmap_size_hw=tuple(config.data.heatmap_size),
      sigma=config.data.sigma, flip=aug.flip, half_body_prob=aug.half_body_prob,
      num_joints_half_body=aug.num_joints_half_body, scale_factor=aug.scale_factor,
      rot_factor=aug.rot_factor, rot_prob=aug.rot_prob,
      half_body=tuple(bool(e.get("half_body", True)) for e in dataset_entries(config)),
      # The compact batch (uint8 crops + joints; targets drawn in the step) unless the config
      # asks for host-made targets.
      host_targets=not bool(config.data.device_targets),
      center_jitter=() if _jitter_at_build(config) else tuple(
          _jitters(config, dataset_format(f, e)) for f, e in zip(config.data.dataset_names,
                                                                  dataset_entries(config))))


def _jitters(config: ml_collections.ConfigDict, fmt: str) -> bool:
  """Whether training records of this format get the centre jitter (COCO-format boxes)."""
  return bool(config.data.center_jitter) and fmt not in ("mpii", "interhand2d")


def _jitter_at_build(config: ml_collections.ConfigDict) -> bool:
  """Spec §6.15: the reference draws the centre jitter once, when reading the records.

  (`reference_compat.center_jitter_at_build`, read from the config section directly: the
  `ReferenceCompat` class lives in the objective layer above this package.)
  """
  return bool(config.reference_compat.center_jitter_at_build)


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


@dataclasses.dataclass(frozen=True)
class TfdsBuild:
  """One dataset's TFDS build: `<tfds_dir>/posebh_keypoints/<name>/`, its format and K."""

  name: str
  format: str
  num_keypoints: int


def tfds_builds(config: ml_collections.ConfigDict) -> list[TfdsBuild]:
  """Each dataset's TFDS build, in dataset order; checks they can be built.

  Builds are keyed by dataset name and store the dataset's own skeleton's keypoint count, so a
  new skeleton (or two datasets of one format, e.g. COCO and OCHuman) gets its own build. A
  dataset named like a reference format ("coco", "mpii", ...) is that format's standard build:
  it must have that format and that format's keypoint count.

  Raises:
    readers.UnknownFormatError, ValueError: naming the dataset.
  """
  builds = []
  for name, entry in zip(config.data.dataset_names, dataset_entries(config)):
    fmt = dataset_format(name, entry)
    have = entry_skeleton(name, entry).num_keypoints
    if name in readers.FORMATS:
      want = REAL_SKELETONS[name].num_keypoints if name in REAL_SKELETONS else have
      if fmt != name or have != want:
        raise ValueError(
            f"data.datasets.{name}: skeleton {entry_skeleton(name, entry).name!r} has {have} "
            f"keypoints and format {fmt!r}, but the TFDS build named {name!r} is the reference "
            f"format {name!r} with {want} keypoints; rename the dataset for another format or "
            f"skeleton")
    builds.append(TfdsBuild(name, fmt, have))
  return builds


def tfds_formats(config: ml_collections.ConfigDict) -> list[str]:
  """Each dataset's annotation format, in dataset order, checked to be buildable (`tfds_builds`)."""
  return [b.format for b in tfds_builds(config)]


def entry_files(config: ml_collections.ConfigDict, name: str) -> DatasetFiles:
  """The files of any `data.datasets` entry (e.g. one of `data.eval_datasets`), against
  `data.root`; not for generated synthetic data."""
  e, root = config.data.datasets[name], config.data.root
  join = lambda path: storage.join_root(root, path)
  return DatasetFiles(name, join(e.train_ann), join(e.val_ann), join(e.image_dir),
                      join(e.get("val_image_dir", "")))


def synthetic_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Where the config's synthetic data is rendered (`data.root`, default
  `<workdir>/synthetic_data`), or None when no entry is generated."""
  if not _synthetic_enabled(config):
    return None
  if not any(is_generated(config, n, e)
             for n, e in zip(config.data.dataset_names, dataset_entries(config))):
    return None
  return config.data.root or storage.join(workdir, "synthetic_data")


def generate_synthetic(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """Renders the generated entries' data under `synthetic_dir` (idempotent: existing files of
  the same settings are reused). → {skeleton: {"train", "val", "image_dir"}}; {} if none."""
  out_dir = synthetic_dir(config, workdir)
  if out_dir is None:
    return {}
  syn = config.data.synthetic
  synthetic = tuple(e.skeleton for n, e in zip(config.data.dataset_names, dataset_entries(config))
                    if is_generated(config, n, e))
  return synthetic_generate.generate_synthetic_datasets(
      out_dir, num_train=syn.num_train, num_val=syn.num_val, seed=syn.seed,
      image_size=tuple(syn.image_size), skeletons=synthetic,
      domain_styles=bool(syn.domain_styles))


def dataset_files(config: ml_collections.ConfigDict, generated: dict[str, dict]
                  ) -> list[DatasetFiles]:
  """Where each dataset's annotations and images are.

  Args:
    config: the experiment config.
    generated: `generate_synthetic`'s result: the files of the entries whose skeleton is a
      synthetic one (with `data.synthetic.enabled`); any other entry reads its own files,
      relative to `data.root` when that is set.
  """
  out = []
  for n, e in zip(config.data.dataset_names, dataset_entries(config)):
    if is_generated(config, n, e):
      g = generated[e.skeleton]
      out.append(DatasetFiles(n, g["train"], g["val"], g["image_dir"]))
    else:
      out.append(entry_files(config, n))
  return out


def load_records(config: ml_collections.ConfigDict, layout: SkeletonLayout,
                 files: list[DatasetFiles], split: str) -> tuple[list[Sequence[dict[str, Any]]],
                                                                 list[coco_reader.ReadReport]]:
  """Every dataset's `split` ("train" or "val") instance records, by its `format`.

  From `data.tfds_dir` (built ArrayRecord, random access without loading it all) when set,
  except for generated synthetic data, otherwise from the annotation files
  (`readers.read_dataset`). Training records of COCO-format datasets get the seeded centre
  jitter when `data.center_jitter` is on.

  Raises:
    ValueError: a dataset has no usable training instance (its skip report is in the message).
    readers.UnknownFormatError / coco_reader.AnnotationError: bad format name or annotation.

  A dataset without the split's annotation file (an evaluation-only entry has no `train_ann`)
  gets no records and an empty report.
  """
  records, reports = [], []
  image_size_hw = tuple(config.data.image_size)
  tfds_dir = config.data.tfds_dir
  entries = dataset_entries(config)
  builds = (tfds_builds(config) if tfds_dir else
            [TfdsBuild(f.name, dataset_format(f.name, e), k)
             for f, e, k in zip(files, entries, layout.num_keypoints)])
  for d, (f, entry, build) in enumerate(zip(files, entries, builds)):
    fmt = build.format
    ann = f.train_ann if split == "train" else f.val_ann
    if not ann:
      records.append([])
      reports.append(coco_reader.ReadReport(source=f"{f.name}: no {split} annotations"))
      continue
    # Drawn here only as the reference does (§6.15); else per example in the train transform.
    jitter = (config.seed if split == "train" and _jitters(config, fmt)
              and _jitter_at_build(config) else None)
    det = entry.get("val_det", "") if split == "val" else ""
    if tfds_dir and not is_generated(config, f.name, entry):  # Generated data: its files.
      # Imported only for TFDS-built data: tensorflow_datasets adds ~0.3 s to every start.
      from data_pipelines import tfds_builders
      tfds_split = "val_det" if det else split
      key = dict(format=fmt, num_keypoints=build.num_keypoints)
      recs = tfds_builders.TfdsRecords(
          tfds_dir, build.name, tfds_split, dataset_index=d, center_jitter_seed=jitter,
          image_size_hw=image_size_hw, padding=config.data.bbox_padding, **key)
      report = tfds_builders.stored_reports(
          tfds_builders.open_builder(tfds_dir, build.name, **key)).get(
              tfds_split, coco_reader.ReadReport(source=f"{tfds_dir}:{build.name}/{tfds_split}"))
    else:
      det_path = storage.join_root(config.data.root, det) if det else None
      recs, report = readers.read_dataset(
          fmt, ann, f.split_image_dir(split), layout.skeletons[d], d,
          image_size_hw=image_size_hw, padding=config.data.bbox_padding, det_path=det_path,
          center_jitter_seed=jitter)
    if split == "train" and not len(recs):
      raise ValueError(f"dataset {f.name!r}: no usable training instances ({report})")
    records.append(recs)
    reports.append(report)
  if split == "train" and not any(len(r) for r in records):
    raise ValueError("no dataset has training annotations (every data.datasets entry's "
                     "train_ann is empty): nothing to train on")
  return records, reports


def num_input_workers(config: ml_collections.ConfigDict) -> int:
  """`data.num_workers`, with -1 (auto) resolved: 0 on CPU devices (the step uses the cores),
  else half the host's CPUs, at most 16 (each worker decodes and augments whole batches)."""
  n = int(config.data.num_workers)
  if n >= 0:
    return n
  import jax
  if jax.default_backend() == "cpu":
    return 0
  return max(1, min(16, (os.cpu_count() or 2) // 2))

