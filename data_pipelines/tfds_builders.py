"""TFDS builders writing ArrayRecord, read back without TensorFlow as the readers' record dicts.

One parametrised builder, `PosebhKeypoints`, with a BuilderConfig per annotation format ("coco",
"aic", "mpii", "ap10k", "apt36k", "coco_wholebody") and, for any other dataset (a new skeleton,
or a second dataset of one format such as OCHuman), a `KeypointsConfig` named after the dataset
that carries its format and keypoint count (`builder_config`). It reads the annotations with
`readers.read_dataset` (so the same rules, skips and `ReadReport`s apply), reads each image's
file bytes from the given image directory (local or gs://, through `etils.epath`) and writes one
ArrayRecord example per INSTANCE with `download_and_prepare()`. Reading uses
`builder.as_data_source(split)` (TensorFlow-free random access; `as_dataset()` would need TF).

Why per instance, with the image's original encoded bytes in every instance:
* the pipeline samples, shuffles and mixes instances (mixing weights and epoch lengths count
  instances), so a per-instance record gives grain O(1) random access with no index to build;
* the bytes are the file as stored, never re-encoded: the decoded image is bit-identical to
  reading the JPEG file, so training and evaluation match the path-based reader exactly;
* the cost per sample is one full-image decode, exactly what the path-based reader (and mmpose)
  pays; storing the image once per image would save disk (COCO has ~2.6 instances per kept
  image) but not decode time, since each instance is sampled on its own. Pre-cropped padded
  regions would make decoding cheaper but need re-encoding (lossy, or large if lossless) and a
  crop large enough for the scale/rotation/half-body augmentation; not done.

Example features: `image_bytes` (encoded file), `image_path` (where the bytes came from),
`image_wh` (the annotated size, checked when the bytes are decoded; 0 = unknown), the
ids (`image_id`, `ann_id`, `bbox_id`, `category_id`, `dataset_index`), `bbox_score`, `bbox` [4],
`center` [2], `scale` [2], `keypoints` [K, 3]. The builder stores the reference dataset index
(spec §4.1 order) and no centre jitter; `TfdsRecords` overrides the index with the experiment's
and applies the seeded jitter by record position (`coco_reader.jitter_center`), so with the same
seed its records equal `read_dataset(..., center_jitter_seed=seed)`'s. Examples keep the
reader's order (`DatasetInfo.disable_shuffling`): grain shuffles.

The dataset's metadata holds each split's `ReadReport` and the `image_size_hw` / `padding` the
centre/scale were computed with (checked on reading).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import readers
from data_pipelines import storage
from data_pipelines.coco_reader import ReadReport, jitter_center
from data_pipelines.image_files import read_bytes
from data_pipelines.skeletons import REAL_SKELETONS, SkeletonInfo

# The reference's dataset_idx of each format (spec §4.1); records carry it until a reader
# overrides it with the experiment's own order.
REFERENCE_DATASET_INDEX: dict[str, int] = {
    "coco": 0, "aic": 1, "mpii": 2, "ap10k": 3, "apt36k": 4, "coco_wholebody": 5}


@dataclasses.dataclass(eq=False)
class KeypointsConfig(tfds.core.BuilderConfig):
  """A build: its name (the dataset's), annotation format and keypoints per instance."""

  format: str = "coco"
  num_keypoints: int = 17


def builder_config(name: str, format: str | None = None, num_keypoints: int | None = None
                   ) -> "KeypointsConfig":
  """The BuilderConfig of the build `name`.

  A reference format's name ("coco", ...) is its standard config (format and keypoint count
  fixed, any given ones must agree); any other name needs `format` (default "coco") and
  `num_keypoints`.

  Raises:
    ValueError: a reference format's name with another format or count, a name TFDS cannot use,
      or a new build without `num_keypoints`.
  """
  if name in _STANDARD:
    std = _STANDARD[name]
    if (format or std.format) != std.format or (num_keypoints or std.num_keypoints) != \
        std.num_keypoints:
      raise ValueError(f"build {name!r} is the reference {name!r} format with "
                       f"{std.num_keypoints} keypoints (asked: format {format!r}, "
                       f"{num_keypoints} keypoints); give the dataset another name")
    return std
  if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
    raise ValueError(f"dataset name {name!r} cannot name a TFDS build (letters, digits, '_', "
                     f"'.', '-')")
  readers.check_format(format or "coco")
  if num_keypoints is None or int(num_keypoints) <= 0:
    raise ValueError(f"build {name!r}: give its number of keypoints (a new skeleton's)")
  return KeypointsConfig(name=name, description=f"{name} keypoint instances ({format or 'coco'} "
                         f"format, {int(num_keypoints)} keypoints)", format=format or "coco",
                         num_keypoints=int(num_keypoints))


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """The files of one split: annotations, for a detection split the detection boxes, and the
  split's image directory if it is not the build's (COCO's val2017 beside train2017)."""

  ann: str
  det: str | None = None
  image_dir: str | None = None


_STANDARD: dict[str, KeypointsConfig] = {}  # Filled below from PosebhKeypoints.BUILDER_CONFIGS.


class PosebhKeypoints(tfds.core.GeneratorBasedBuilder):
  """Top-down pose instances of one real dataset (config = annotation format)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Per-instance records with encoded image bytes.",
                   "1.1.0": "image_wh: the annotated image size, checked when decoding."}
  BUILDER_CONFIGS = [KeypointsConfig(name=f, description=f"{f} keypoint instances", format=f,
                                     num_keypoints=REAL_SKELETONS[f].num_keypoints)
                     for f in readers.FORMATS if f in REAL_SKELETONS]
  # No checksums file beside the code (nothing is downloaded). Also sidesteps TFDS's lookup of
  # it, which imports the optional `importlib_resources` for builders defined in a package.
  code_path = None

  def __init__(self, *, splits: Mapping[str, SplitFiles] | None = None,
               image_dir: str | None = None, image_size_hw: Sequence[int] = (256, 192),
               padding: float = 1.25, det_bbox_thr: float = 0.0, decode_images: bool = False,
               **kwargs):
    """Args beyond TFDS's (`data_dir`, `config`, ...) are only needed to build, not to read.

    Args:
      splits: split name → files, e.g. `{"train": SplitFiles(ann), "val_det": SplitFiles(ann,
        det)}`.
      image_dir: directory the annotations' image names are relative to (local or gs://).
      image_size_hw: network input (H, W); sets the aspect of the COCO-format center/scale.
      padding: box padding factor.
      det_bbox_thr: minimum detection score for detection splits.
      decode_images: skip (and count) images that do not decode (a full decode of each image).
    """
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self._splits = dict(splits or {})
    self._image_dir = image_dir
    self._image_size_hw = tuple(int(v) for v in image_size_hw)
    self._padding = float(padding)
    self._det_bbox_thr = float(det_bbox_thr)
    self._decode_images = decode_images
    self.reports: dict[str, ReadReport] = {}

  @property
  def format(self) -> str:
    return self.builder_config.format

  def _info(self) -> tfds.core.DatasetInfo:
    k = self.builder_config.num_keypoints
    scalar = tfds.features.Scalar
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
            "image_path": tfds.features.Text(),
            "image_wh": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "image_id": scalar(dtype=np.int64),
            "ann_id": scalar(dtype=np.int64),
            "bbox_id": scalar(dtype=np.int64),
            "category_id": scalar(dtype=np.int64),
            "dataset_index": scalar(dtype=np.int64),
            "bbox_score": scalar(dtype=np.float32),
            "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "center": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "scale": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "keypoints": tfds.features.Tensor(shape=(k, 3), dtype=np.float32),
        }),
        metadata=tfds.core.MetadataDict(),
        # Keep the reader's order: the jitter is keyed by position, and grain shuffles anyway.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: annotations and images are given.
    if not self._splits or self._image_dir is None:
      raise ValueError(f"{self.name}/{self.format}: building needs splits=... and image_dir=...")
    fmt = self.format
    # The readers only check the keypoint count against it; names and sigmas are not stored.
    skeleton = REAL_SKELETONS.get(fmt)
    if skeleton is None or skeleton.num_keypoints != self.builder_config.num_keypoints:
      k = self.builder_config.num_keypoints
      skeleton = SkeletonInfo(name=self.builder_config.name,
                              keypoint_names=tuple(f"kp{i}" for i in range(k)), swap=("",) * k,
                              sigmas=(0.1,) * k, upper_body=(True,) * k)
    generators = {}
    for split, files in self._splits.items():
      records, report = readers.read_dataset(
          fmt, files.ann, files.image_dir or self._image_dir, skeleton,
          REFERENCE_DATASET_INDEX.get(self.builder_config.name, -1), image_size_hw=self._image_size_hw, padding=self._padding,
          det_path=files.det, det_bbox_thr=self._det_bbox_thr, check_images=True,
          decode_images=self._decode_images)
      if not records:
        raise ValueError(f"{self.builder_config.name} split {split!r}: no usable instances "
                         f"({report})")
      self.reports[split] = report
      generators[split] = self._generate_examples(records)
    self.info.metadata.update(
        image_size_hw=list(self._image_size_hw), padding=self._padding,
        detection_splits=sorted(s for s, f in self._splits.items() if f.det is not None),
        read_reports={s: r.as_dict() for s, r in self.reports.items()})
    return generators

  def _generate_examples(self, records: Sequence[dict[str, Any]]):
    path, data = None, b""
    for i, r in enumerate(records):
      if r["image_path"] != path:  # Records come grouped by image: read each file once in a row.
        path, data = r["image_path"], read_bytes(r["image_path"])
      yield i, {
          # The path is only for messages: names that are not UTF-8 are stored escaped.
          "image_bytes": data, "image_path": storage.display(path),
          **{k: r[k] for k in ("image_wh", "image_id", "ann_id", "bbox_id", "category_id",
                               "dataset_index", "bbox_score", "bbox", "center", "scale",
                               "keypoints")}}


_STANDARD.update({c.name: c for c in PosebhKeypoints.BUILDER_CONFIGS})


def _config_arg(name: str, format: str | None, num_keypoints: int | None
                ) -> str | KeypointsConfig:
  # TFDS refuses a config object named like one of BUILDER_CONFIGS: standard builds by name.
  config = builder_config(name, format, num_keypoints)
  return config.name if config.name in _STANDARD else config


def build(name: str, data_dir: str, splits: Mapping[str, SplitFiles], image_dir: str, *,
          image_size_hw: Sequence[int] = (256, 192), padding: float = 1.25,
          det_bbox_thr: float = 0.0, decode_images: bool = False, format: str | None = None,
          num_keypoints: int | None = None) -> tuple[PosebhKeypoints, dict[str, ReadReport]]:
  """Builds one dataset's splits into `data_dir` (ArrayRecord); returns the builder and reports.

  `name` is a reference format ("coco", ...) or a dataset name with its `format` and
  `num_keypoints` (`builder_config`). If that dataset version is already under `data_dir`,
  TFDS reuses it and the reports are those stored at its build (from the metadata).

  `data_dir` may be a URL (gs://...): ArrayRecord cannot write to object stores, so the build
  goes to a local temporary directory and is then copied up (`dataset_info.json` last, so the
  remote build counts as prepared only when complete); the returned builder reads the remote
  copy.

  Raises:
    ValueError: an existing build lacks one of `splits` or was built with another
      `image_size_hw` / `padding` (delete it to rebuild); a bad name / format / count.
  """
  kwargs = dict(config=_config_arg(name, format, num_keypoints), splits=splits,
                image_dir=image_dir, image_size_hw=image_size_hw, padding=padding,
                det_bbox_thr=det_bbox_thr, decode_images=decode_images)
  builder = PosebhKeypoints(data_dir=data_dir, **kwargs)
  if storage.is_remote(data_dir) and not builder.is_prepared():
    with tempfile.TemporaryDirectory(prefix="posebh-tfds-") as local_dir:
      local = PosebhKeypoints(data_dir=local_dir, **kwargs)
      local.download_and_prepare()
      storage.upload_tree(os.fspath(local.data_dir), os.fspath(builder.data_dir),
                          last=("dataset_info.json",))
    builder = PosebhKeypoints(data_dir=data_dir, **kwargs)
    builder.reports = local.reports
  builder.download_and_prepare()
  if not builder.reports:  # Reused: check it is the build that was asked for.
    meta = builder.info.metadata
    missing = sorted(set(splits) - set(builder.info.splits))
    stale = [f"{k}={meta[k]} (asked {v})" for k, v in (
        ("image_size_hw", [int(x) for x in image_size_hw]), ("padding", float(padding)))
             if meta[k] != v]
    if missing or stale:
      raise ValueError(f"{builder.data_dir} exists but "
                       + "; ".join(([f"has no split {missing}"] if missing else []) + stale)
                       + ": delete it to rebuild")
  return builder, builder.reports or stored_reports(builder)


def stored_reports(builder: tfds.core.DatasetBuilder) -> dict[str, ReadReport]:
  """The `ReadReport`s saved in a built dataset's metadata."""
  out = {}
  for split, d in builder.info.metadata.get("read_reports", {}).items():
    report = ReadReport(source=d["source"], kept=d["kept"])
    report.skipped.update(d["skipped"])
    out[split] = report
  return out


def open_builder(data_dir: str, name: str, *, format: str | None = None,
                 num_keypoints: int | None = None) -> PosebhKeypoints:
  """The built dataset `name` under `data_dir`, for reading (`builder_config` arguments)."""
  builder = PosebhKeypoints(data_dir=data_dir,
                            config=_config_arg(name, format, num_keypoints))
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"no built {name!r} dataset under {data_dir} (expected {builder.data_dir}); build it "
        f"with: python -m data_pipelines.build_tfds --dataset={name} --ann=... --images=... "
        f"--data_dir={data_dir}")
  return builder


class TfdsRecords(Sequence):
  """A built split as a random-access sequence of the readers' record dicts (+ `image_bytes`).

  Works wherever a list of records does (`grain.MapDataset.source`, iteration, len) without
  reading everything into memory; decode images with `image_files.decode_record_image`.
  `image_path` is where the bytes were read from at build time (messages; not opened).
  """

  def __init__(self, data_dir: str, name: str, split: str, *,
               dataset_index: int | None = None, center_jitter_seed: int | None = None,
               center_jitter_prob: float = 0.3, image_size_hw: Sequence[int] | None = None,
               padding: float | None = None, format: str | None = None,
               num_keypoints: int | None = None):
    """Args:
      data_dir, name, split: which built split (`name`: a reference format or a dataset name).
      format, num_keypoints: a non-reference build's (`builder_config`).
      dataset_index: the experiment's index of this dataset (default: the stored reference one).
      center_jitter_seed: the run's seed for the training centre jitter (None: none); not for
        MPII or detection splits.
      center_jitter_prob: its probability.
      image_size_hw, padding: if given, must equal what the centre/scale were built with.
    """
    builder = open_builder(data_dir, name, format=format, num_keypoints=num_keypoints)
    format = builder.format
    meta = builder.info.metadata
    for name, want, have in (("image_size_hw", image_size_hw, meta["image_size_hw"]),
                             ("padding", padding, meta["padding"])):
      if want is not None and list(np.atleast_1d(want)) != list(np.atleast_1d(have)):
        raise ValueError(f"{builder.data_dir}: built with {name}={have}, asked for {want}; "
                         f"rebuild it for this config")
    if center_jitter_seed is not None and (format == "mpii"
                                           or split in meta["detection_splits"]):
      raise ValueError(f"{format}/{split}: no centre jitter for MPII or detection boxes")
    self.source = builder.as_data_source(split)
    self.dataset_index = dataset_index
    self.center_jitter_seed = center_jitter_seed
    self.center_jitter_prob = center_jitter_prob

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
    if isinstance(index, slice):  # A list, like slicing the readers' record lists (batching).
      return [self[i] for i in range(*index.indices(len(self)))]
    if not isinstance(index, (int, np.integer)):
      raise TypeError(f"TfdsRecords takes an integer index or a slice, not "
                      f"{type(index).__name__}")
    n = len(self.source)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {n} records")
    index = int(index) % n
    record = tfds_example_to_record(self.source[index], dataset_index=self.dataset_index)
    if self.center_jitter_seed is not None:
      record = jitter_center(record, self.center_jitter_seed, index, self.center_jitter_prob)
    return record


def tfds_example_to_record(example: Mapping[str, Any], *, dataset_index: int | None = None
                           ) -> dict[str, Any]:
  """A data-source example (numpy) → the readers' record dict, plus `image_bytes`."""
  path = example["image_path"]
  return dict(
      image_path=path.decode() if isinstance(path, bytes) else str(path),
      image_wh=np.asarray(example["image_wh"], np.int32),
      image_bytes=bytes(example["image_bytes"]),
      image_id=int(example["image_id"]), ann_id=int(example["ann_id"]),
      bbox_id=int(example["bbox_id"]),
      dataset_index=int(example["dataset_index"] if dataset_index is None else dataset_index),
      category_id=int(example["category_id"]), bbox_score=float(example["bbox_score"]),
      bbox=np.asarray(example["bbox"], np.float32),
      center=np.asarray(example["center"], np.float32),
      scale=np.asarray(example["scale"], np.float32),
      keypoints=np.asarray(example["keypoints"], np.float32))
