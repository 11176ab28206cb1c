"""Keypoints and overlays for image files (the library behind posebh-infer): image discovery,
boxes files, and the per-image JSON + overlay writer around `inference.Predictor`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from data_pipelines import storage


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class BoxesFileError(ValueError):
  """A boxes file that cannot be used; the message names the file and the record."""


class ImagesError(ValueError):
  """An --images list whose outputs would collide."""


def discover_images(spec: str) -> list[str]:
  """The image files named by a comma list of files and folders (local or gs://), folders
  expanded and sorted.

  Raises:
    FileNotFoundError: an entry that does not exist, or a folder without images.
    ImagesError: two images with the same file stem (their outputs would collide).
  """
  paths = []
  for entry in (e.strip() for e in spec.split(",")):
    if not entry:
      continue
    if storage.is_dir(entry):
      found = sorted(storage.join(entry, f) for f in storage.listdir(entry)
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {entry}")
      paths.extend(found)
    elif storage.is_file(entry):
      paths.append(entry)
    else:
      raise FileNotFoundError(f"no such image or folder: {entry}")
  if not paths:
    raise FileNotFoundError(f"--images={spec!r} names no images")
  stems: dict[str, str] = {}
  for p in paths:
    stem = _stem(p)
    if stem in stems:
      raise ImagesError(f"{storage.display(stems[stem])} and {storage.display(p)} would both "
                        f"write {storage.display(stem)}.json/.png")
    stems[stem] = p
  return paths


def _stem(path: str) -> str:
  """The file name without its extension (local path or URL)."""
  return os.path.splitext(storage.basename(path))[0]


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

  if not storage.is_file(path):
    raise FileNotFoundError(f"no such boxes file: {path}")
  try:
    data = json.loads(storage.read_text(path))
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
        add(storage.basename(name), box, f"record {name!r} box {i}")
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
  name = storage.basename(image_path)
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
  return dict(image=storage.display(image_path), height=size_hw[0], width=size_hw[1], through=through,
              flip_test=flip_test, skeletons=list(skeletons),
              instances=[instances[i] for i in sorted(instances)])


def infer_images(predictor, image_paths: Sequence[str],
                 boxes: Mapping[str | int, list[list[float]]] | None, skeletons: Sequence[str],
                 through: str, out_dir: str, *, score_thr: float = 0.3,
                 overlay_max_side: int = 0) -> dict[str, Any]:
  """Predicts, writes `<out_dir>/<stem>.json` and `.png` per image (local or gs://); unreadable
  images are skipped and listed.

  Returns:
    {"written": [json paths], "failed": [error messages]}.
  """
  from data_pipelines.pipeline import ImageError
  from posebh_jax import inference, visualize

  storage.makedirs(out_dir)
  written, failed = [], []
  for path in image_paths:
    try:
      rgb = inference.read_rgb(path)
    except ImageError as e:
      failed.append(str(e))
      continue
    image_boxes = None if boxes is None else boxes_for(boxes, path)
    poses = predictor.predict(rgb, image_boxes, skeletons, through=through, name=path)
    stem = storage.join(out_dir, _stem(path))
    doc = pose_json(path, rgb.shape[:2], poses, skeletons, through, predictor.core.flip_test)
    storage.write_text(stem + ".json", json.dumps(doc, indent=1))  # Atomic.
    visualize.save_overlay(stem + ".png", rgb, poses, score_thr=score_thr,
                           max_side=overlay_max_side or None)
    written.append(stem + ".json")
  return dict(written=written, failed=failed)
