r"""Build real datasets into TFDS ArrayRecord files (no TensorFlow needed).

Every dataset of an experiment config, with its files, crop size and padding:

  python -m data_pipelines.build_tfds --config=configs/posebh.py:b \
      --config.data.root=/data --data_dir=/data/tfds

Each `data.datasets` entry gives split `train` (train_ann, image_dir), `val` (val_ann,
val_image_dir or image_dir) and, where `val_det` is set, `val_det` (those detections with
val_ann naming the images); paths are relative to `data.root`. --data_dir defaults to the
config's `data.tfds_dir`; train with the same `data.tfds_dir`. Builds are keyed by dataset name
(`<data_dir>/posebh_keypoints/<dataset>/1.0.0`) and store the dataset's own skeleton's keypoint
count (`datasets.tfds_builds`), so a new skeleton, or a second dataset of one format, gets its
own build; an unknown format, and a dataset named like a reference format ("coco", ...) with
another format or keypoint count, are refused naming the dataset. An evaluation-only entry (no
train_ann) and each `data.eval_datasets` entry (OCHuman) build their validation splits only;
generated synthetic datasets in the config are skipped (the run generates and reads them). An
already built dataset is reused (checked to have the splits, crop size and padding asked for).

One dataset from explicit files:

  python -m data_pipelines.build_tfds --dataset=coco \
      --ann=data/coco/annotations/person_keypoints_train2017.json \
      --val_ann=data/coco/annotations/person_keypoints_val2017.json \
      --det=data/coco/person_detection_results/COCO_val2017_detections_AP_H_56_person.json \
      --images=data/coco/train2017 --data_dir=/data/tfds

A dataset that is not one of the reference formats (coco, aic, mpii, ap10k, apt36k,
coco_wholebody) takes its annotation format from --format (default coco) and its keypoint count
from --skeleton (a known name or a JSON skeleton file), else from the annotation file:

  python -m data_pipelines.build_tfds --dataset=my_birds --skeleton=birds_skeleton.json \
      --ann=birds/train.json --val_ann=birds/val.json --images=birds/images --data_dir=/data/tfds

Splits: `train` from --ann, `val` from --val_ann, `val_det` (evaluation crops from detection
boxes, COCO formats only) from --det with --val_ann naming its images. All splits of one build
share --images. The dataset lands in `<data_dir>/posebh_keypoints/<dataset>/1.0.0`; read it with
`data_pipelines.tfds_builders.TfdsRecords(data_dir, dataset, split)`. Prints each split's
`ReadReport` (kept instances, skipped ones by reason); they are also stored in the dataset's
metadata. An unreadable file or record stops the build with a message naming it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import dataclasses

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from data_pipelines import annotation_info, datasets, readers, storage, tfds_builders
from data_pipelines.coco_reader import AnnotationError, ReadReport
from data_pipelines.skeletons import resolve_skeleton

FLAGS = flags.FLAGS

# Flags that --config replaces with its own fields.
_SINGLE_DATASET_FLAGS = ("dataset", "ann", "val_ann", "det", "images", "image_size", "padding",
                         "format", "skeleton")


def _define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config: build every dataset of `data.datasets`.",
      lock_config=True)
  flags.DEFINE_string("dataset", None, "Dataset name = TFDS config: a reference format "
                      f"({', '.join(readers.FORMATS)}) or a new dataset's name.")
  flags.DEFINE_enum("format", None, list(readers.FORMATS), "Annotation format of a new dataset "
                    "(default: --dataset if it is a format, else coco).")
  flags.DEFINE_string("skeleton", None, "A new dataset's skeleton (known name or JSON skeleton "
                      "file) for its keypoint count; default: the annotation file's.")
  flags.DEFINE_string("ann", None, "Training annotations (split 'train').")
  flags.DEFINE_string("val_ann", None, "Validation annotations (split 'val').")
  flags.DEFINE_string("det", None, "Person detections for split 'val_det' (needs --val_ann).")
  flags.DEFINE_string("images", None, "Image directory the annotations' file names are "
                      "relative to (local or gs://).")
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write to (local or gs://); "
                      "with --config, default: its data.tfds_dir.")
  flags.DEFINE_list("image_size", ["256", "192"], "Network input H,W (sets the box aspect).")
  flags.DEFINE_float("padding", 1.25, "Box padding factor.")
  flags.DEFINE_float("det_bbox_thr", 0.0, "Minimum detection score.")
  flags.DEFINE_bool("decode_images", False, "Decode every image and skip (count) corrupt ones.")



def splits_from_flags(ann: str | None, val_ann: str | None, det: str | None
                      ) -> dict[str, tfds_builders.SplitFiles]:
  """The split → files mapping the flags describe."""
  if det is not None and val_ann is None:
    raise app.UsageError("--det needs --val_ann (the ground truth that names the images)")
  splits = {}
  if ann is not None:
    splits["train"] = tfds_builders.SplitFiles(ann)
  if val_ann is not None:
    splits["val"] = tfds_builders.SplitFiles(val_ann)
  if det is not None:
    splits["val_det"] = tfds_builders.SplitFiles(val_ann, det)
  if not splits:
    raise app.UsageError("nothing to build: give --ann and/or --val_ann")
  return splits


def single_dataset_key(dataset: str, fmt: str | None, skeleton: str | None, ann: str
                       ) -> tuple[str, int | None]:
  """(format, keypoint count) of a --dataset build (see the module docstring).

  A reference format's name keeps its standard count (None); a new dataset's count is its
  --skeleton's, else the annotation file's (`annotation_info.keypoint_count`).

  Raises:
    ValueError: no way to tell a new dataset's keypoint count.
  """
  fmt = fmt or (dataset if dataset in readers.FORMATS else "coco")
  if skeleton:
    return fmt, resolve_skeleton(skeleton, default_name=dataset).num_keypoints
  if dataset in readers.FORMATS:
    return fmt, None
  k = annotation_info.keypoint_count(ann, fmt)
  if k is None:
    raise ValueError(f"--dataset={dataset}: cannot tell its keypoint count from {ann}; give "
                     f"--skeleton")
  return fmt, k


@dataclasses.dataclass(frozen=True)
class DatasetBuild:
  """One dataset of a config as a build: its TFDS config (= format) and split files."""

  name: str
  format: str
  image_dir: str
  splits: dict[str, tfds_builders.SplitFiles]
  num_keypoints: int = 0


def config_builds(config: ml_collections.ConfigDict) -> list[DatasetBuild]:
  """The builds of every dataset of `config`, in dataset order (see the module docstring).

  Raises:
    readers.UnknownFormatError, ValueError: a dataset that cannot be built (unknown format,
      a reference format's name with another format or count, generated synthetic data, no
      files); the message names it.
  """
  entries = datasets.dataset_entries(config)
  generated = [datasets.is_generated(config, n, e)
               for n, e in zip(config.data.dataset_names, entries)]
  if all(generated):
    raise ValueError("synthetic data is generated per workdir and read from its files; it has "
                     "no TFDS build")
  tfds_builds = datasets.tfds_builds(config)
  # Only the datasets that read files: generating the synthetic ones here would be wasted.
  sub = config
  if any(generated):
    sub = config.copy_and_resolve_references()
    with sub.unlocked():
      sub.data.synthetic.enabled = False
  files = datasets.dataset_files(sub, generated={})
  builds = []
  for f, tb, entry, gen in zip(files, tfds_builds, entries, generated):
    if gen:  # Generated per workdir; the training run reads its files.
      continue
    splits = {}
    if f.train_ann:
      splits["train"] = tfds_builders.SplitFiles(f.train_ann)
    val_dir = f.split_image_dir("val")
    if f.val_ann:
      splits["val"] = tfds_builders.SplitFiles(f.val_ann, image_dir=val_dir)
    if entry.get("val_det", ""):
      if not f.val_ann:
        raise ValueError(f"data.datasets.{f.name}: val_det needs val_ann (it names the images)")
      splits["val_det"] = tfds_builders.SplitFiles(
          f.val_ann, storage.join_root(config.data.root, entry.val_det), image_dir=val_dir)
    if not splits:
      raise ValueError(f"data.datasets.{f.name}: no train_ann or val_ann to build")
    builds.append(DatasetBuild(f.name, tb.format, f.image_dir or f.split_image_dir("val"),
                               splits, tb.num_keypoints))
  # Evaluation-only entries predicted through another dataset's head (OCHuman): their val
  # splits, under their own names, so posebh-eval can read them from the same tfds_dir.
  for name in config.data.eval_datasets:
    entry = config.data.datasets[name]
    f = datasets.entry_files(config, name)
    fmt = datasets.dataset_format(name, entry)
    if not f.val_ann:
      raise ValueError(f"data.datasets.{name}: an evaluation dataset needs val_ann")
    val_dir = f.split_image_dir("val")
    splits = {"val": tfds_builders.SplitFiles(f.val_ann, image_dir=val_dir)}
    if entry.get("val_det", ""):
      splits["val_det"] = tfds_builders.SplitFiles(
          f.val_ann, storage.join_root(config.data.root, entry.val_det), image_dir=val_dir)
    builds.append(DatasetBuild(name, fmt, val_dir, splits,
                               datasets.entry_skeleton(name, entry).num_keypoints))
  return builds


def build_config(config: ml_collections.ConfigDict, data_dir: str, *, det_bbox_thr: float = 0.0,
                 decode_images: bool = False, log=print) -> dict[str, dict[str, ReadReport]]:
  """Builds every dataset of `config` into `data_dir`; → dataset name → split → report.

  The crop size and padding (they fix the stored centre/scale) are the config's
  `data.image_size` and `data.bbox_padding`. All datasets are checked before the first build,
  so a bad entry fails fast.
  """
  builds = config_builds(config)
  out = {}
  for b in builds:
    builder, reports = tfds_builders.build(
        b.name, data_dir, b.splits, b.image_dir, image_size_hw=tuple(config.data.image_size),
        padding=config.data.bbox_padding, det_bbox_thr=det_bbox_thr,
        decode_images=decode_images, format=b.format, num_keypoints=b.num_keypoints)
    log(f"{b.name}: built {builder.data_dir}")
    for split, report in reports.items():
      log(f"  {split}: {report}")
    out[b.name] = reports
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config is not None:
    given = [f"--{n}" for n in _SINGLE_DATASET_FLAGS if FLAGS[n].present]
    if given:
      raise app.UsageError(f"--config takes its datasets, crop size and padding from the "
                           f"config; drop {given} (override --config.data.* instead)")
    data_dir = FLAGS.data_dir or config.data.tfds_dir
    if not data_dir:
      raise app.UsageError("--config: give --data_dir or set --config.data.tfds_dir")
    try:
      build_config(config, data_dir, det_bbox_thr=FLAGS.det_bbox_thr,
                   decode_images=FLAGS.decode_images)
    except (AnnotationError, ValueError, OSError, KeyError) as e:
      sys.exit(f"build_tfds: {e}")
    return
  missing = [f"--{n}" for n in ("dataset", "images", "data_dir") if FLAGS[n].value is None]
  if missing:
    raise app.UsageError(f"give --config=..., or {missing} for one dataset")
  splits = splits_from_flags(FLAGS.ann, FLAGS.val_ann, FLAGS.det)
  try:
    fmt, k = single_dataset_key(FLAGS.dataset, FLAGS.format, FLAGS.skeleton,
                                FLAGS.ann or FLAGS.val_ann)
    builder, reports = tfds_builders.build(
        FLAGS.dataset, FLAGS.data_dir, splits, FLAGS.images,
        image_size_hw=tuple(int(v) for v in FLAGS.image_size), padding=FLAGS.padding,
        det_bbox_thr=FLAGS.det_bbox_thr, decode_images=FLAGS.decode_images, format=fmt,
        num_keypoints=k)
  except (AnnotationError, ValueError, OSError) as e:
    sys.exit(f"build_tfds: {e}")
  print(f"built {builder.data_dir}")
  for split, report in reports.items():
    print(f"  {split}: {report}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
