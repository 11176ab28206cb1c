"""COCO-format keypoint annotations → per-instance records for the top-down pipeline.

Reads COCO, AIC, AP-10K, APT-36K and COCO-WholeBody (spec §4.3); `data_pipelines.readers`
dispatches to it by format name. One record per person/animal instance, in the reference's
order (images in file order, then each image's annotations in file order). Records are plain
dicts of numpy arrays and Python scalars so that grain can pickle them to worker processes:

  image_path    str       path of the image file (`image_dir` joined with `file_name`)
  image_wh      [2] i32   the image size (W, H) the annotation gives; decoding checks it (0 = unknown)
  image_id      int
  ann_id        int       the annotation's `id` (-1 for detection boxes)
  bbox_id       int       running index of the kept instances within their image (spec §4.3 step 5)
  dataset_index int       index of the dataset in `config.data.dataset_names`
  category_id   int       the annotation's `category_id` (-1 if absent); AP-10K evaluates per category
  bbox_score    float     1.0 for ground-truth boxes, the detector's score (float32 precision)
  bbox          [4] f32   sanitised box (x, y, w, h) in image pixels
  center        [2] f32   box centre (jittered only if asked, see `jitter_center`)
  scale         [2] f32   box size / 200 after aspect fix and padding (mmpose convention)
  keypoints     [K, 3] f32 (x, y, visibility) in the dataset's skeleton order
  full_keypoints dict[str, [K_s, 3] f32]  optional: ground truth of other skeletons of the same body
                                          (synthetic data), for cross-skeleton evaluation

Bad input never passes silently. A file that is missing, not valid JSON or lacks the COCO
sections, and a record that is structurally wrong (no image_id, an image_id not in `images`, the
wrong number of keypoint values, a WholeBody part missing) raise `AnnotationError` naming the
file and the record. Instances that are merely unusable are skipped and counted in a
`ReadReport`, checked in this order (the first reason that applies is counted):

  crowd                   `iscrowd` set (the reference never loads them)
  malformed box           `bbox` missing or not 4 finite numbers
  zero-area box           `area` ≤ 0, or the box collapses when sanitised (spec §4.3 step 1)
  box outside image       the box does not overlap the image (the reference's sanitiser would
                          clamp a box lying left of / above the image into its corner)
  no keypoints            no `keypoints` field
  non-finite keypoints    NaN / inf among the keypoint values
  invalid visibility      a visibility flag outside [0, 2]
  no labelled keypoint    all `keypoints` values zero, or `num_keypoints == 0` (COCO family)
  keypoint outside image  a labelled keypoint outside [0, W] × [0, H]
  missing image file / corrupt image / image size differs from annotation
                          (only with `check_images`; decoding and size only with `decode_images`)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import Any

import numpy as np
from etils import epath

from data_pipelines import storage
from data_pipelines import transforms
from data_pipelines.image_files import ImageChecker
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

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready form (stored in TFDS metadata)."""
    return dict(source=self.source, kept=self.kept, skipped=dict(sorted(self.skipped.items())))

  def __str__(self) -> str:
    skips = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
    return f"{self.source}: kept {self.kept} instances; skipped {sum(self.skipped.values())} ({skips})"


@dataclasses.dataclass(frozen=True)
class CocoVariant:
  """How a COCO-format family stores and filters its keypoints (spec §4.3 steps 2–3).

  Attributes:
    keypoint_fields: annotation fields concatenated, in order, into the [K, 3] keypoints.
      The all-zero check always looks at the first (`keypoints`, i.e. the 17 body values for
      WholeBody), as the reference does.
    skip_zero_num_keypoints: also skip `num_keypoints == 0` (COCO / AIC / AP-10K, not WholeBody).
    visible_if_positive: visibility = `v > 0` (WholeBody, whose part flags can be fractional
      confidences) instead of `min(1, v)`.
  """

  keypoint_fields: tuple[str, ...]
  skip_zero_num_keypoints: bool
  visible_if_positive: bool


COCO = CocoVariant(("keypoints",), skip_zero_num_keypoints=True, visible_if_positive=False)
# body 17 + foot 6 + face 68 + left hand 21 + right hand 21 = 133 (spec §4.3 step 3).
WHOLEBODY = CocoVariant(("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts"),
                        skip_zero_num_keypoints=False, visible_if_positive=True)
WHOLEBODY_PART_SIZES = (17, 6, 68, 21, 21)


def load_json(path: str, required: tuple[str, ...] = ("images", "annotations")) -> Any:
  """Reads a JSON file (local or gs://); with `required`, a dict holding those sections."""
  try:
    data = json.loads(epath.Path(path).read_bytes().decode("utf-8"))
  except FileNotFoundError:
    raise AnnotationError(f"annotation file not found: {path}") from None
  except UnicodeDecodeError as e:
    raise AnnotationError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); JSON annotation files must be UTF-8") from None
  except json.JSONDecodeError as e:
    raise AnnotationError(f"{path}: malformed JSON ({e})") from None
  if required and (not isinstance(data, dict) or any(k not in data for k in required)):
    raise AnnotationError(
        f"{path}: not a COCO keypoint file (needs {' and '.join(repr(k) for k in required)})")
  return data


