"""Top-down pose transforms, numerically matching mmpose 0.x (the heatmap encoders and decoders are
`heatmap_codec`).

Pure numpy / OpenCV functions used by the grain input pipeline (spec §4.3–§4.5) and by decoding
(spec §5.3 step 4). They reproduce the reference (PoseBH = mmpose 0.x / ViTPose fork) including
its quirks, because the golden vectors in `shared/golden/{targets,affine}.npz` were produced by it:

* Python `int()` truncates toward zero, so the heatmap-centre rounding `int(x / stride + 0.5)`
  uses `np.trunc`, never `floor` (they differ for joints left of / above the crop).
* The half-body upper/lower choice tests a *standard normal* draw `< 0.5` (P(upper) ≈ 0.69).
* `get_affine_transform` (standard) and `get_warp_matrix` (UDP) rotate in opposite senses for the
  same positive angle.
* The standard affine moves only joints with visibility > 0; UDP moves all joints.
* Intermediate dtypes follow the reference under numpy 2 promotion rules (NEP 50): e.g. the
  three-point construction of the standard affine stores its points in float32 before OpenCV
  solves for the matrix, which changes the matrix at the 1e-5 level versus a float64 closed form.

Size convention: every `*_size_wh` / `image_size` argument is mmpose's **(width, height)** order,
e.g. `image_size_wh=(192, 256)` and `heatmap_size_wh=(48, 64)` for the 256×192 models, while all
arrays are row-major, e.g. heatmaps are `[K, H, W]` and images `[H, W, C]`.

Random draws use a `numpy.random.Generator` passed in by the caller (one per sample); each
function documents exactly which draws it makes and in which order, mirroring the order of the
reference's global `np.random` calls so that a pipeline's draw stream is well defined.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from data_pipelines import heatmap_codec

# ImageNet statistics used by mmpose's NormalizeTensor (float32, as torch uses them).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

ArrayLike = np.ndarray | Sequence[float]


# ----------------------------------------------------------------------------------------------
# Annotation loading (spec §4.3)
# ----------------------------------------------------------------------------------------------


def sanitize_bbox(bbox_xywh: ArrayLike, img_w: float, img_h: float,
                  area: float | None = None) -> np.ndarray | None:
  """Cleans a COCO box like `TopDownCocoDataset` (spec §4.3 step 1).

  `x1 = max(0, x)`, `y1 = max(0, y)`, `x2 = min(img_w − 1, x1 + max(0, w − 1))`,
  `y2 = min(img_h − 1, y1 + max(0, h − 1))`; kept iff (`area` is None or > 0) and `x2 > x1` and
  `y2 > y1`. Note the `w − 1` / `h − 1`: the clean box is one pixel smaller than the raw one.

  Args:
    bbox_xywh: [4] raw box (x, y, w, h) in image pixels.
    img_w: image width in pixels.
    img_h: image height in pixels.
    area: the annotation's `area` field if present (None = field missing).

  Returns:
    [4] float64 clean box (x1, y1, x2 − x1, y2 − y1), or None if the box is rejected.
  """
  x, y, w, h = (float(v) for v in bbox_xywh)
  x1 = max(0.0, x)
  y1 = max(0.0, y)
  x2 = min(img_w - 1, x1 + max(0.0, w - 1))
  y2 = min(img_h - 1, y1 + max(0.0, h - 1))
  if (area is None or area > 0) and x2 > x1 and y2 > y1:
    return np.array([x1, y1, x2 - x1, y2 - y1], dtype=np.float64)
  return None


def box_to_center_scale(bbox_xywh: ArrayLike,
                        aspect_ratio: float,
                        padding: float = 1.25,
                        pixel_std: float = 200.0,
                        rng: np.random.Generator | None = None,
                        jitter_prob: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
  """Box (x, y, w, h) → mmpose centre and scale (`_xywh2cs`, spec §4.3 step 4).

  `center = (x + w/2, y + h/2)`; the box is widened or heightened to `aspect_ratio`
  (`if w > r·h: h = w / r elif w < r·h: w = h·r`), then `scale = (w, h) / pixel_std · padding`.

  Args:
    bbox_xywh: [4] clean box in image pixels.
    aspect_ratio: network input width / height, i.e. `image_size_wh[0] / image_size_wh[1]`
      (0.75 for 192×256).
    padding: context padding factor (1.25 in the reference).
    pixel_std: mmpose's scale unit (200 px).
    rng: None (test mode / the API default: no jitter). If given, the reference's train-time
      centre jitter is applied: draws `rng.random()` and, only if it is `< jitter_prob`,
      `rng.random(2)`, then `center += 0.4 · (u − 0.5) · (w, h)` (raw w, h). The reference does
      this once when building the database, so callers should jitter once per run, not per epoch.
    jitter_prob: probability of the centre jitter.

  Returns:
    center [2] float32 (x, y) and scale [2] float32 (w, h) in units of `pixel_std`.
  """
  x, y, w, h = (float(v) for v in bbox_xywh)
  center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
  if rng is not None and rng.random() < jitter_prob:
    # float32 += float64 computes in float64 and rounds once, like the reference's in-place add.
    center = (center + 0.4 * (rng.random(2) - 0.5) * [w, h]).astype(np.float32)
  if w > aspect_ratio * h:
    h = w * 1.0 / aspect_ratio
  elif w < aspect_ratio * h:
    w = h * aspect_ratio
  scale = np.array([w / pixel_std, h / pixel_std], dtype=np.float32)
  scale = scale * padding  # Stays float32: Python floats are weak scalars under NEP 50.
  return center, scale


def mpii_center_scale(center_xy: ArrayLike, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """MPII annotation centre/scale → mmpose centre/scale (`TopDownMpiiDataset`, spec §4.3).

  If `center_x ≠ −1`: `center_y += 15·scale` and `scale *= 1.25`; then `center −= 1` (Matlab
  1-based → 0-based). The scale is square (not aspect-corrected). Joints must likewise be
  shifted by −1 by the caller.

  Args:
    center_xy: [2] annotated centre (1-based pixels).
    scale: annotated person scale (box side / 200).

  Returns:
    center [2] float32 and scale [2] float32 (s, s).
  """
  center = np.array(center_xy, dtype=np.float32)
  scale_wh = np.array([scale, scale], dtype=np.float32)
  if center[0] != -1:
    center[1] = center[1] + 15 * scale_wh[1]
    scale_wh = scale_wh * 1.25
  center = center - 1
  return center, scale_wh


# ----------------------------------------------------------------------------------------------
# Affine matrices (spec §4.4 step 5, mmpose post_transforms.py)
# ----------------------------------------------------------------------------------------------


def _rotate_point(pt: Sequence, angle_rad) -> list:
  """Rotates (x, y) by `angle_rad` counter-clockwise in a y-up frame (mmpose `rotate_point`)."""
  sn, cs = np.sin(angle_rad), np.cos(angle_rad)
  return [pt[0] * cs - pt[1] * sn, pt[0] * sn + pt[1] * cs]


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """`b + rot90(a − b)` with rot90(v) = (−v_y, v_x): completes a right-angle point triple."""
  direction = a - b
  return b + np.array([-direction[1], direction[0]], dtype=np.float32)


def get_affine_transform(center: ArrayLike,
                         scale: ArrayLike,
                         rot_deg: float,
                         output_size_wh: ArrayLike,
                         shift: ArrayLike = (0., 0.),
                         inv: bool = False,
                         pixel_std: float = 200.) -> np.ndarray:
  """Standard (non-UDP) crop matrix, identical to mmpose's `get_affine_transform`.

  Maps three points (centre, centre + rotated half-width "up" vector, and the right-angle third
  point) to their places in the output and lets OpenCV solve for the similarity. The points are
  held in float32 exactly like the reference, so the matrix matches it to ~1e-12 rather than the
  ~1e-5 a float64 closed form would give. Equivalent to
  `p ↦ k·R(−θ)·(p − c − shift·s·pixel_std) + (W/2, H/2)`, `k = W / (pixel_std·s_x)`; note only
  `s_x` is used (isotropic), and the rotation sense is opposite to `get_warp_matrix`.

  Args:
    center: [2] box centre (x, y) in image pixels (float32 in mmpose).
    scale: [2] box size (w, h) in units of `pixel_std`.
    rot_deg: rotation in degrees.
    output_size_wh: [2] output (width, height) in pixels.
    shift: [2] translation as a fraction of the box size.
    inv: if True return the output → image matrix instead.
    pixel_std: scale unit (200 px).

  Returns:
    [2, 3] float64 matrix (image → output unless `inv`).
  """
  # Keep the caller's dtypes: the reference's arithmetic depends on them (NEP 50 promotion).
  center = np.asarray(center)
  scale_tmp = np.asarray(scale) * pixel_std
  shift = np.asarray(shift)
  src_w = scale_tmp[0]
  dst_w = output_size_wh[0]
  dst_h = output_size_wh[1]

  # A Python float, as the pipeline produces (np.float64 / int); an np.float32 angle would make
  # the reference compute the rotation in float32 and drift by ~1e-5.
  rot_rad = np.pi * float(rot_deg) / 180
  src_dir = _rotate_point([0., src_w * -0.5], rot_rad)
  dst_dir = np.array([0., dst_w * -0.5])

  src = np.zeros((3, 2), dtype=np.float32)
  src[0, :] = center + scale_tmp * shift
  src[1, :] = center + src_dir + scale_tmp * shift
  src[2, :] = _third_point(src[0, :], src[1, :])

  dst = np.zeros((3, 2), dtype=np.float32)
  dst[0, :] = [dst_w * 0.5, dst_h * 0.5]
  dst[1, :] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
  dst[2, :] = _third_point(dst[0, :], dst[1, :])

  if inv:
    return cv2.getAffineTransform(np.float32(dst), np.float32(src))
  return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def get_warp_matrix(theta_deg: float, size_input: ArrayLike, size_dst: ArrayLike,
                    size_target: ArrayLike) -> np.ndarray:
  """UDP crop matrix, identical to mmpose's `get_warp_matrix`.

  `p ↦ S·R(θ)·(p − size_input/2) + size_dst/2` with `R(θ) = [[cos, −sin], [sin, cos]]` and
  `S = diag(size_dst / size_target)`. `TopDownAffine(use_udp=True)` calls it with
  `(rot, 2·center, image_size_wh − 1, scale·200)`; see `crop_matrix`.

  Args:
    theta_deg: rotation in degrees (opposite sense to `get_affine_transform`).
    size_input: [2] (w, h) of the "input" frame; 2·center in practice.
    size_dst: [2] (w, h) destination extent; `image_size_wh − 1` in practice.
    size_target: [2] (w, h) source extent in image pixels; `scale·200` in practice.

  Returns:
    [2, 3] float32 matrix.
  """
  theta = np.deg2rad(float(theta_deg))  # Python float for the same reason as above.
  size_input = np.asarray(size_input)
  size_dst = np.asarray(size_dst)
  size_target = np.asarray(size_target)
  matrix = np.zeros((2, 3), dtype=np.float32)
  scale_x = size_dst[0] / size_target[0]
  scale_y = size_dst[1] / size_target[1]
  cos, sin = math.cos(theta), math.sin(theta)
  # Same operation order as the reference: the bracketed sums run in the input's float32.
  matrix[0, 0] = cos * scale_x
  matrix[0, 1] = -sin * scale_x
  matrix[0, 2] = scale_x * (-0.5 * size_input[0] * cos + 0.5 * size_input[1] * sin +
                            0.5 * size_target[0])
  matrix[1, 0] = sin * scale_y
  matrix[1, 1] = cos * scale_y
  matrix[1, 2] = scale_y * (-0.5 * size_input[0] * sin - 0.5 * size_input[1] * cos +
                            0.5 * size_target[1])
  return matrix


def crop_matrix(center: ArrayLike, scale: ArrayLike, rot_deg: float, image_size_wh: ArrayLike,
                use_udp: bool) -> np.ndarray:
  """The image → crop matrix `TopDownAffine` uses.

  Args:
    center: [2] box centre (x, y) in image pixels.
    scale: [2] box (w, h) in units of 200 px.
    rot_deg: rotation in degrees.
    image_size_wh: [2] crop (width, height), e.g. (192, 256).
    use_udp: UDP (`get_warp_matrix`) or standard (`get_affine_transform`).

  Returns:
    [2, 3] matrix: float32 for UDP, float64 for standard (as in the reference).
  """
  image_size = np.asarray(image_size_wh)
  if use_udp:
    return get_warp_matrix(rot_deg, np.asarray(center) * 2.0, image_size - 1.0,
                           np.asarray(scale) * 200.0)
  return get_affine_transform(center, scale, rot_deg, image_size)


def warp_image(image: np.ndarray, trans: np.ndarray, image_size_wh: ArrayLike) -> np.ndarray:
  """Crops with `cv2.warpAffine` (bilinear, constant-0 border), as `TopDownAffine` does.

  Args:
    image: [H_img, W_img, C] image (uint8 RGB in the pipeline).
    trans: [2, 3] image → crop matrix.
    image_size_wh: [2] crop (width, height).

  Returns:
    [H, W, C] crop with the input dtype.
  """
  if not image.flags.c_contiguous:  # e.g. a flipped view; OpenCV wants a plain buffer.
    image = np.ascontiguousarray(image)
  return cv2.warpAffine(image, trans, (int(image_size_wh[0]), int(image_size_wh[1])),
                        flags=cv2.INTER_LINEAR)


def affine_points(points_xy: np.ndarray, trans: np.ndarray) -> np.ndarray:
  """Applies a [2, 3] affine matrix to points.

  Computed in the promoted dtype of the inputs, like the reference: float32 points with the
  float32 UDP matrix stay float32 (`warp_affine_joints`), float64 matrices give float64
  (`affine_transform`).

  Args:
    points_xy: [K, 2] points (x, y).
    trans: [2, 3] matrix.

  Returns:
    [K, 2] transformed points.
  """
  points_xy = np.asarray(points_xy)
  homo = np.concatenate([points_xy, points_xy[:, 0:1] * 0 + 1], axis=1)
  return homo @ np.asarray(trans).T


def top_down_affine(image: np.ndarray, joints: np.ndarray, joints_vis: np.ndarray,
                    center: ArrayLike, scale: ArrayLike, rot: float, image_size_wh: ArrayLike,
                    use_udp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`TopDownAffine`: crops the image and moves the joints into crop pixels.

  Args:
    image: [H_img, W_img, C] uint8 RGB image.
    joints: [K, 3] mmpose-style (x, y, 0) or [K, 2] joints in image pixels.
    joints_vis: [K] visibility (or mmpose-style [K, 3], column 0 used).
    center: [2] box centre (x, y).
    scale: [2] box (w, h) in units of 200 px.
    rot: rotation in degrees.
    image_size_wh: [2] crop (width, height), e.g. (192, 256).
    use_udp: UDP or standard affine.

  Returns:
    crop [H, W, C] (input dtype); joints_out [K, 2] float32 crop pixels — with the standard
    affine only joints with visibility > 0 are transformed and the others keep their input x, y
    (reference quirk); UDP transforms all; trans [2, 3] the matrix used (f32 UDP, f64 standard).
  """
  trans = crop_matrix(center, scale, rot, image_size_wh, use_udp)
  crop = warp_image(image, trans, image_size_wh)
  # mmpose keeps joints_3d in float32 and writes results back into it.
  xy = np.asarray(joints)[:, :2].astype(np.float32)
  if use_udp:
    out = affine_points(xy, trans).astype(np.float32)
  else:
    out = xy.copy()
    vis = heatmap_codec.vis_vector(joints_vis) > 0.0
    out[vis] = affine_points(xy[vis], trans).astype(np.float32)
  return crop, out, trans


