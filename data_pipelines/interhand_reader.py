"""InterHand2.6M (2-D) reader: the data / camera / joint-3D JSON triple → one record per hand.

InterHand2.6M ships, per split, `<prefix>_data.json` (COCO-style `images` with `capture`,
`camera`, `frame_idx`, and `annotations` with 42 `joint_valid` flags and `hand_type`),
`<prefix>_camera.json` (per capture: `campos`, `camrot`, `focal`, `princpt` per camera) and
`<prefix>_joint_3d.json` (per capture and frame: 42 `world_coord` joints, right hand then left).
As mmpose's `InterHand2DDataset` (the reference's reader):

* each image's first annotation gives the frame; its 42 world joints are projected with that
  capture's camera: `cam = R · (world − campos)`, `x = cam_x / (cam_z + 1e-8) · f_x + c_x`;
* per hand (joints 0–20, 21–41; the wrist last) the valid flags are multiplied by the wrist's
  (a hand without a valid root is all invalid), and a hand with more than 11 valid joints is an
  instance: keypoints [21, 3] (x, y, valid), box = the tightest box around the valid joints,
  centre/scale with padding 1.5;
* the annotation's `hand_type` ("right", "left", "interacting") and `hand_type_valid` are kept.

Records follow `coco_reader`'s layout plus `hand` ("right" / "left", which half of the 42
joints), `hand_type` and `hand_type_valid`. Only the data file is named in a config; the camera
and joint files sit beside it (`companion_files`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines import storage, transforms
from data_pipelines.coco_reader import AnnotationError, ReadReport, image_table, load_json
from data_pipelines.image_files import ImageChecker
from data_pipelines.skeletons import SkeletonInfo

JOINTS_PER_HAND = 21
HANDS = ("right", "left")  # InterHand2.6M's joint order: right hand 0–20, left hand 21–41.
PADDING = 1.5  # The reference's `_xywh2cs(*bbox, 1.5)`.
MIN_VALID_JOINTS = 11  # A hand needs more than this many valid joints.


def companion_files(data_path: str) -> tuple[str, str]:
  """(camera file, joint-3D file) beside `<prefix>_data.json`."""
  if not data_path.endswith("_data.json"):
    raise AnnotationError(f"{data_path}: an InterHand2.6M data file must end in '_data.json' "
                          f"(its camera and joint files are '<prefix>_camera.json' and "
                          f"'<prefix>_joint_3d.json' beside it)")
  prefix = data_path[:-len("_data.json")]
  return prefix + "_camera.json", prefix + "_joint_3d.json"


def project(world: np.ndarray, campos: np.ndarray, camrot: np.ndarray, focal: np.ndarray,
            princpt: np.ndarray) -> np.ndarray:
  """World joints [N, 3] → image pixels [N, 2] through one camera (mmpose's convention)."""
  cam = (camrot @ (world.T - campos.reshape(3, 1))).T
  x = cam[:, 0] / (cam[:, 2] + 1e-8) * focal[0] + princpt[0]
  y = cam[:, 1] / (cam[:, 2] + 1e-8) * focal[1] + princpt[1]
  return np.stack([x, y], axis=1)


def _camera(cameras: dict[str, Any], capture: str, camera: str, path: str) -> tuple[np.ndarray,
                                                                                    ...]:
  try:
    c = cameras[capture]
    return tuple(np.asarray(c[k][camera], np.float32)
                 for k in ("campos", "camrot", "focal", "princpt"))
  except KeyError as e:
    raise AnnotationError(f"{path}: no camera {camera!r} of capture {capture!r} ({e})") from None


def read_interhand2d(
    data_path: str,
    image_dir: str,
    skeleton: SkeletonInfo,
    dataset_index: int,
    *,
    image_size_hw: tuple[int, int],
    padding: float = PADDING,
    check_images: bool = True,
    decode_images: bool = False,
) -> tuple[list[dict[str, Any]], ReadReport]:
  """Reads one InterHand2.6M split (see the module docstring) into per-hand records.

  Args:
    data_path: `<prefix>_data.json` (local or gs://); the camera and joint files beside it.
    image_dir: directory the images' `file_name`s are relative to.
    skeleton: a 21-keypoint hand skeleton (`skeletons.INTERHAND2D`).
    dataset_index: stored in each record.
    image_size_hw: network input (H, W): the aspect of centre/scale.
    padding: box padding (1.5 as the reference).
    check_images, decode_images: skip (and count) missing / undecodable images.

  Returns:
    (records, report); skips counted by reason ("hand with <= 11 valid joints", ...).

  Raises:
    AnnotationError: an unreadable file, or a record naming a missing camera or frame.
  """
  if skeleton.num_keypoints != JOINTS_PER_HAND:
    raise AnnotationError(f"{data_path}: InterHand2.6M hands have {JOINTS_PER_HAND} keypoints; "
                          f"skeleton {skeleton.name!r} has {skeleton.num_keypoints}")
  camera_path, joint_path = companion_files(data_path)
  data = load_json(data_path)
  cameras = load_json(camera_path, required=())
  joints = load_json(joint_path, required=())
  images = image_table(data, data_path)
  first_ann: dict[Any, dict[str, Any]] = {}
  for ann in data["annotations"]:
    if not isinstance(ann, dict) or "image_id" not in ann or "joint_valid" not in ann:
      raise AnnotationError(f"{data_path}: annotation needs 'image_id' and 'joint_valid': "
                            f"{ann!r:.200}")
    first_ann.setdefault(ann["image_id"], ann)  # The reference uses each image's first.
  report = ReadReport(source=data_path)
  aspect = image_size_hw[1] / image_size_hw[0]
  checker = ImageChecker(decode=decode_images)
  records, bbox_id = [], 0
  for image_id, img in images.items():
    ann = first_ann.get(image_id)
    if ann is None:
      report.skip("image without annotation")
      continue
    for key in ("capture", "camera", "frame_idx"):
      if key not in img:
        raise AnnotationError(f"{data_path}: image id {image_id}: missing {key!r}")
    capture, frame = str(img["capture"]), str(img["frame_idx"])
    try:
      world = np.asarray(joints[capture][frame]["world_coord"], np.float32)
    except KeyError:
      raise AnnotationError(f"{joint_path}: no joints for capture {capture}, frame {frame} "
                            f"(image id {image_id})") from None
    try:
      valid = np.asarray(ann["joint_valid"], np.float32).reshape(-1)
    except (TypeError, ValueError):
      raise AnnotationError(f"{data_path}: image id {image_id}: joint_valid is not 42 numbers "
                            f"(or [number] lists)") from None
    if world.shape != (2 * JOINTS_PER_HAND, 3) or valid.shape != (2 * JOINTS_PER_HAND,):
      raise AnnotationError(f"{data_path}: image id {image_id}: expected 42 joints and 42 valid "
                            f"flags, got {world.shape} and {valid.shape}")
    xy = project(world, *_camera(cameras, capture, str(img["camera"]), camera_path))
    xy, valid = xy.reshape(2, JOINTS_PER_HAND, 2), valid.reshape(2, JOINTS_PER_HAND)
    path = storage.join(image_dir, img["file_name"])
    for h, hand in enumerate(HANDS):
      v = valid[h] * valid[h][-1]  # No valid root (wrist, last): the whole hand is invalid.
      if v.sum() <= MIN_VALID_JOINTS:
        report.skip(f"hand with <= {MIN_VALID_JOINTS} valid joints")
        continue
      if (check_images or decode_images) and (problem := checker(path).problem):
        report.skip(problem)
        continue
      vis = v > 0
      # The reference starts from (width, height, 0, 0) and shrinks/grows to the valid joints.
      x0 = min(float(img["width"]), float(xy[h, vis, 0].min()))
      y0 = min(float(img["height"]), float(xy[h, vis, 1].min()))
      x1, y1 = max(0.0, float(xy[h, vis, 0].max())), max(0.0, float(xy[h, vis, 1].max()))
      bbox = np.asarray([x0, y0, x1 - x0, y1 - y0], np.float32)
      center, scale = transforms.box_to_center_scale(bbox, aspect, padding=padding)
      keypoints = np.zeros((JOINTS_PER_HAND, 3), np.float32)
      keypoints[:, :2] = xy[h]
      keypoints[:, 2] = np.minimum(1.0, v)
      records.append(dict(
          image_path=path, image_id=int(image_id), ann_id=int(ann.get("id", image_id)),
          bbox_id=bbox_id, dataset_index=int(dataset_index), category_id=1, bbox_score=1.0,
          bbox=bbox, center=np.asarray(center, np.float32), scale=np.asarray(scale, np.float32),
          keypoints=keypoints, hand=hand, hand_type=str(ann.get("hand_type", "")),
          hand_type_valid=int(ann.get("hand_type_valid", 0))))
      bbox_id += 1
  report.kept = len(records)
  return records, report
