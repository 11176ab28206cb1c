"""One entry point for every annotation format: `read_dataset(format, ...)`.

Formats (a dataset's `format`, spec §4.1): "coco", "aic", "ap10k", "apt36k" (COCO-format
files, `coco_reader.COCO` rules), "coco_wholebody" (`coco_reader.WHOLEBODY`: 133 keypoints,
body-only all-zero check, v > 0), "mpii" (MPII's json list, `mpii_reader`), "interhand2d"
(InterHand2.6M's data/camera/joint-3D triple named by its `_data.json`, `interhand_reader`). Synthetic data is
COCO-format ("coco"). With `det_path`, a COCO-format dataset is read as detection boxes for
evaluation (`detections`; spec §5.1 uses them for COCO and COCO-WholeBody) with `ann_path` as the
ground truth that names the images.
"""

from __future__ import annotations

from typing import Any

from data_pipelines import coco_reader, detections, interhand_reader, mpii_reader
from data_pipelines.coco_reader import ReadReport
from data_pipelines.skeletons import SkeletonInfo

# The COCO-format families and their keypoint rules.
COCO_FORMATS: dict[str, coco_reader.CocoVariant] = {
    "coco": coco_reader.COCO,
    "aic": coco_reader.COCO,
    "ap10k": coco_reader.COCO,
    "apt36k": coco_reader.COCO,
    "coco_wholebody": coco_reader.WHOLEBODY,
}
FORMATS: tuple[str, ...] = tuple(COCO_FORMATS) + ("mpii", "interhand2d")


class UnknownFormatError(ValueError):
  """An annotation format name that no reader handles."""


def check_format(format: str) -> str:
  """Returns `format` if known, else raises `UnknownFormatError` listing the known ones."""
  if format not in FORMATS:
    raise UnknownFormatError(f"unknown annotation format {format!r}; known: {list(FORMATS)}")
  return format


def read_dataset(
    format: str,
    ann_path: str,
    image_dir: str,
    skeleton: SkeletonInfo,
    dataset_index: int,
    *,
    image_size_hw: tuple[int, int],
    padding: float = 1.25,
    det_path: str | None = None,
    det_bbox_thr: float = 0.0,
    center_jitter_seed: int | None = None,
    check_images: bool = True,
    decode_images: bool = False,
) -> tuple[list[dict[str, Any]], ReadReport]:
  """Reads one dataset split into instance records (layout: `coco_reader` module docstring).

  Args:
    format: one of `FORMATS`.
    ann_path: annotation file (for detections: the ground truth naming the images).
    image_dir: directory the annotation's image names are relative to.
    skeleton: the dataset's skeleton.
    dataset_index: stored in each record.
    image_size_hw: network input (H, W) (aspect ratio of COCO-format center/scale).
    padding: box padding factor (1.25 in the reference; MPII has its own fixed rule).
    det_path: detection boxes to read instead of the ground-truth boxes (COCO formats only).
    det_bbox_thr: minimum detection score.
    center_jitter_seed: None (no jitter) or the run's seed for the training centre jitter of
      COCO-format ground-truth boxes (spec §4.3 step 4; MPII and detections never jitter).
    check_images: skip (and count) instances whose image file is missing.
    decode_images: also skip (and count) images that do not decode (slow).

  Returns:
    (records, report).

  Raises:
    UnknownFormatError: `format` is not one of `FORMATS`.
    ValueError: detections for MPII, or jitter asked for detections.
    coco_reader.AnnotationError: unreadable file or record (names both).
  """
  check_format(format)
  images = dict(check_images=check_images, decode_images=decode_images)
  if format == "mpii":
    if det_path is not None or center_jitter_seed is not None:
      raise ValueError("mpii: no detection boxes and no centre jitter (spec §4.3)")
    return mpii_reader.read_mpii(ann_path, image_dir, skeleton, dataset_index, **images)
  if format == "interhand2d":
    if det_path is not None or center_jitter_seed is not None:
      raise ValueError("interhand2d: no detection boxes and no centre jitter (boxes come from "
                       "the projected joints)")
    return interhand_reader.read_interhand2d(ann_path, image_dir, skeleton, dataset_index,
                                             image_size_hw=image_size_hw, **images)
  if det_path is not None:
    if center_jitter_seed is not None:
      raise ValueError(f"{format}: detection boxes are for evaluation; they are never jittered")
    return detections.read_detections(
        det_path, ann_path, image_dir, skeleton, dataset_index, image_size_hw=image_size_hw,
        padding=padding, det_bbox_thr=det_bbox_thr, **images)
  return coco_reader.read_coco_keypoints(
      ann_path, image_dir, skeleton, dataset_index, image_size_hw=image_size_hw,
      padding=padding, variant=COCO_FORMATS[format], center_jitter_seed=center_jitter_seed,
      **images)
