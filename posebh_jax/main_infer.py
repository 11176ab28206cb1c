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

import json
import os
import sys
from typing import Any, Mapping, Sequence

from absl import app, flags
from ml_collections import config_flags

from posebh_jax.cli_logging import setup_logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _define_flags() -> None:
  """Registers this CLI's flags, at run time: importing the module for its functions (tests,
  notebooks, the other CLIs) must not clash with other CLIs' flags of the same names."""
  global _CONFIG, _WEIGHTS, _WORKDIR, _STEP, _IMAGES, _BOXES, _SKELETONS, _THROUGH, _OUT
  global _BATCH, _FLIP, _SCORE_THR, _MAX_SIDE, _DET_CATEGORY, _BOX_SCORE_THR
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


class BoxesFileError(ValueError):
  """A boxes file that cannot be used; the message names the file and the record."""


class ImagesError(ValueError):
  """An --images list whose outputs would collide."""


def discover_images(spec: str) -> list[str]:
  """The image files named by a comma list of files and folders, folders expanded and sorted.

  Raises:
    FileNotFoundError: an entry that does not exist, or a folder without images.
    ImagesError: two images with the same file stem (their outputs would collide).
  """
  paths = []
  for entry in (e.strip() for e in spec.split(",")):
    if not entry:
      continue
    if os.path.isdir(entry):
      found = sorted(os.path.join(entry, f) for f in os.listdir(entry)
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {entry}")
      paths.extend(found)
    elif os.path.isfile(entry):
      paths.append(entry)
    else:
      raise FileNotFoundError(f"no such image or folder: {entry}")
  if not paths:
    raise FileNotFoundError(f"--images={spec!r} names no images")
  stems: dict[str, str] = {}
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    if stem in stems:
      raise ImagesError(f"{stems[stem]} and {p} would both write {stem}.json/.png")
    stems[stem] = p
  return paths


def load_boxes(path: str, *, det_category: int = 1, score_thr: float = 0.0
               ) -> dict[str | int, list[list[float]]]:
  """Reads a boxes file (either form in the module help).

  Returns:
    {image file name (str) or COCO image id (int): [[x, y, w, h, score], ...]}.

  Raises:
    FileNotFoundError: no such file.
    BoxesFileError: invalid JSON, or a record with a malformed box (file and record named).
  """
  from posebh_jax.inference import parse_box

  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such boxes file: {path}")
  try:
    with open(path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BoxesFileError(f"boxes file {path}: not valid JSON ({e})") from None

  table: dict[str | int, list[list[float]]] = {}

  def add(key: str | int, box: Any, where: str, *, score: Any = None) -> None:
    try:
      if score is not None:  # A detection: its bbox must be exactly 4 numbers by itself.
        if not isinstance(box, (list, tuple)) or len(box) != 4:
          raise ValueError(f"{where}: bbox must be [x, y, w, h], got {box!r}")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
          raise ValueError(f"{where}: score must be a number, got {score!r}")
        box = list(box) + [score]
      xywh, box_score = parse_box(box, where)
    except ValueError as e:
      raise BoxesFileError(f"boxes file {path}: {e}") from None
    table.setdefault(key, [])
    if box_score >= score_thr:
      table[key].append([float(v) for v in xywh] + [box_score])

  if isinstance(data, dict):
    for name, boxes in data.items():
      if not isinstance(boxes, list):
        raise BoxesFileError(f"boxes file {path}: record {name!r}: expected a list of boxes, "
                             f"got {type(boxes).__name__}")
      for i, box in enumerate(boxes):
        add(os.path.basename(name), box, f"record {name!r} box {i}")
  elif isinstance(data, list):
    for i, det in enumerate(data):
      if not isinstance(det, dict) or "bbox" not in det or "image_id" not in det:
        raise BoxesFileError(f"boxes file {path}: record {i}: a detection needs 'image_id' and "
                             f"'bbox', got {det!r}")
      if det_category != -1 and det.get("category_id", det_category) != det_category:
        continue
      try:
        image_id = int(det["image_id"])
      except (TypeError, ValueError):
        raise BoxesFileError(f"boxes file {path}: record {i}: image_id {det['image_id']!r} is "
                             "not an integer") from None
      add(image_id, det["bbox"], f"record {i}", score=det.get("score", 1.0))
  else:
    raise BoxesFileError(f"boxes file {path}: expected an object {{file name: boxes}} or a list "
                         f"of detections, got {type(data).__name__}")
  return table


def boxes_for(table: Mapping[str | int, list[list[float]]], image_path: str
              ) -> list[list[float]]:
  """The boxes of one image: by file name, else by the image id in its name; none if absent."""
  name = os.path.basename(image_path)
  if name in table:
    return table[name]
  stem = os.path.splitext(name)[0]
  if stem.isdigit() and int(stem) in table:
    return table[int(stem)]
  return []


def pose_json(image_path: str, size_hw: tuple[int, int], poses: Sequence[Mapping[str, Any]],
              skeletons: Sequence[str], through: str, flip_test: bool) -> dict[str, Any]:
  """The per-image JSON: instances (box, score), each with its keypoints per skeleton."""
  instances: dict[int, dict[str, Any]] = {}
  for p in poses:
    inst = instances.setdefault(p["instance"], dict(
        box=[round(float(v), 2) for v in p["box"]], box_score=float(p["box_score"]), poses={}))
    inst["poses"][p["skeleton"]] = [
        dict(name=n, x=round(float(x), 2), y=round(float(y), 2), score=round(float(s), 4))
        for n, (x, y, s) in zip(p["keypoint_names"], p["keypoints"])]
  return dict(image=image_path, height=size_hw[0], width=size_hw[1], through=through,
              flip_test=flip_test, skeletons=list(skeletons),
              instances=[instances[i] for i in sorted(instances)])


def infer_images(predictor, image_paths: Sequence[str],
                 boxes: Mapping[str | int, list[list[float]]] | None, skeletons: Sequence[str],
                 through: str, out_dir: str, *, score_thr: float = 0.3,
                 overlay_max_side: int = 0) -> dict[str, Any]:
  """Predicts, writes `<out_dir>/<stem>.json` and `.png` per image; unreadable images are
  skipped and listed.

  Returns:
    {"written": [json paths], "failed": [error messages]}.
  """
  from data_pipelines.pipeline import ImageError
  from posebh_jax import inference, visualize

  os.makedirs(out_dir, exist_ok=True)
  written, failed = [], []
  for path in image_paths:
    try:
      rgb = inference.read_rgb(path)
    except ImageError as e:
      failed.append(str(e))
      continue
    image_boxes = None if boxes is None else boxes_for(boxes, path)
    poses = predictor.predict(rgb, image_boxes, skeletons, through=through)
    stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
    doc = pose_json(path, rgb.shape[:2], poses, skeletons, through, predictor.core.flip_test)
    with open(stem + ".json.tmp", "w") as f:
      json.dump(doc, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    visualize.save_overlay(stem + ".png", rgb, poses, score_thr=score_thr,
                           max_side=overlay_max_side or None)
    written.append(stem + ".json")
  return dict(written=written, failed=failed)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_WEIGHTS.value is None) == (_WORKDIR.value is None):
    raise app.UsageError("give exactly one of --weights (converted) or --workdir (checkpoint)")
  if _WEIGHTS.value is not None and _STEP.value is not None:
    raise app.UsageError("--step selects a --workdir checkpoint; it does not apply to --weights")
  setup_logging()
  from data_pipelines.pipeline import ImageError
  from posebh_jax.inference import Predictor, UnknownSkeletonError, skeleton_index
  from posebh_jax.train.checkpoint import CheckpointMismatchError

  config = _CONFIG.value
  try:
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
  except (FileNotFoundError, CheckpointMismatchError, UnknownSkeletonError, ImageError,
          BoxesFileError, ImagesError) as e:
    sys.exit(f"posebh-infer: {e}")
  print(f"posebh-infer: {len(result['written'])} image(s) -> {_OUT.value} "
        f"(skeletons {', '.join(skeletons)}; through {_THROUGH.value})", flush=True)
  if result["failed"]:
    sys.exit("posebh-infer: skipped {} unreadable image(s):\n  {}".format(
        len(result["failed"]), "\n  ".join(result["failed"])))


def run() -> None:
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
