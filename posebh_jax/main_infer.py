r"""posebh-infer: keypoints and overlays for your own images, any of the model's skeletons.

  posebh-infer --config=configs/posebh.py:b --weights=/ckpt/posebh_b_converted \
      --images=photos/ --out=/tmp/poses
  posebh-infer --config=configs/posebh.py:b --workdir=/runs/posebh_b [--step=N] \
      --images=a.jpg,b.jpg --boxes=boxes.json --skeletons=coco,coco_wholebody,ap10k \
      --through=prototypes --out=/tmp/poses

`--images`: image files and/or folders, comma separated (a folder means its .jpg/.jpeg/.png/.bmp/
.tif/.tiff/.webp files). `--boxes` (optional, boxes as x, y, w, h in image pixels): either

  {"photo1.jpg": [[x, y, w, h], [x, y, w, h, score], ...], ...}     keyed by image file name

or a COCO detection result file `[{"image_id": 785, "bbox": [x, y, w, h], "score": 0.99,
"category_id": 1}, ...]`, matched to images by the number in their file name (COCO's
000000000785.jpg is image 785); detections of other categories than `--det_category` or
scoring below `--box_score_thr` are dropped. Without `--boxes` the whole image is one box; with
it, an image the file has no boxes for gets no instances.

For every image, `<out>/<stem>.json` holds each instance's box and, per skeleton, the keypoints
with names and scores, and `<out>/<stem>.png` the overlay. Unreadable images are skipped, named,
and make the exit status 1 after the others are done.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from posebh_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file of the model (a .py with get_config()).",
    lock_config=True)
_WEIGHTS = flags.DEFINE_string("weights", None, "Converted weights (posebh-convert --out).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir whose checkpoint to use.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: latest).")
_IMAGES = flags.DEFINE_string("images", None, "Image files and/or folders, comma separated.")
_BOXES = flags.DEFINE_string("boxes", None, "Boxes JSON (see the module help); default: whole "
                             "images.")
_SKELETONS = flags.DEFINE_string("skeletons", None, "Comma separated dataset names to predict "
                                 "(default: all of the config's).")
_THROUGH = flags.DEFINE_enum("through", "head", ["head", "prototypes"],
                             "Predict through each skeleton's heatmap head or its prototypes.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the JSON files and overlays.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Crops per forward pass.")
_FLIP = flags.DEFINE_bool("flip_test", True, "Average with the flipped crop (spec §5.2).")
_SCORE_THR = flags.DEFINE_float("score_thr", 0.3, "Keypoints drawn above this score.")
_MAX_SIDE = flags.DEFINE_integer("overlay_max_side", 0, "Shrink overlays to this longer side "
                                 "in pixels (0: the image's size); the JSON stays in image "
                                 "pixels.")
_DET_CATEGORY = flags.DEFINE_integer("det_category", 1, "COCO detection files: category kept "
                                     "(-1: all).")
_BOX_SCORE_THR = flags.DEFINE_float("box_score_thr", 0.0, "Boxes with a lower score are dropped.")
flags.mark_flags_as_required(["config", "images", "out"])


def main(argv) -> None:
  cli.no_positional_args(argv)
  if (_WEIGHTS.value is None) == (_WORKDIR.value is None):
    raise app.UsageError("give exactly one of --weights (converted) or --workdir (checkpoint)")
  if _WEIGHTS.value is not None and _STEP.value is not None:
    raise app.UsageError("--step selects a --workdir checkpoint; it does not apply to --weights")
  from data_pipelines.pipeline import ImageError
  from posebh_jax.image_inference import (BoxesFileError, ImagesError, discover_images,
                                         infer_images, load_boxes)
  from posebh_jax.inference import Predictor, UnknownSkeletonError, skeleton_index
  from posebh_jax.errors import CheckpointDamagedError, CheckpointMismatchError

  from posebh_jax import config_checks
  config = _CONFIG.value
  try:
    config_checks.check_config(config)
    # Everything that can be checked without the model first: a typo fails in seconds.
    images = discover_images(_IMAGES.value)
    skeletons = (tuple(s.strip() for s in _SKELETONS.value.split(",") if s.strip())
                 if _SKELETONS.value else tuple(config.data.dataset_names))
    for name in skeletons:
      skeleton_index(config, name)
    boxes = (load_boxes(_BOXES.value, det_category=_DET_CATEGORY.value,
                        score_thr=_BOX_SCORE_THR.value) if _BOXES.value else None)
    predictor = Predictor.from_checkpoint(
        config, _WEIGHTS.value or _WORKDIR.value, step=_STEP.value, batch_size=_BATCH.value,
        flip_test=_FLIP.value)
    result = infer_images(predictor, images, boxes, skeletons, _THROUGH.value, _OUT.value,
                          score_thr=_SCORE_THR.value, overlay_max_side=_MAX_SIDE.value)
  except (config_checks.ConfigError, FileNotFoundError, CheckpointMismatchError,
          CheckpointDamagedError, UnknownSkeletonError, ImageError, BoxesFileError,
          ImagesError) as e:
    sys.exit(f"posebh-infer: {e}")
  print(f"posebh-infer: {len(result['written'])} image(s) -> {_OUT.value} "
        f"(skeletons {', '.join(skeletons)}; through {_THROUGH.value})", flush=True)
  if result["failed"]:
    # A counted skip, like training's bad images: the readable images are written, and one
    # line names every image that was not, with why.
    print("posebh-infer: skipped {} unreadable image(s): {}".format(
        len(result["failed"]), "; ".join(result["failed"])), flush=True)


def run() -> None:
  """Console-script entry point."""
  cli.run(main, __doc__, "posebh-infer")


if __name__ == "__main__":
  run()
