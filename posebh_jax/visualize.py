"""Pose overlays: keypoints and limbs drawn in each skeleton's colours (cv2), RGB in and out.

Several skeletons can share one image (e.g. COCO and AP-10K keypoints predicted on the same
person): each instance is drawn with its own skeleton's limbs and colours (`SkeletonInfo.limbs`,
`keypoint_colors`, `limb_colors`; a neutral palette where a skeleton defines none), or with one
colour per skeleton when `skeleton_colors` is given, which tells overlapping skeletons apart.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from data_pipelines import storage
from data_pipelines.skeletons import Color, SkeletonInfo, get_skeleton

_DEFAULT_KEYPOINT: Color = (255, 255, 0)
_DEFAULT_LIMB: Color = (0, 200, 255)
_BOX: Color = (255, 255, 255)


def _skeleton_of(instance: Mapping[str, Any]) -> SkeletonInfo:
  """An instance's skeleton: a `SkeletonInfo` under "skeleton_info", else looked up by name."""
  if "skeleton_info" in instance:
    return instance["skeleton_info"]
  return get_skeleton(instance.get("skeleton_type", instance.get("skeleton")))


def draw_poses(image: np.ndarray, instances: Sequence[Mapping[str, Any]], *,
               score_thr: float = 0.3, radius: int | None = None, thickness: int | None = None,
               draw_boxes: bool = True,
               skeleton_colors: Mapping[str, Color] | None = None) -> np.ndarray:
  """Draws every instance's keypoints (score > `score_thr`) and the limbs between them.

  Args:
    image: `[H, W, 3]` uint8 RGB (not modified).
    instances: mappings with `keypoints` `[K, 3]` (x, y, score in image pixels), the skeleton
      (`skeleton_info`: a SkeletonInfo, or `skeleton_type` / `skeleton`: a known skeleton name;
      `Predictor.predict` output has them), and optionally `box` `[4]` (x, y, w, h).
    score_thr: keypoints at or below it (and limbs touching them) are not drawn.
    radius, thickness: keypoint radius and line width in pixels (default: from the image size).
    draw_boxes: outline each instance's box.
    skeleton_colors: optional colour per skeleton name, replacing that skeleton's own colours.

  Returns:
    `[H, W, 3]` uint8 RGB overlay.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
  canvas = np.ascontiguousarray(image).copy()
  size = max(image.shape[:2])
  radius = radius or max(2, round(0.006 * size))
  thickness = thickness or max(1, radius // 2)
  skeleton_colors = skeleton_colors or {}
  for inst in instances:
    skeleton = _skeleton_of(inst)
    kpts = np.asarray(inst["keypoints"], np.float64)
    if kpts.shape != (skeleton.num_keypoints, 3):
      raise ValueError(f"skeleton {skeleton.name!r} has {skeleton.num_keypoints} keypoints; "
                       f"got keypoints of shape {kpts.shape}")
    override = skeleton_colors.get(skeleton.name)
    kp_colors = ([override] * skeleton.num_keypoints if override else
                 skeleton.keypoint_colors or [_DEFAULT_KEYPOINT] * skeleton.num_keypoints)
    limb_colors = ([override] * len(skeleton.limbs) if override else
                   skeleton.limb_colors or [_DEFAULT_LIMB] * len(skeleton.limbs))
    shown = (kpts[:, 2] > score_thr) & np.all(np.isfinite(kpts[:, :2]), axis=1)
    pts = np.round(np.where(shown[:, None], kpts[:, :2], 0)).astype(np.int64)
    if draw_boxes and inst.get("box") is not None:
      x, y, w, h = (int(round(v)) for v in np.asarray(inst["box"], np.float64)[:4])
      cv2.rectangle(canvas, (x, y), (x + w, y + h), override or _BOX, thickness, cv2.LINE_AA)
    for (i, j), color in zip(skeleton.limbs, limb_colors):
      if shown[i] and shown[j]:
        cv2.line(canvas, tuple(map(int, pts[i])), tuple(map(int, pts[j])),
                 tuple(map(int, color)), thickness, cv2.LINE_AA)
    for k in np.flatnonzero(shown):
      cv2.circle(canvas, tuple(map(int, pts[k])), radius, tuple(map(int, kp_colors[k])), -1,
                 cv2.LINE_AA)
  return canvas


def save_overlay(path: str | os.PathLike, image: np.ndarray,
                 instances: Sequence[Mapping[str, Any]], *, max_side: int | None = None,
                 **kwargs: Any) -> str:
  """Draws the overlay (`draw_poses` options) and writes it as a PNG; returns the path.

  Args:
    max_side: if set and the image is larger, the overlay is drawn at full size and then
      shrunk (area interpolation) so that its longer side is `max_side` pixels.

  Raises:
    OSError: the file could not be written (the message names it).
  """
  path = os.fspath(path)
  overlay = draw_poses(image, instances, **kwargs)
  if max_side and max(overlay.shape[:2]) > max_side:
    f = max_side / max(overlay.shape[:2])
    size_wh = (max(1, round(overlay.shape[1] * f)), max(1, round(overlay.shape[0] * f)))
    overlay = cv2.resize(overlay, size_wh, interpolation=cv2.INTER_AREA)
  # Encode in memory, then write the bytes: cv2.imwrite takes neither URLs (gs://) nor file
  # names that are not UTF-8.
  ext = os.path.splitext(storage.basename(path))[1] or ".png"
  try:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
  except cv2.error:
    ok = False
  if not ok:
    raise OSError(f"could not encode the overlay {storage.display(path)} (a .png path?)")
  try:
    storage.write_bytes(path, buf.tobytes())
  except OSError as e:
    raise OSError(f"could not write the overlay {storage.display(path)}: "
                  f"{e.strerror or e}") from None
  return path
