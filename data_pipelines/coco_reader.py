"""COCO-format keypoint annotations → per-instance records for the top-down pipeline.

One record per person/animal instance (spec §4.3). Records are plain dicts of numpy arrays and
Python scalars so that grain can pickle them to worker processes:

  image_path    str       absolute path of the image file
  image_id      int
  ann_id        int
  dataset_index int       index of the dataset in `config.data.dataset_names`
  bbox          [4] f32   sanitised box (x, y, w, h) in image pixels
  center        [2] f32   box centre (no jitter)
  scale         [2] f32   box size / 200 after aspect fix and padding (mmpose convention)
  keypoints     [K, 3] f32 (x, y, visibility ∈ {0, 1}) in the dataset's skeleton order
  full_keypoints dict[str, [K_s, 3] f32]  optional: ground truth of other skeletons of the same body
                                          (synthetic data), for cross-skeleton evaluation

Bad input never passes silently: a file that is not valid JSON, lacks the COCO sections, or has
an annotation with the wrong number of keypoint values raises `AnnotationError` naming the file
and the record; instances that are merely unusable (crowd, empty or degenerate box, no labelled
keypoint, non-finite values, missing image file) are skipped and counted in a `ReadReport`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from data_pipelines import transforms
from data_pipelines.skeletons import SkeletonInfo


class AnnotationError(ValueError):
  """An annotation file or record that cannot be read; the message names file and record."""


@dataclasses.dataclass
class ReadReport:
  """What a reader kept and what it skipped, by reason."""

  source: str
  kept: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def skip(self, reason: str) -> None:
    self.skipped[reason] += 1

  def __str__(self) -> str:
    skips = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
    return f"{self.source}: kept {self.kept} instances; skipped {sum(self.skipped.values())} ({skips})"


def _load_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise AnnotationError(f"annotation file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise AnnotationError(f"{path}: malformed JSON ({e})") from None
  if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
    raise AnnotationError(f"{path}: not a COCO keypoint file (needs 'images' and 'annotations')")
  return data


def _keypoint_array(values: Any, k: int, path: str, ann_id: Any, field: str) -> np.ndarray:
  if not isinstance(values, (list, tuple)) or len(values) != 3 * k:
    n = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
    raise AnnotationError(
        f"{path}: annotation id {ann_id}: '{field}' has {n} values, expected {3 * k} "
        f"({k} keypoints × (x, y, v))")
  return np.asarray(values, np.float64).reshape(k, 3)


def read_coco_keypoints(
    ann_path: str,
    image_dir: str,
    skeleton: SkeletonInfo,
    dataset_index: int,
    *,
    image_size_hw: tuple[int, int],
    padding: float = 1.25,
    check_images: bool = True,
) -> tuple[list[dict[str, Any]], ReadReport]:
  """Reads one COCO-format keypoint file into instance records.

  Args:
    ann_path: the JSON file.
    image_dir: directory that `images[].file_name` is relative to.
    skeleton: the dataset's skeleton; every annotation must have `3 * K` keypoint values.
    dataset_index: stored in each record.
    image_size_hw: network input (H, W); its aspect ratio shapes center/scale (spec §4.3 step 4).
    padding: box padding factor (1.25 in the reference).
    check_images: skip (and count) instances whose image file does not exist.

  Returns:
    (records, report).
  """
  data = _load_json(ann_path)
  report = ReadReport(source=ann_path)
  k = skeleton.num_keypoints
  aspect = image_size_hw[1] / image_size_hw[0]
  images = {}
  for img in data["images"]:
    try:
      images[img["id"]] = img
    except (KeyError, TypeError):
      raise AnnotationError(f"{ann_path}: image record without 'id': {img!r:.200}") from None
  exists: dict[str, bool] = {}
  records = []
  for ann in data["annotations"]:
    ann_id = ann.get("id", "?") if isinstance(ann, dict) else "?"
    if not isinstance(ann, dict) or "image_id" not in ann:
      raise AnnotationError(f"{ann_path}: annotation id {ann_id}: missing 'image_id'")
    img = images.get(ann["image_id"])
    if img is None:
      raise AnnotationError(
          f"{ann_path}: annotation id {ann_id}: image_id {ann['image_id']} not in 'images'")
    if ann.get("iscrowd", 0):
      report.skip("crowd")
      continue
    if "keypoints" not in ann:
      report.skip("no keypoints")
      continue
    kpts = _keypoint_array(ann["keypoints"], k, ann_path, ann_id, "keypoints")
    if not np.all(np.isfinite(kpts)):
      report.skip("non-finite keypoints")
      continue
    if kpts.max() <= 0 or ann.get("num_keypoints", 1) == 0:
      report.skip("no labelled keypoint")
      continue
    bbox = ann.get("bbox")
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
      report.skip("malformed box")
      continue
    if "area" in ann and not ann["area"] > 0:
      report.skip("empty box")
      continue
    clean = transforms.sanitize_bbox(np.asarray(bbox, np.float64), img["width"], img["height"])
    if clean is None:
      report.skip("empty box")
      continue
    path = os.path.join(image_dir, img["file_name"])
    if check_images:
      if path not in exists:
        exists[path] = os.path.isfile(path)
      if not exists[path]:
        report.skip("missing image file")
        continue
    center, scale = transforms.box_to_center_scale(clean, aspect, padding=padding)
    keypoints = kpts.astype(np.float32)
    keypoints[:, 2] = np.minimum(1.0, keypoints[:, 2])  # Labelled-occluded counts as visible.
    record = dict(
        image_path=path, image_id=int(ann["image_id"]), ann_id=int(ann.get("id", len(records))),
        dataset_index=int(dataset_index), bbox=np.asarray(clean, np.float32),
        center=np.asarray(center, np.float32), scale=np.asarray(scale, np.float32),
        keypoints=keypoints)
    if "full_keypoints" in ann:
      full = {}
      for name, vals in ann["full_keypoints"].items():
        arr = np.asarray(vals, np.float32).reshape(-1, 3)
        arr[:, 2] = np.minimum(1.0, arr[:, 2])
        full[name] = arr
      record["full_keypoints"] = full
    records.append(record)
  report.kept = len(records)
  return records, report
