r"""Build one real dataset into TFDS ArrayRecord files (no TensorFlow needed).

  python -m data_pipelines.build_tfds --dataset=coco \
      --ann=data/coco/annotations/person_keypoints_train2017.json \
      --val_ann=data/coco/annotations/person_keypoints_val2017.json \
      --det=data/coco/person_detection_results/COCO_val2017_detections_AP_H_56_person.json \
      --images=data/coco/train2017 --data_dir=/data/tfds

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

from absl import app, flags

from data_pipelines import readers, tfds_builders
from data_pipelines.coco_reader import AnnotationError

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_enum("dataset", None, list(readers.FORMATS), "Annotation format = TFDS config.")
  flags.DEFINE_string("ann", None, "Training annotations (split 'train').")
  flags.DEFINE_string("val_ann", None, "Validation annotations (split 'val').")
  flags.DEFINE_string("det", None, "Person detections for split 'val_det' (needs --val_ann).")
  flags.DEFINE_string("images", None, "Image directory the annotations' file names are "
                      "relative to (local or gs://).")
  flags.DEFINE_string("data_dir", None, "TFDS data directory to write to (local or gs://).")
  flags.DEFINE_list("image_size", ["256", "192"], "Network input H,W (sets the box aspect).")
  flags.DEFINE_float("padding", 1.25, "Box padding factor.")
  flags.DEFINE_float("det_bbox_thr", 0.0, "Minimum detection score.")
  flags.DEFINE_bool("decode_images", False, "Decode every image and skip (count) corrupt ones.")
  flags.mark_flags_as_required(["dataset", "images", "data_dir"])


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


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  splits = splits_from_flags(FLAGS.ann, FLAGS.val_ann, FLAGS.det)
  try:
    builder, reports = tfds_builders.build(
        FLAGS.dataset, FLAGS.data_dir, splits, FLAGS.images,
        image_size_hw=tuple(int(v) for v in FLAGS.image_size), padding=FLAGS.padding,
        det_bbox_thr=FLAGS.det_bbox_thr, decode_images=FLAGS.decode_images)
  except (AnnotationError, ValueError, OSError) as e:
    sys.exit(f"build_tfds: {e}")
  print(f"built {builder.data_dir}")
  for split, report in reports.items():
    print(f"  {split}: {report}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