# ----------------------------------------------------------------------------------------------
# Random augmentation (spec §4.4 steps 2–4)
# ----------------------------------------------------------------------------------------------


def random_flip(image: np.ndarray, joints_xy: np.ndarray, joints_vis: np.ndarray,
                center: ArrayLike, flip_pairs: Iterable[Sequence[int]],
                rng: np.random.Generator, flip_prob: float = 0.5
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
  """`TopDownRandomFlip` (spec §4.4 step 2).

  Random draws: exactly one `rng.random()`; the flip happens iff it is `<= flip_prob`.
  On flip: image mirrored along W; joints and visibilities of each pair swapped;
  `x ← W_img − 1 − x`; joints multiplied by visibility (invisible joints become (0, 0) — so a
  double flip restores only visible joints); `center_x ← W_img − center_x − 1`.

  Args:
    image: [H_img, W_img, C] image.
    joints_xy: [K, 2] or mmpose-style [K, 3] joints in image pixels.
    joints_vis: [K] or [K, 3] visibility.
    center: [2] box centre (x, y).
    flip_pairs: (left, right) index pairs.
    rng: the sample's generator.
    flip_prob: flip probability.

  Returns:
    (image, joints_xy, joints_vis, center, flipped), new arrays of the input shapes; the image is
    a contiguous copy when flipped.
  """
  joints = np.array(joints_xy, copy=True)
  vis = np.array(joints_vis, copy=True)
  center = np.array(center, copy=True)
  if not rng.random() <= flip_prob:
    return image, joints, vis, center, False
  width = image.shape[1]
  image = np.ascontiguousarray(image[:, ::-1])
  in_dtype = joints.dtype  # mmpose keeps joints float32; don't let visibility promote them.
  src_j, src_v = joints.copy(), vis.copy()
  for left, right in flip_pairs:
    joints[left], joints[right] = src_j[right], src_j[left]
    vis[left], vis[right] = src_v[right], src_v[left]
  joints[:, 0] = width - 1 - joints[:, 0]
  if vis.shape == joints.shape:  # mmpose [K, 3] × [K, 3].
    joints = joints * vis
  else:
    joints = joints * heatmap_codec.vis_vector(vis)[:, None]
  joints = joints.astype(in_dtype, copy=False)
  center[0] = width - center[0] - 1
  return image, joints, vis, center, True


def half_body_center_scale(joints_xy: np.ndarray,
                           joints_vis: np.ndarray,
                           upper_body_ids: Iterable[int],
                           aspect_ratio: float,
                           rng: np.random.Generator,
                           num_joints_half_body: int = 8,
                           prob_half_body: float = 0.3,
                           pixel_std: float = 200.) -> tuple[np.ndarray, np.ndarray] | None:
  """`TopDownHalfBodyTransform` (spec §4.4 step 3): a box around the upper or lower body.

  Random draws, in order (matching the reference's short-circuit evaluation):
    1. only if `sum(vis) > num_joints_half_body`: `u = rng.random()`; stop unless
       `u < prob_half_body`;
    2. `z = rng.standard_normal()` (always drawn once step 1 passed). Upper body is chosen if
       `z < 0.5` (sic: a normal, P ≈ 0.69) and it has > 2 visible joints, else lower body if it
       has > 2, else upper.
  If the chosen set has < 2 joints nothing happens. Otherwise centre = mean of the chosen joints,
  box = their min/max extent, aspect-fixed to `aspect_ratio`, scale = (w, h)/pixel_std · 1.5.

  Args:
    joints_xy: [K, 2] or [K, 3] joints in image pixels.
    joints_vis: [K] or [K, 3] visibility.
    upper_body_ids: joint ids of the upper body (all others count as lower body).
    aspect_ratio: network input width / height (0.75).
    rng: the sample's generator.
    num_joints_half_body: minimum number of visible joints (strictly more are needed).
    prob_half_body: probability of the transform.
    pixel_std: scale unit (200 px).

  Returns:
    (center [2] float32, scale [2] float32), or None when the transform is not applied (the
    caller keeps its centre and scale).
  """
  vis = heatmap_codec.vis_vector(joints_vis)
  if not (np.sum(vis) > num_joints_half_body and rng.random() < prob_half_body):
    return None
  joints = np.asarray(joints_xy, dtype=np.float32)[:, :2]
  visible = vis > 0
  is_upper = np.zeros(len(vis), dtype=bool)
  upper_ids = [i for i in upper_body_ids if i < len(vis)]
  is_upper[upper_ids] = True
  upper = joints[visible & is_upper]
  lower = joints[visible & ~is_upper]
  if rng.standard_normal() < 0.5 and len(upper) > 2:
    selected = upper
  elif len(lower) > 2:
    selected = lower
  else:
    selected = upper
  if len(selected) < 2:
    return None
  center = selected.mean(axis=0)
  left_top = selected.min(axis=0)
  right_bottom = selected.max(axis=0)
  w = right_bottom[0] - left_top[0]
  h = right_bottom[1] - left_top[1]
  if w > aspect_ratio * h:
    h = w * 1.0 / aspect_ratio
  elif w < aspect_ratio * h:
    w = h * aspect_ratio
  scale = np.array([w / pixel_std, h / pixel_std], dtype=np.float32)
  return center, scale * 1.5


def random_scale_rotation(scale: ArrayLike,
                          rng: np.random.Generator,
                          scale_factor: float = 0.5,
                          rot_factor: float = 40.,
                          rot_prob: float = 0.6) -> tuple[np.ndarray, float]:
  """`TopDownGetRandomScaleRotation` (spec §4.4 step 4; PoseBH configs: 40, 0.5, 0.6).

  Random draws, in order: `a = rng.standard_normal()`, `b = rng.standard_normal()`,
  `u = rng.random()` (all three always drawn).
  `scale *= clip(a·scale_factor + 1, 1 − sf, 1 + sf)`;
  `rot = clip(b·rot_factor, −2·rf, 2·rf)` if `u <= rot_prob` else 0.

  Args:
    scale: [2] box (w, h) in units of 200 px.
    rng: the sample's generator.
    scale_factor: relative scale range.
    rot_factor: rotation std in degrees (clipped at twice this).
    rot_prob: probability of a non-zero rotation.

  Returns:
    (scale [2], rot_deg). Under numpy 2 the float32 scale times the float64 factor becomes
    float64, as in the reference.
  """
  sf, rf = scale_factor, rot_factor
  s_factor = np.clip(rng.standard_normal() * sf + 1, 1 - sf, 1 + sf)
  scale = np.asarray(scale) * s_factor
  r_factor = np.clip(rng.standard_normal() * rf, -rf * 2, rf * 2)
  rot = float(r_factor) if rng.random() <= rot_prob else 0.0
  return scale, rot


def normalize_image(crop_uint8: np.ndarray) -> np.ndarray:
  """`ToTensor` + `NormalizeTensor` without the CHW transpose (JAX is NHWC).

  `(x / 255 − mean) / std` in float32 with ImageNet statistics, the same float32 operations
  torch performs, so results match the reference bit for bit.

  Args:
    crop_uint8: [H, W, 3] uint8 RGB crop.

  Returns:
    [H, W, 3] float32.
  """
  x = crop_uint8.astype(np.float32) / np.float32(255)
  return (x - IMAGENET_MEAN) / IMAGENET_STD
