"""MPII's json list (`image`, `center`, `scale`, `joints`, `joints_vis`) → instance records.

Same record layout as `coco_reader` (see there). MPII specifics (spec §4.3, `TopDownMpiiDataset`):

* centre/scale: if `center_x ≠ −1`, `center_y += 15·scale` and `scale *= 1.25`; then
  `center −= 1` (Matlab 1-based → 0-based); the scale is square `(s, s)` (no aspect fix);
  no centre jitter ever.
* joints −1 (0-based); visibility = `joints_vis`.
* `bbox_id` = `ann_id` = the entry's position in the file (the reference's running index over
  the file; kept even when earlier entries are skipped, so predictions stay aligned with the
  file's order, which MPII's PCKh ground truth follows); `image_id` = index of the
  image name in order of first appearance (the file has no ids); `category_id` 1, `bbox_score` 1.
* `bbox` (MPII has none; the PCK evaluator normalises by its size): the square of side
  `200·s_raw` (the annotated person scale, before the 1.25 padding) centred on the final 0-based
  centre, i.e. `(c_x − 100·s_raw, c_y − 100·s_raw, 200·s_raw, 200·s_raw)`, not clipped.

Like the reference, instances without any visible joint are kept (MPII evaluation covers every
annotated person). Bad input: a file that is not a JSON list, an entry missing a field, or the
wrong number of joints / flags, or an `image` that is not a file name raise `AnnotationError`
naming the file and the entry; non-finite values, an implausible scale (a person box under 1
pixel or over 20 times the image's larger side), flags outside {0, 1}, a labelled joint outside
the image (tested when the image is checked: its size is read from the file header) and
missing / corrupt images are counted skips.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from data_pipelines import transforms
from data_pipelines.coco_reader import AnnotationError, ReadReport, keypoint_problem, load_json
from data_pipelines import storage
from data_pipelines.image_files import ImageChecker
from data_pipelines.skeletons import SkeletonInfo

_FIELDS = ("image", "center", "scale", "joints", "joints_vis")


def _entry_arrays(a: Any, k: int, path: str, i: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
  """Entry i as (joints [K, 2], joints_vis [K], center [2]) float64 and scale; raises on
  structural errors."""
  if not isinstance(a, dict) or any(f not in a for f in _FIELDS):
    raise AnnotationError(f"{path}: entry {i}: needs fields {list(_FIELDS)}: {a!r:.200}")
  if not isinstance(a["image"], str) or not a["image"]:
    raise AnnotationError(f"{path}: entry {i}: 'image' must be an image file name, got "
                          f"{a['image']!r:.100}")
  where = f"{path}: entry {i} (image {a['image']})"
  try:
    joints = np.asarray(a["joints"], np.float64)
    vis = np.asarray(a["joints_vis"], np.float64)
    center = np.asarray(a["center"], np.float64)
    scale = float(a["scale"])
  except (TypeError, ValueError):
    raise AnnotationError(f"{where}: non-numeric center/scale/joints") from None
  if joints.shape != (k, 2) or vis.shape != (k,):
    raise AnnotationError(f"{where}: joints {joints.shape} / joints_vis {vis.shape}, expected "
                          f"({k}, 2) / ({k},) for skeleton with {k} keypoints")
  if center.shape != (2,):
    raise AnnotationError(f"{where}: center has shape {center.shape}, expected (2,)")
  return joints, vis, center, scale


# A person box (side 200·scale pixels) is at least this many pixels, and at most this many
# times the image's larger side (or _MAX_SIDE_PX where the image size is not read).
_MIN_SIDE_PX = 1.0
_MAX_SIDE_IMAGES = 20.0
_MAX_SIDE_PX = 1e5


def _plausible_scale(scale: float, size_wh: tuple[int, int] | None) -> bool:
  """Whether an MPII person scale describes a box of plausible size (1e-9 or 1e9 do not)."""
  side = 200.0 * scale
  limit = _MAX_SIDE_PX if size_wh is None else _MAX_SIDE_IMAGES * max(size_wh)
  return _MIN_SIDE_PX <= side <= limit


def read_mpii(
    ann_path: str,
    image_dir: str,
    skeleton: SkeletonInfo,
    dataset_index: int,
    *,
    check_images: bool = True,
    decode_images: bool = False,
) -> tuple[list[dict[str, Any]], ReadReport]:
  """Reads an MPII json list into instance records (spec §4.3, MPII paragraph).

  Args:
    ann_path: the JSON file (local or gs://), e.g. `mpii_train.json`.
    image_dir: directory that the entries' `image` names are relative to.
    skeleton: MPII's 16-keypoint skeleton (any K works; every entry must have K joints).
    dataset_index: stored in each record.
    check_images: skip (and count) instances whose image is missing; also reads the image size
      (header only) to reject labelled joints outside the image.
    decode_images: also skip (and count) images that do not decode (slow).

  Returns:
    (records, report).
  """
  data = load_json(ann_path, required=())
  if not isinstance(data, list):
    raise AnnotationError(f"{ann_path}: not an MPII annotation file (expects a JSON list of "
                          f"entries with {list(_FIELDS)})")
  report = ReadReport(source=ann_path)
  k = skeleton.num_keypoints
  checker = ImageChecker(decode=decode_images)
  image_ids: dict[str, int] = {}
  records = []
  for i, a in enumerate(data):
    joints, vis, center_raw, scale_raw = _entry_arrays(a, k, ann_path, i)
    path = storage.join(image_dir, a["image"])
    size_wh = None
    problem = None
    if not (np.all(np.isfinite(center_raw)) and math.isfinite(scale_raw) and scale_raw > 0):
      problem = "malformed center/scale"
    if problem is None and (check_images or decode_images):
      status = checker(path, need_size=True)
      problem, size_wh = status.problem, status.size_wh
    if problem is None and not _plausible_scale(scale_raw, size_wh):
      problem = "implausible scale"
    kpts = np.concatenate([joints - 1, vis[:, None]], axis=1)  # Matlab 1-based → 0-based.
    if problem is None:
      problem = keypoint_problem(kpts, size_wh)
    if problem is None and np.any((vis != 0) & (vis != 1)):
      problem = "invalid visibility"
    if problem is not None:
      report.skip(problem)
      continue
    center, scale = transforms.mpii_center_scale(center_raw, scale_raw)
    side = 200.0 * scale_raw
    bbox = np.array([center[0] - side / 2, center[1] - side / 2, side, side], np.float32)
    image_id = image_ids.setdefault(a["image"], len(image_ids))
    records.append(dict(
        image_path=path,
        image_wh=np.array(size_wh if size_wh is not None else (0, 0), np.int32),
        image_id=image_id, ann_id=i, bbox_id=i,
        dataset_index=int(dataset_index), category_id=1, bbox_score=1.0, bbox=bbox,
        center=center, scale=scale, keypoints=kpts.astype(np.float32)))
  report.kept = len(records)
  return records, report