def image_table(data: dict[str, Any], path: str) -> dict[Any, dict[str, Any]]:
  """`images` by id, in file order; every image needs id, file_name, width, height."""
  images = {}
  for img in data["images"]:
    if not isinstance(img, dict) or any(k not in img for k in ("id", "file_name", "width",
                                                                "height")):
      raise AnnotationError(
          f"{path}: image record needs 'id', 'file_name', 'width', 'height': {img!r:.200}")
    if img["id"] in images:
      raise AnnotationError(f"{path}: image id {img['id']} appears twice in 'images'")
    images[img["id"]] = img
  return images


def box_problem(bbox: Any, img_w: float, img_h: float, area: Any = None
                ) -> tuple[np.ndarray | None, str | None]:
  """Sanitises a raw box (spec §4.3 step 1) → (clean [4] f64 box, None) or (None, skip reason)."""
  if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
      or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
    return None, "malformed box"
  if area is not None and not isinstance(area, (int, float)):
    return None, "malformed box"
  x, y, w, h = bbox
  # Tested first: the sanitiser alone would clamp a box lying left of / above the image to a
  # box in its corner.
  if w > 0 and h > 0 and (x >= img_w or y >= img_h or x + w <= 0 or y + h <= 0):
    return None, "box outside image"
  clean = transforms.sanitize_bbox(np.asarray(bbox, np.float64), img_w, img_h, area=area)
  if clean is None:
    return None, "zero-area box"
  return clean, None


def keypoint_problem(kpts: np.ndarray, size_wh: tuple[float, float] | None) -> str | None:
  """Skip reason for raw [K, 3] (x, y, v) keypoints, or None: non-finite, bad flag, outside.

  A keypoint counts as labelled when v > 0; `size_wh` None skips the in-image test.
  """
  if not np.all(np.isfinite(kpts)):
    return "non-finite keypoints"
  v = kpts[:, 2]
  if np.any((v < 0) | (v > 2)):
    return "invalid visibility"
  if size_wh is not None:
    lab = kpts[v > 0, :2]
    if np.any((lab < 0) | (lab > np.asarray(size_wh, np.float64))):
      return "keypoint outside image"
  return None


def jitter_center(record: dict[str, Any], seed: int, index: int, prob: float = 0.3
                  ) -> dict[str, Any]:
  """The reference's train-time centre jitter (spec §4.3 step 4, §6.15), as a new record.

  With probability `prob`, `center += 0.4·(u − 0.5)·(w, h)` (u two U[0,1) draws, (w, h) the
  clean box), i.e. a shift within ±0.2·w, ±0.2·h. The draws come from a generator seeded by
  `(seed, index)`, `index` being the record's position in its dataset, so the jitter is fixed for
  a run (drawn once, like the reference's database build) and identical whether the records come
  from the JSON reader or from a TFDS source. The scale is not affected (mmpose jitters the
  centre only).
  """
  return jitter_center_from(record, np.random.default_rng((seed, index)), prob)


def jitter_center_from(record: dict[str, Any], rng: np.random.Generator, prob: float = 0.3
                       ) -> dict[str, Any]:
  """`jitter_center` with draws from `rng`: the train transform's per-example, per-epoch draw
  (the intended behaviour; spec §6.15)."""
  if rng.random() >= prob:
    return record
  w, h = (float(v) for v in record["bbox"][2:4])
  center = (record["center"] + 0.4 * (rng.random(2) - 0.5) * [w, h]).astype(np.float32)
  return {**record, "center": center}


def _keypoints(ann: dict[str, Any], variant: CocoVariant, k: int, path: str, ann_id: Any
               ) -> np.ndarray | None:
  """The annotation's [K, 3] float64 keypoints (None if it has no `keypoints` field)."""
  if "keypoints" not in ann:
    return None
  values = []
  for field in variant.keypoint_fields:
    part = ann.get(field)
    if not isinstance(part, (list, tuple)):
      raise AnnotationError(f"{path}: annotation id {ann_id}: missing or non-list {field!r}")
    values.extend(part)
  if len(values) != 3 * k:
    fields = " + ".join(repr(f) for f in variant.keypoint_fields)
    raise AnnotationError(
        f"{path}: annotation id {ann_id}: {fields} has {len(values)} values, expected {3 * k} "
        f"({k} keypoints × (x, y, v))")
  try:
    return np.asarray(values, np.float64).reshape(k, 3)
  except (TypeError, ValueError):
    raise AnnotationError(f"{path}: annotation id {ann_id}: non-numeric keypoint values") from None


