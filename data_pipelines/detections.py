"""Person detections (COCO results json) → evaluation records with the detector's boxes.

COCO val and COCO-WholeBody val are evaluated on detected boxes (spec §5.1: the AP_H_56 person
detections, `det_bbox_thr` 0.0); the other benchmarks use ground-truth boxes. Follows mmpose's
`_load_coco_person_detection_results`:

* only `category_id == 1` (person); boxes with `score < det_bbox_thr` are dropped (a box whose
  score equals the threshold is kept);
* center/scale from the detector's raw box with `_xywh2cs` (aspect fix, padding 1.25, never any
  jitter), and `bbox` is that raw box: exactly the reference's crops;
* `bbox_score` = the detection score (rounded to float32, like every float in the records);
  keypoints are zeros [K, 3] (nothing to compare against).

Differences from the reference, all counted in the `ReadReport` (the reference would keep these
boxes or crash): a detection whose `image_id` is not in the ground-truth `images` is skipped
("image not in annotation file"); a box that the ground-truth sanitiser (spec §4.3 step 1, with
the image size from the GT file) rejects is skipped ("zero-area box" / "box outside image"); and
`bbox_id` is the running index within each image (the reference counts over the whole file;
evaluation only needs (image_id, bbox_id) to be unique). `ann_id` is -1 (no annotation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines import transforms
from data_pipelines.coco_reader import (AnnotationError, ReadReport, box_problem, image_table,
                                        load_json)
from data_pipelines import storage
from data_pipelines.image_files import ImageChecker
from data_pipelines.skeletons import SkeletonInfo

PERSON_CATEGORY_ID = 1
_FIELDS = ("image_id", "category_id", "bbox", "score")


def read_detections(
    det_path: str,
    gt_ann_path: str,
    image_dir: str,
    skeleton: SkeletonInfo,
    dataset_index: int,
    *,
    image_size_hw: tuple[int, int],
    padding: float = 1.25,
    det_bbox_thr: float = 0.0,
    check_images: bool = True,
    decode_images: bool = False,
) -> tuple[list[dict[str, Any]], ReadReport]:
  """Reads detection boxes into evaluation records (same layout as `coco_reader`'s).

  Args:
    det_path: JSON list of `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`.
    gt_ann_path: the ground-truth file of the same images (its `images` give file names and
      sizes; `annotations` may be absent, as in COCO's test-dev image info).
    image_dir: directory that `images[].file_name` is relative to.
    skeleton: the skeleton the records are evaluated with (sets K of the zero keypoints).
    dataset_index: stored in each record.
    image_size_hw: network input (H, W); its aspect ratio shapes center/scale.
    padding: box padding factor (1.25 in the reference).
    det_bbox_thr: minimum detection score (spec §5.1: 0.0).
    check_images: skip (and count) detections whose image file does not exist.
    decode_images: also skip (and count) detections whose image does not decode (slow).

  Returns:
    (records, report); records in the file's order.
  """
  dets = load_json(det_path, required=())
  if not isinstance(dets, list):
    raise AnnotationError(f"{det_path}: not a detection file (expects a JSON list of "
                          f"{{{', '.join(_FIELDS)}}} entries)")
  if not dets:
    raise AnnotationError(f"{det_path}: no detections in the file")
  images = image_table(load_json(gt_ann_path, required=("images",)), gt_ann_path)
  report = ReadReport(source=det_path)
  aspect = image_size_hw[1] / image_size_hw[0]
  k = skeleton.num_keypoints
  checker = ImageChecker(decode=decode_images)
  next_bbox_id: dict[Any, int] = {}
  records = []
  for i, det in enumerate(dets):
    if not isinstance(det, dict) or any(f not in det for f in _FIELDS):
      raise AnnotationError(f"{det_path}: detection {i}: needs fields {list(_FIELDS)}: "
                            f"{det!r:.200}")
    score = det["score"]
    if not isinstance(score, (int, float)) or not np.isfinite(score):
      raise AnnotationError(f"{det_path}: detection {i}: score {score!r} is not a finite number")
    img = images.get(det["image_id"])
    if det["category_id"] != PERSON_CATEGORY_ID:
      problem = f"category_id not {PERSON_CATEGORY_ID}"
    elif score < det_bbox_thr:
      problem = "score below det_bbox_thr"
    elif img is None:
      problem = "image not in annotation file"
    else:
      _, problem = box_problem(det["bbox"], float(img["width"]), float(img["height"]))
    path = storage.join(image_dir, img["file_name"]) if img is not None else ""
    image_wh = (np.array([int(img["width"]), int(img["height"])], np.int32) if img is not None
                else np.zeros(2, np.int32))
    if problem is None and (check_images or decode_images):
      problem = checker(path, expected_wh=tuple(image_wh)).problem
    if problem is not None:
      report.skip(problem)
      continue
    box = np.asarray(det["bbox"], np.float64)
    center, scale = transforms.box_to_center_scale(box, aspect, padding=padding)
    image_id = det["image_id"]
    bbox_id = next_bbox_id.get(image_id, 0)
    next_bbox_id[image_id] = bbox_id + 1
    records.append(dict(
        image_path=path, image_wh=image_wh, image_id=int(image_id), ann_id=-1,
        bbox_id=bbox_id,
        dataset_index=int(dataset_index), category_id=PERSON_CATEGORY_ID,
        bbox_score=float(np.float32(score)), bbox=box.astype(np.float32),
        center=np.asarray(center, np.float32), scale=np.asarray(scale, np.float32),
        keypoints=np.zeros((k, 3), np.float32)))
  report.kept = len(records)
  return records, report