def read_coco_keypoints(
    ann_path: str,
    image_dir: str,
    skeleton: SkeletonInfo,
    dataset_index: int,
    *,
    image_size_hw: tuple[int, int],
    padding: float = 1.25,
    variant: CocoVariant = COCO,
    check_images: bool = True,
    decode_images: bool = False,
    center_jitter_seed: int | None = None,
    center_jitter_prob: float = 0.3,
) -> tuple[list[dict[str, Any]], ReadReport]:
  """Reads one COCO-format keypoint file into instance records (spec §4.3).

  Args:
    ann_path: the JSON file (local or gs://).
    image_dir: directory that `images[].file_name` is relative to.
    skeleton: the dataset's skeleton; every annotation must have `3 * K` keypoint values.
    dataset_index: stored in each record.
    image_size_hw: network input (H, W); its aspect ratio shapes center/scale (spec §4.3 step 4).
    padding: box padding factor (1.25 in the reference).
    variant: `COCO` (COCO, AIC, AP-10K, APT-36K) or `WHOLEBODY`.
    check_images: skip (and count) instances whose image file does not exist.
    decode_images: also skip (and count) instances whose image does not decode (a full decode
      of every image: slow, off by default).
    center_jitter_seed: None (default: no jitter, the test-time boxes) or the run's seed for the
      training centre jitter (`jitter_center`, prob `center_jitter_prob`).

  Returns:
    (records, report).
  """
  data = load_json(ann_path)
  report = ReadReport(source=ann_path)
  k = skeleton.num_keypoints
  if variant == WHOLEBODY and k != sum(WHOLEBODY_PART_SIZES):
    raise AnnotationError(f"{ann_path}: COCO-WholeBody needs a 133-keypoint skeleton, "
                          f"got {skeleton.name!r} with {k}")
  aspect = image_size_hw[1] / image_size_hw[0]
  images = image_table(data, ann_path)
  by_image: dict[Any, list[dict[str, Any]]] = {i: [] for i in images}
  for ann in data["annotations"]:
    ann_id = ann.get("id", "?") if isinstance(ann, dict) else "?"
    if not isinstance(ann, dict) or "image_id" not in ann:
      raise AnnotationError(f"{ann_path}: annotation id {ann_id}: missing 'image_id'")
    if ann["image_id"] not in by_image:
      raise AnnotationError(
          f"{ann_path}: annotation id {ann_id}: image_id {ann['image_id']} not in 'images'")
    by_image[ann["image_id"]].append(ann)
  checker = ImageChecker(decode=decode_images)
  records = []
  for image_id, anns in by_image.items():
    img = images[image_id]
    size_wh = (float(img["width"]), float(img["height"]))
    path = storage.join(image_dir, img["file_name"])
    image_wh = np.array([int(img["width"]), int(img["height"])], np.int32)
    bbox_id = 0
    for ann in anns:
      ann_id = ann.get("id", "?")
      if ann.get("iscrowd", 0):
        report.skip("crowd")
        continue
      kpts = _keypoints(ann, variant, k, ann_path, ann_id)  # Structural errors raise first.
      clean, problem = box_problem(ann.get("bbox"), *size_wh, area=ann.get("area"))
      if problem is None:
        problem = "no keypoints" if kpts is None else keypoint_problem(kpts, size_wh=None)
      if problem is None:
        if (max(ann["keypoints"]) <= 0
            or (variant.skip_zero_num_keypoints and ann.get("num_keypoints", 1) == 0)):
          problem = "no labelled keypoint"
        else:
          problem = keypoint_problem(kpts, size_wh)
      if problem is None and (check_images or decode_images):
        problem = checker(path, expected_wh=tuple(image_wh)).problem
      if problem is not None:
        report.skip(problem)
        continue
      center, scale = transforms.box_to_center_scale(clean, aspect, padding=padding)
      keypoints = kpts.astype(np.float32)
      keypoints[:, 2] = ((keypoints[:, 2] > 0).astype(np.float32) if variant.visible_if_positive
                         else np.minimum(1.0, keypoints[:, 2]))  # Labelled-occluded is visible.
      record = dict(
          image_path=path, image_wh=image_wh, image_id=int(image_id),
          ann_id=int(ann.get("id", -1)),
          bbox_id=bbox_id, dataset_index=int(dataset_index),
          category_id=int(ann.get("category_id", -1)), bbox_score=1.0,
          bbox=np.asarray(clean, np.float32), center=np.asarray(center, np.float32),
          scale=np.asarray(scale, np.float32), keypoints=keypoints)
      if "full_keypoints" in ann:
        full = {}
        for name, vals in ann["full_keypoints"].items():
          arr = np.asarray(vals, np.float32).reshape(-1, 3)
          arr[:, 2] = np.minimum(1.0, arr[:, 2])
          full[name] = arr
        record["full_keypoints"] = full
      bbox_id += 1
      records.append(record)
  if center_jitter_seed is not None:
    records = [jitter_center(r, center_jitter_seed, i, center_jitter_prob)
               for i, r in enumerate(records)]
  report.kept = len(records)
  return records, report
