"""The heatmap codec: Gaussian target encoders and heatmap decoders (spec §4.4 step 7, §5.2-5.3).

One module for every encoder and decoder that data, objective and evaluation share:

* encoders: `msra_target` / `udp_target` (numpy, the input pipeline's host targets, bit for bit
  the reference's, `targets.npz`) and `udp_heatmaps_jax` (UDP targets drawn in heatmap space on
  the device: the CSS pseudo labels); the crop-space device encoder of the compact batch is
  `device_targets`, which matches `msra_target` / `udp_target` bit for bit;
* decoders, in two families:

* numpy reference implementations that reproduce mmpose 0.x `top_down_eval.py` /
  `post_transforms.py` bit for bit on the golden vectors (`decode.npz`), including the
  dtype promotions and operation order of the reference, so that float32 image coordinates
  (ulp ~3e-5 at 500 px) agree to within 1e-5;
* `decode_heatmaps_jax`, a jittable, static-shape, batched decoder for the 'default'
  (quarter offset), None (raw argmax) and DARK-UDP paths, usable on device, and its
  heatmap-space DARK-UDP half `dark_udp_coords_jax` (also used by the CSS pseudo labels).

Heatmaps are `[N, K, H, W]`; keypoint coordinates are `(x, y)` with x along W.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

Array = np.ndarray | jax.Array

_EPS_F32 = np.finfo(np.float32).eps  # 1.1920929e-07, regulariser of the DARK-UDP Hessian.
_POST_PROCESS = (None, 'default', 'unbiased', 'megvii')
ArrayLike = np.ndarray | Sequence[float]


def vis_vector(joints_vis: np.ndarray) -> np.ndarray:
  """[K] or mmpose-style [K, 3] visibility → [K] (column 0)."""
  joints_vis = np.asarray(joints_vis)
  return joints_vis[:, 0] if joints_vis.ndim == 2 else joints_vis


# --------------------------------------------------------------------------------------
# Heatmap targets (spec §4.4 step 7)
# --------------------------------------------------------------------------------------


def _target_windows(joints_xy: np.ndarray, joints_vis: np.ndarray, stride: np.ndarray,
                    heatmap_size_wh: ArrayLike, sigma: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
  """Shared bounds logic of both encoders.

  Returns:
    xy [K, 2] float32 joints; mu [K, 2] float64 integer-valued centres
    (`trunc(x / stride + 0.5)`); ul [K, 2] int64 window corner (clipped for indexing);
    weight [K] float32; window size S.
  """
  tmp_size = sigma * 3
  if tmp_size != int(tmp_size):
    # The reference's patch size and [ul, br) window only agree when 3σ is an integer.
    raise ValueError(f"3·sigma must be an integer, got sigma={sigma}")
  tmp_size = int(tmp_size)
  w_hm, h_hm = int(heatmap_size_wh[0]), int(heatmap_size_wh[1])
  xy = np.asarray(joints_xy, dtype=np.float32)[:, :2]  # mmpose joints are float32.
  weight = vis_vector(joints_vis).astype(np.float32)
  with np.errstate(invalid="ignore"):
    # float32 / float64 → float64, then Python int() = truncation toward zero.
    mu = np.trunc(xy / stride + 0.5)
  ul = mu - tmp_size
  br = mu + tmp_size + 1
  # Non-finite joints would make the reference raise in int(); we drop them instead.
  out = ~np.isfinite(mu).all(axis=1)
  with np.errstate(invalid="ignore"):
    out |= (ul[:, 0] >= w_hm) | (ul[:, 1] >= h_hm) | (br[:, 0] < 0) | (br[:, 1] < 0)
  weight[out] = 0
  size = 2 * tmp_size + 1
  # Clipping cannot change any pasted window (those have ul in [−size, max(W, H))) and keeps
  # the integer index arithmetic safe for far-away joints.
  lim = max(w_hm, h_hm) + size
  ul_idx = np.clip(np.nan_to_num(ul, nan=-lim), -lim, lim).astype(np.int64)
  return xy, mu, ul_idx, weight, size


def _paste(patches: np.ndarray, ul: np.ndarray, paste: np.ndarray,
           heatmap_size_wh: ArrayLike, num_channels: int | None = None) -> np.ndarray:
  """Pastes per-joint S×S patches at `ul`, clipped to the heatmap, in one scatter.

  Equivalent to the reference's per-joint slice assignment
  `target[k, max(0, ul_y):min(br_y, H), max(0, ul_x):min(br_x, W)] = g[…]` but touches only
  K·S² elements (cheaper than a gather over all K·H·W pixels or a Python loop).

  Args:
    patches: [K, S, S] (or broadcastable) patch values, rows = y.
    ul: [K, 2] int64 upper-left corners (x, y) in heatmap pixels.
    paste: [K] bool, joints to draw.
    heatmap_size_wh: [2] heatmap (width, height).
    num_channels: allocate this many channels (≥ K; the ones past K stay zero), None = K.

  Returns:
    [num_channels or K, H, W] float32 heatmaps.
  """
  w_hm, h_hm = int(heatmap_size_wh[0]), int(heatmap_size_wh[1])
  k, size = ul.shape[0], patches.shape[-1]
  target = np.zeros((_channels(k, num_channels), h_hm, w_hm), dtype=np.float32)
  offs = np.arange(size)
  xs = ul[:, 0:1] + offs  # [K, S]
  ys = ul[:, 1:2] + offs
  valid = (((ys >= 0) & (ys < h_hm))[:, :, None] & ((xs >= 0) & (xs < w_hm))[:, None, :] &
           paste[:, None, None])
  flat = (np.arange(k)[:, None, None] * h_hm + ys[:, :, None]) * w_hm + xs[:, None, :]
  target.reshape(-1)[flat[valid]] = np.broadcast_to(patches, valid.shape)[valid]
  return target


def msra_target(joints_xy: np.ndarray,
                joints_vis: np.ndarray,
                image_size_wh: ArrayLike,
                heatmap_size_wh: ArrayLike,
                sigma: float = 2.,
                joint_weights: np.ndarray | None = None,
                num_channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """MSRA Gaussian targets (`_msra_generate_target`, unbiased_encoding=False; spec §4.4 step 7).

  stride = image_size / heatmap_size; `mu = int(x / stride + 0.5)` (truncation toward zero);
  window `[mu − 3σ, mu + 3σ + 1)`; weight = visibility, zeroed if the window misses the heatmap
  entirely; for weight > 0.5 the integer-centred (2·3σ+1)² patch `exp(−(dx² + dy²)/(2σ²))`
  (peak exactly 1) is pasted, clipped to the heatmap — a window can be non-empty by the bounds
  test yet have no pixel inside (weight 1, all-zero heatmap), as in the reference.

  Args:
    joints_xy: [K, 2] or mmpose-style [K, 3] joints in crop pixels.
    joints_vis: [K] or [K, 3] visibility (0/1).
    image_size_wh: [2] crop (width, height), e.g. (192, 256).
    heatmap_size_wh: [2] heatmap (width, height), e.g. (48, 64).
    sigma: Gaussian std in heatmap pixels (3σ must be an integer).
    joint_weights: optional [K] or [K, 1] per-joint weights multiplied into the weight
      (`use_different_joint_weights=True`; PoseBH never sets it).
    num_channels: pad target and weight with zeros to this many channels (the 133-channel
      batch layout; written in place, no copy as `pad_keypoints` makes), None = K.

  Returns:
    target [K, H, W] float32 and weight [K] float32 (K → num_channels if given).
  """
  stride = np.asarray(image_size_wh) / np.asarray(heatmap_size_wh, dtype=np.float64)
  _, _, ul, weight, size = _target_windows(joints_xy, joints_vis, stride, heatmap_size_wh, sigma)
  # The single patch is built with the reference's float32 arithmetic, so values copy bitwise.
  x = np.arange(0, size, 1, np.float32)
  y = x[:, None]
  x0 = y0 = size // 2
  g = np.exp(-((x - x0)**2 + (y - y0)**2) / (2 * sigma**2)).astype(np.float32)
  target = _paste(g[None], ul, weight > 0.5, heatmap_size_wh, num_channels)
  return target, _pad_weight(_apply_joint_weights(weight, joint_weights), num_channels)


def udp_target(joints_xy: np.ndarray,
               joints_vis: np.ndarray,
               image_size_wh: ArrayLike,
               heatmap_size_wh: ArrayLike,
               sigma: float = 2.,
               joint_weights: np.ndarray | None = None,
               num_channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """UDP Gaussian targets (`_udp_generate_target`, GaussianHeatmap; spec §4.4 step 7).

  stride = (image_size − 1) / (heatmap_size − 1); same truncation, window and bounds test as
  MSRA, but the patch is centred at the sub-pixel position:
  `exp(−((i − x0)² + (j − y0)²)/(2σ²))`, `x0 = 3σ + (x/stride_x − mu_x)` (float64 under numpy 2,
  cast to float32 when pasted, like the reference). Arguments and result as `msra_target`'s.
  """
  stride = ((np.asarray(image_size_wh) - 1.0) /
            (np.asarray(heatmap_size_wh, dtype=np.float64) - 1.0))
  xy, mu, ul, weight, size = _target_windows(joints_xy, joints_vis, stride, heatmap_size_wh,
                                             sigma)
  with np.errstate(invalid="ignore"):
    centre = size // 2 + (xy / stride - mu)  # [K, 2] float64 sub-pixel patch centre.
  ar = np.arange(0, size, 1, np.float32)
  dx2 = (ar[None, None, :] - centre[:, 0, None, None])**2  # [K, 1, S]
  dy2 = (ar[None, :, None] - centre[:, 1, None, None])**2  # [K, S, 1]
  with np.errstate(invalid="ignore"):
    g = np.exp(-(dx2 + dy2) / (2 * sigma**2))  # [K, S, S] float64
  target = _paste(g, ul, weight > 0.5, heatmap_size_wh, num_channels)
  return target, _pad_weight(_apply_joint_weights(weight, joint_weights), num_channels)


def _channels(k: int, num_channels: int | None) -> int:
  if num_channels is None:
    return k
  if num_channels < k:
    raise ValueError(f"num_channels={num_channels} < K={k}")
  return int(num_channels)


def _pad_weight(weight: np.ndarray, num_channels: int | None) -> np.ndarray:
  out = np.zeros((_channels(len(weight), num_channels),), weight.dtype)
  out[:len(weight)] = weight
  return out


def _apply_joint_weights(weight: np.ndarray, joint_weights: np.ndarray | None) -> np.ndarray:
  if joint_weights is None:
    return weight
  return (weight * np.asarray(joint_weights, dtype=np.float32).reshape(-1)).astype(np.float32)


def pad_keypoints(target: np.ndarray, weight: np.ndarray,
                  max_k: int) -> tuple[np.ndarray, np.ndarray]:
  """Appends zero channels up to `max_k` (the reference's `max_num_joints` = 133 padding).

  Args:
    target: [K, H, W] heatmaps.
    weight: [K] or [K, 1] weights.
    max_k: total number of channels after padding (≥ K).

  Returns:
    target [max_k, H, W] and weight [max_k] (or [max_k, 1]), same dtypes.
  """
  k = target.shape[0]
  if max_k < k:
    raise ValueError(f"max_k={max_k} < K={k}")
  target = np.concatenate([target, np.zeros((max_k - k,) + target.shape[1:], target.dtype)])
  weight = np.concatenate([weight, np.zeros((max_k - k,) + weight.shape[1:], weight.dtype)])
  return target, weight


def _trunc_half_up(x: jax.Array) -> jax.Array:
  """`trunc(x + 0.5)` exactly in float32 (the reference computes `x + 0.5` in float64).

  A float32 `x + 0.5` can round up across an integer (x = 0.49999997 → 1.0); comparing x with
  the exactly representable `floor(x) + 0.5` / `ceil(x) − 0.5` avoids that for |x| < 2²³.
  """
  f = jnp.floor(x)
  c = jnp.ceil(x)
  floor_half = f + (x >= f + 0.5).astype(x.dtype)  # floor(x + 0.5): x + 0.5 ≥ 0.
  ceil_half = c + (x > c - 0.5).astype(x.dtype)  # ceil(x + 0.5): x + 0.5 < 0.
  return jnp.where(x >= -0.5, floor_half, ceil_half)


def udp_heatmaps_jax(coords: jax.Array, valid: jax.Array, heatmap_size_hw: Sequence[int],
                     sigma: float = 2.0) -> tuple[jax.Array, jax.Array]:
  """UDP Gaussian targets drawn directly in heatmap space (stride 1), static shapes.

  Same result as `udp_target(coords, valid, image_size_wh=(w, h),
  heatmap_size_wh=(w, h), sigma)` (spec §4.4 step 7): `mu = trunc(x + 0.5)`, a (6σ+1)² window
  `[mu − 3σ, mu + 3σ]`, weight = `valid` zeroed when the window misses the heatmap entirely (or
  the coordinate is not finite), and the sub-pixel Gaussian `exp(−((px−x)² + (py−y)²)/(2σ²))`
  inside the window, clipped to the heatmap, for weight > 0.5. Evaluated at every pixel with a
  window mask instead of pasting patches.

  Args:
    coords: `[..., K, 2]` (x, y) in heatmap pixels.
    valid: `[..., K]` visibility (bool or 0/1).
    heatmap_size_hw: static `(h, w)`.
    sigma: Gaussian std in heatmap pixels; 3σ must be an integer.

  Returns:
    heatmaps: `[..., K, h, w]` float32.
    weight: `[..., K]` float32.
  """
  radius = 3 * sigma
  if radius != int(radius):
    # The reference's patch size and [ul, br) window only agree when 3σ is an integer.
    raise ValueError(f'3·sigma must be an integer, got sigma={sigma}')
  radius = int(radius)
  h, w = int(heatmap_size_hw[0]), int(heatmap_size_hw[1])
  coords = coords.astype(jnp.float32)
  x, y = coords[..., 0], coords[..., 1]
  mu_x, mu_y = _trunc_half_up(x), _trunc_half_up(y)
  finite = jnp.isfinite(x) & jnp.isfinite(y)
  # The reference's bounds test on the window [mu − 3σ, mu + 3σ + 1).
  outside = ((mu_x - radius >= w) | (mu_y - radius >= h) | (mu_x + radius + 1 < 0) |
             (mu_y + radius + 1 < 0))
  weight = jnp.where(finite & ~outside, valid.astype(jnp.float32), 0.0)

  px = jnp.arange(w, dtype=jnp.float32)
  py = jnp.arange(h, dtype=jnp.float32)
  dx2 = jnp.square(px - x[..., None])  # [..., K, w]
  dy2 = jnp.square(py - y[..., None])  # [..., K, h]
  in_x = jnp.abs(px - mu_x[..., None]) <= radius
  in_y = jnp.abs(py - mu_y[..., None]) <= radius
  g = jnp.exp(-(dx2[..., None, :] + dy2[..., :, None]) / (2 * sigma**2))
  draw = in_y[..., :, None] & in_x[..., None, :] & (weight > 0.5)[..., None, None]
  # `where`, not a product: non-finite coordinates give NaN Gaussians that must not leak.
  return jnp.where(draw, g, 0.0), weight


# --------------------------------------------------------------------------------------
# Flip test (spec §5.2).
# --------------------------------------------------------------------------------------


def _flip_permutation(num_channels: int,
                      flip_pairs: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
  """Channel permutation that swaps every (left, right) pair and keeps the rest."""
  perm = np.arange(num_channels)
  for left, right in np.asarray(flip_pairs, dtype=np.int64).reshape(-1, 2):
    perm[left], perm[right] = right, left
  return perm


def flip_back(heatmaps: Array, flip_pairs: Sequence[Sequence[int]] | np.ndarray,
              target_type: str = 'GaussianHeatmap') -> Array:
  """Undo a horizontal input flip on predicted heatmaps (mmpose `flip_back`).

  Swaps the channels of every flip pair, then mirrors the width axis. Works on numpy and
  JAX arrays alike (inside jit too: the permutation is a static numpy constant).

  Args:
    heatmaps: `[N, K, H, W]` heatmaps predicted on the W-flipped crop.
    flip_pairs: `[P, 2]` pairs of mirrored keypoint indices.
    target_type: only 'GaussianHeatmap' is supported (CombinedTarget is not used by PoseBH).

  Returns:
    `[N, K, H, W]` heatmaps in the frame of the unflipped crop (numpy input gives a contiguous
    numpy copy).
  """
  if target_type.lower() != 'gaussianheatmap':
    raise NotImplementedError(f'flip_back: target_type {target_type!r} is not supported')
  if heatmaps.ndim != 4:
    raise ValueError(f'flip_back expects [N, K, H, W], got shape {heatmaps.shape}')
  perm = _flip_permutation(heatmaps.shape[1], flip_pairs)
  out = heatmaps[:, perm][..., ::-1]
  if isinstance(out, np.ndarray):
    out = np.ascontiguousarray(out)
  return out


def shift_heatmap_right(heatmaps: Array) -> Array:
  """Shift flipped-back heatmaps right by one pixel (`test_cfg.shift_heatmap=True`).

  `out[..., 1:] = in[..., :-1]`; column 0 keeps its value, as in the reference's in-place
  assignment. Compensates the half-pixel misalignment of the standard (non-UDP) flip.

  Args:
    heatmaps: `[N, K, H, W]` numpy or JAX array.

  Returns:
    `[N, K, H, W]` shifted copy of the same array type.
  """
  xp = np if isinstance(heatmaps, np.ndarray) else jnp
  return xp.concatenate([heatmaps[..., :1], heatmaps[..., :-1]], axis=-1)


# --------------------------------------------------------------------------------------
# numpy reference decoding (spec §5.3).
# --------------------------------------------------------------------------------------


def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel argmax (mmpose `_get_max_preds`).

  Args:
    heatmaps: `[N, K, H, W]` heatmaps.

  Returns:
    coords: `[N, K, 2]` float32 integer (x, y) of the first maximum in row-major order; -1 for
      both coordinates where the maximum is <= 0.
    maxvals: `[N, K, 1]` the raw maxima (heatmap dtype).
  """
  heatmaps = np.asarray(heatmaps)
  if heatmaps.ndim != 4:
    raise ValueError(f'get_max_preds expects [N, K, H, W], got shape {heatmaps.shape}')
  n, k, _, w = heatmaps.shape
  flat = heatmaps.reshape(n, k, -1)
  idx = np.argmax(flat, axis=2).reshape(n, k, 1)
  maxvals = np.amax(flat, axis=2).reshape(n, k, 1)
  coords = np.tile(idx, (1, 1, 2)).astype(np.float32)
  coords[..., 0] = coords[..., 0] % w
  coords[..., 1] = coords[..., 1] // w
  coords = np.where(np.tile(maxvals, (1, 1, 2)) > 0.0, coords, -1).astype(np.float32)
  return coords, maxvals


def transform_preds(coords: np.ndarray, center: np.ndarray, scale: np.ndarray,
                    output_size_wh: Sequence[int], use_udp: bool = False) -> np.ndarray:
  """Map heatmap coordinates back to image coordinates (mmpose `transform_preds`).

  With `s = 200 * scale`: UDP maps pixel centres 0..W-1 onto the box width,
  `x_img = x * s_x / (W - 1) + c_x - s_x / 2`; standard uses `s_x / W`.

  Args:
    coords: `[K, 2]` (one instance, reference signature) or `[N, K, 2]` heatmap coordinates;
      extra columns beyond 2 are ignored and set to 1 as in the reference.
    center: `[2]` or `[N, 2]` box centres in image pixels.
    scale: `[2]` or `[N, 2]` box sizes in units of 200 px.
    output_size_wh: heatmap size `(W, H)`.
    use_udp: unbiased (UDP) mapping.

  Returns:
    Image coordinates with the shape and dtype of `coords`.
  """
  coords = np.asarray(coords)
  center = np.asarray(center)
  scale = np.asarray(scale) * 200.0
  w, h = output_size_wh
  # Python-scalar divisors keep the reference's float32 arithmetic (weak scalar promotion).
  if use_udp:
    scale_x = scale[..., 0] / (w - 1.0)
    scale_y = scale[..., 1] / (h - 1.0)
  else:
    scale_x = scale[..., 0] / w
    scale_y = scale[..., 1] / h
  if coords.ndim == 3:  # Batched: broadcast the per-instance factors over K.
    scale_x, scale_y = scale_x[:, None], scale_y[:, None]
    cx, cy = center[:, None, 0], center[:, None, 1]
    half_x, half_y = scale[:, None, 0] * 0.5, scale[:, None, 1] * 0.5
  else:
    cx, cy = center[..., 0], center[..., 1]
    half_x, half_y = scale[..., 0] * 0.5, scale[..., 1] * 0.5
  out = np.ones_like(coords)
  # Same evaluation order as the reference: (x * s + c) - s / 2.
  out[..., 0] = coords[..., 0] * scale_x + cx - half_x
  out[..., 1] = coords[..., 1] * scale_y + cy - half_y
  return out


def _gaussian_blur_unbiased(heatmaps: np.ndarray, kernel: int = 11) -> np.ndarray:
  """DARK modulation (mmpose `_gaussian_blur`), in place on a float32 copy.

  Each channel is zero-padded by (kernel-1)/2, blurred with `cv2.GaussianBlur(sigma=0)` and
  rescaled to its original maximum. A channel whose blurred maximum is 0 becomes NaN (0/0),
  exactly like the reference; callers never refine such channels (their argmax is -1).
  """
  if kernel % 2 != 1:
    raise ValueError(f'kernel must be odd, got {kernel}')
  border = (kernel - 1) // 2
  n, k, h, w = heatmaps.shape
  with np.errstate(divide='ignore', invalid='ignore'):
    for i in range(n):
      for j in range(k):
        origin_max = np.max(heatmaps[i, j])
        padded = np.zeros((h + 2 * border, w + 2 * border), dtype=np.float32)
        padded[border:-border, border:-border] = heatmaps[i, j]
        padded = cv2.GaussianBlur(padded, (kernel, kernel), 0)
        heatmaps[i, j] = padded[border:-border, border:-border]
        heatmaps[i, j] *= origin_max / np.max(heatmaps[i, j])
  return heatmaps


def _taylor(log_heatmap: np.ndarray, coord: np.ndarray) -> np.ndarray:
  """One DARK Newton step on a log-heatmap `[H, W]` (mmpose `_taylor`), updates `coord` in place.

  Second derivatives use +-2 pixel differences; skipped within 2 px of the border or when the
  Hessian is singular.
  """
  h, w = log_heatmap.shape
  px, py = int(coord[0]), int(coord[1])
  if not (1 < px < w - 2 and 1 < py < h - 2):
    return coord
  m = log_heatmap
  dx = 0.5 * (m[py][px + 1] - m[py][px - 1])
  dy = 0.5 * (m[py + 1][px] - m[py - 1][px])
  dxx = 0.25 * (m[py][px + 2] - 2 * m[py][px] + m[py][px - 2])
  dxy = 0.25 * (m[py + 1][px + 1] - m[py - 1][px + 1] - m[py + 1][px - 1] + m[py - 1][px - 1])
  dyy = 0.25 * (m[py + 2][px] - 2 * m[py][px] + m[py - 2][px])
  if dxx * dyy - dxy**2 != 0:
    # Same ops as the reference (np.linalg.inv in double, cast back to float32; float32 matmul).
    hessian_inv = np.linalg.inv(np.array([[dxx, dxy], [dxy, dyy]]))
    offset = -hessian_inv @ np.array([[dx], [dy]])
    coord += offset[:, 0]
  return coord


def post_dark_udp(coords: np.ndarray, batch_heatmaps: np.ndarray, kernel: int = 11) -> np.ndarray:
  """DARK-UDP refinement (mmpose `post_dark_udp`); modifies both arguments in place.

  Blur (`cv2.GaussianBlur`, sigma from kernel size, BORDER_REFLECT_101) -> clip [0.001, 50]
  -> log -> edge-pad 1 -> finite-difference gradient/Hessian at the integer argmax ->
  `coords -= inv(H + eps I) @ g`.

  Neighbours are read through a flat index into the padded `[B, K, H+2, W+2]` block, as in the
  reference, so an argmax of -1 (max <= 0) reads its left/up neighbours from the previous
  channel (or, for the very first channel, wraps to the end of the array). That arbitrary
  offset is reproduced deliberately. One intended deviation: the flat index is built in int64;
  the reference builds it in float32, which only matters (and is then wrong) beyond 2**24
  elements (e.g. more than ~76 instances x 133 keypoints at 64x48).

  Args:
    coords: `[N, K, 2]` float32 integer argmax coordinates.
    batch_heatmaps: `[B, K, H, W]` float32 heatmaps, B == N (top-down) or B == 1.
    kernel: Gaussian kernel size (11 for sigma-2 targets).

  Returns:
    `coords`, refined.
  """
  b, k, h, w = batch_heatmaps.shape
  n = coords.shape[0]
  if b not in (1, n):
    raise ValueError(f'post_dark_udp: heatmap batch {b} must be 1 or {n}')
  for heatmaps in batch_heatmaps:
    for heatmap in heatmaps:
      cv2.GaussianBlur(heatmap, (kernel, kernel), 0, heatmap)
  np.clip(batch_heatmaps, 0.001, 50, batch_heatmaps)
  np.log(batch_heatmaps, batch_heatmaps)
  padded = np.pad(batch_heatmaps, ((0, 0), (0, 0), (1, 1), (1, 1)), mode='edge').ravel()

  row = w + 2
  index = (coords[..., 0].astype(np.int64) + 1) + (coords[..., 1].astype(np.int64) + 1) * row
  index = index + row * (h + 2) * np.arange(b * k).reshape(-1, k)
  index = index.reshape(-1, 1)
  i_ = padded[index]
  ix1 = padded[index + 1]
  iy1 = padded[index + row]
  ix1y1 = padded[index + row + 1]
  ix1_y1_ = padded[index - row - 1]
  ix1_ = padded[index - 1]
  iy1_ = padded[index - row]

  dx = 0.5 * (ix1 - ix1_)
  dy = 0.5 * (iy1 - iy1_)
  derivative = np.concatenate([dx, dy], axis=1).reshape(n, k, 2, 1)
  dxx = ix1 - 2 * i_ + ix1_
  dyy = iy1 - 2 * i_ + iy1_
  # Left-to-right float32 evaluation order of the reference.
  dxy = 0.5 * (ix1y1 - ix1 - iy1 + i_ + i_ - ix1_ - iy1_ + ix1_y1_)
  hessian = np.concatenate([dxx, dxy, dxy, dyy], axis=1).reshape(n, k, 2, 2)
  # float32 Hessian + float64 eps*I promotes to float64: the solve runs in double as in mmpose.
  hessian_inv = np.linalg.inv(hessian + _EPS_F32 * np.eye(2))
  coords -= np.einsum('ijmn,ijnk->ijmk', hessian_inv, derivative)[..., 0]
  return coords


def keypoints_from_heatmaps(heatmaps: np.ndarray, center: np.ndarray, scale: np.ndarray, *,
                            post_process: str | None = 'default', kernel: int = 11,
                            use_udp: bool = False,
                            target_type: str = 'GaussianHeatmap') -> tuple[np.ndarray, np.ndarray]:
  """Decode heatmaps to image keypoints (mmpose `keypoints_from_heatmaps`, numpy, exact).

  Paths (spec §5.3):
    * `use_udp=True`: argmax + DARK-UDP (`post_process` is then ignored, as in the reference).
    * 'default': argmax + 0.25 px step towards the larger neighbour, only where
      `1 < px < W-1 and 1 < py < H-1`.
    * 'unbiased': DARK (zero-pad blur, rescale, log, Taylor step with +-2 px differences).
    * 'megvii': blur first, quarter offset + 0.5, `maxval / 255 + 0.5`.
    * None: raw argmax.
  Channels whose maximum is <= 0 get argmax -1; the quarter offset and DARK skip them, DARK-UDP
  refines them with neighbours read from the previous channel (reference quirk, see
  `post_dark_udp`). The returned scores are always the raw maxima (before any blur).

  Args:
    heatmaps: `[N, K, H, W]` heatmaps (not modified).
    center: `[N, 2]` box centres (image px).
    scale: `[N, 2]` box sizes / 200.
    post_process: None, 'default', 'unbiased' or 'megvii' (bool False/True are accepted as
      None/'default', the reference's deprecated spellings).
    kernel: Gaussian kernel size for DARK / DARK-UDP / megvii.
    use_udp: UDP decoding (DARK-UDP + UDP transform).
    target_type: 'GaussianHeatmap' (CombinedTarget is not implemented).

  Returns:
    preds: `[N, K, 2]` image coordinates (float32 for float32 inputs).
    maxvals: `[N, K, 1]` raw heatmap maxima.
  """
  if post_process is False:
    post_process = None
  elif post_process is True:
    post_process = 'default'
  if post_process not in _POST_PROCESS:
    raise ValueError(f'unknown post_process {post_process!r}')
  if post_process in ('unbiased', 'megvii') and kernel <= 0:
    raise ValueError('unbiased / megvii decoding need kernel > 0')
  if use_udp and post_process == 'megvii':
    raise ValueError("use_udp is incompatible with post_process='megvii'")

  heatmaps = np.array(heatmaps, copy=True)  # Blurs below work in place.
  if post_process == 'megvii':
    heatmaps = _gaussian_blur_unbiased(heatmaps, kernel=kernel)
  n, k, h, w = heatmaps.shape

  if use_udp:
    if target_type.lower() != 'gaussianheatmap':
      raise NotImplementedError(f'use_udp with target_type {target_type!r} is not implemented')
    preds, maxvals = get_max_preds(heatmaps)
    preds = post_dark_udp(preds, heatmaps, kernel=kernel)
  else:
    preds, maxvals = get_max_preds(heatmaps)
    if post_process == 'unbiased':
      with np.errstate(invalid='ignore'):  # NaN channels (all-zero input) are never refined.
        log_maps = np.log(np.maximum(_gaussian_blur_unbiased(heatmaps, kernel), 1e-10))
      for i in range(n):
        for j in range(k):
          _taylor(log_maps[i, j], preds[i, j])
    elif post_process is not None:
      for i in range(n):
        for j in range(k):
          hm = heatmaps[i, j]
          px, py = int(preds[i, j, 0]), int(preds[i, j, 1])
          if 1 < px < w - 1 and 1 < py < h - 1:
            diff = np.array([hm[py][px + 1] - hm[py][px - 1], hm[py + 1][px] - hm[py - 1][px]])
            preds[i, j] += np.sign(diff) * 0.25
            if post_process == 'megvii':
              preds[i, j] += 0.5

  center = np.asarray(center)
  scale = np.asarray(scale)
  for i in range(n):
    preds[i] = transform_preds(preds[i], center[i], scale[i], (w, h), use_udp=use_udp)
  if post_process == 'megvii':
    maxvals = maxvals / 255.0 + 0.5
  return preds, maxvals


# --------------------------------------------------------------------------------------
# JAX decoding (jit-friendly, static shapes).
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _gaussian_kernel_1d(kernel: int) -> np.ndarray:
  """OpenCV `getGaussianKernel(kernel, 0, CV_32F)` computed without cv2 (float64 -> float32)."""
  sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
  x = np.arange(kernel, dtype=np.float64) - (kernel - 1) / 2
  g = np.exp(-(x**2) / (2 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _symmetric_taps(tap: Callable[[int], jax.Array], g: np.ndarray, r: int) -> jax.Array:
  """`Σ_i g[r + i] · tap(i)` for i in [-r, r], summed as OpenCV does: the centre tap first,
  then the symmetric pairs `(tap(-i) + tap(i)) · g[r + i]` (one pass of the separable blur)."""
  out = tap(0) * g[r]
  for i in range(1, r + 1):
    out = out + (tap(-i) + tap(i)) * g[r + i]
  return out


def gaussian_blur_jax(heatmaps: jax.Array, kernel: int = 11) -> jax.Array:
  """Separable Gaussian blur with reflect-101 borders, like `cv2.GaussianBlur(k, k, sigma=0)`.

  `jnp.pad(mode='reflect')` excludes the edge pixel, i.e. it is OpenCV's BORDER_REFLECT_101.
  Rows are filtered first, then columns (OpenCV's order); each pass adds the symmetric taps in
  pairs, centre first, which tracks OpenCV's float32 result to ~1e-7.

  Args:
    heatmaps: `[..., H, W]` float32, with H, W > (kernel - 1) / 2.
    kernel: odd kernel size; sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8 (2.0 for 11).

  Returns:
    `[..., H, W]` blurred heatmaps.
  """
  if kernel % 2 != 1:
    raise ValueError(f'kernel must be odd, got {kernel}')
  r = (kernel - 1) // 2
  g = _gaussian_kernel_1d(kernel)
  h, w = heatmaps.shape[-2:]
  lead = [(0, 0)] * (heatmaps.ndim - 2)

  def one_pass(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = list(lead) + [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    xp = jnp.pad(x, pad, mode='reflect')

    def tap(offset: int) -> jax.Array:
      return jax.lax.slice_in_dim(xp, r + offset, r + offset + size, axis=axis)

    return _symmetric_taps(tap, g, r)

  out = one_pass(heatmaps, heatmaps.ndim - 1, w)
  return one_pass(out, heatmaps.ndim - 2, h)


def argmax_first(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """`(jnp.argmax(x, axis), jnp.max(x, axis))` for finite `x`, as two plain reductions.

  The first index of the maximum, as `jnp.argmax`. XLA:CPU runs argmax as one (value, index)
  reduction that does not vectorise; a max, then a min over the indices where `x` equals it,
  does, and takes 2-6× less time on the train step's `[B, K, H, W]` maps (issue 19). A NaN gives
  the last index instead of the NaN's (callers mask non-finite inputs anyway).

  Returns:
    (index int32, maximum), `axis` removed.
  """
  axis = axis % x.ndim
  top = jnp.max(x, axis=axis, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
  first = jnp.min(jnp.where(x == top, index, x.shape[axis]), axis=axis)
  return jnp.minimum(first, x.shape[axis] - 1), jnp.squeeze(top, axis)


def _argmax_coords_jax(heatmaps: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Argmax like `get_max_preds`; also returns the flat index `[N, K]` (int32)."""
  n, k, h, w = heatmaps.shape
  flat = heatmaps.reshape(n, k, h * w)
  idx, maxvals = argmax_first(flat, -1)
  maxvals = maxvals[..., None]
  xy = jnp.stack([idx % w, idx // w], axis=-1).astype(jnp.float32)
  coords = jnp.where(maxvals > 0.0, xy, -1.0)
  return coords, maxvals, idx


def _reflect101(i: jax.Array, size: int) -> jax.Array:
  """Index `i` in [-(size-1), 2(size-1)] mirrored into [0, size) like BORDER_REFLECT_101."""
  i = jnp.abs(i)
  return jnp.where(i > size - 1, 2 * (size - 1) - i, i)


def _blur_3x3_at_peaks(heatmaps: jax.Array, ci: jax.Array, kernel: int) -> jax.Array:
  """`gaussian_blur_jax(heatmaps)` on the 3x3 block around each peak, edge-clamped. [N,K,3,3].

  DARK-UDP reads the blurred map only there, so only those 9 values per channel are computed,
  from a gathered patch, with `gaussian_blur_jax`'s operations in its order (rows, then
  columns; centre tap first, then symmetric pairs): the whole-map values up to float32 rounding
  (XLA may contract the multiply-adds differently: 1 ulp seen) for a fraction of the work (the
  CSS pseudo labels decode every channel of the batch in each train step; issue 19).

  Args:
    heatmaps: `[N, K, H, W]` float32.
    ci: `[N, K, 2]` int32 peak (x, y), each inside the map.
    kernel: odd blur kernel.
  """
  n, k, h, w = heatmaps.shape
  r = (kernel - 1) // 2
  g = _gaussian_kernel_1d(kernel)
  step = jnp.arange(-1, 2, dtype=jnp.int32)
  # The block rows/columns, clamped like the reference's edge padding of the blurred map.
  ys = jnp.clip(ci[..., 1:2] + step, 0, h - 1)  # [N, K, 3]
  xs = jnp.clip(ci[..., 0:1] + step, 0, w - 1)
  taps = jnp.arange(-r, r + 1, dtype=jnp.int32)
  rows = _reflect101(ys[..., :, None] + taps, h)  # [N, K, 3, kernel]
  cols = _reflect101(xs[..., :, None] + taps, w)
  flat = heatmaps.reshape(n, k, h * w)
  index = (rows[:, :, :, :, None, None] * w + cols[:, :, None, None, :, :]).reshape(n, k, -1)
  patch = jnp.take_along_axis(flat, index, axis=-1).reshape(n, k, 3, kernel, 3, kernel)
  # Row pass (along W) at the 3·kernel rows the column pass needs: [N, K, 3, kernel, 3].
  out = _symmetric_taps(lambda i: patch[..., r + i], g, r)
  # Column pass (along H).
  return _symmetric_taps(lambda i: out[:, :, :, r + i], g, r)  # [N, K, 3 (y±1), 3 (x±1)]


def _dark_udp_jax(coords: jax.Array, heatmaps: jax.Array, kernel: int) -> jax.Array:
  """DARK-UDP step in float32, mirroring `post_dark_udp` including its flat neighbour indexing.

  Where every channel has a peak (max > 0), the blurred map is computed only around the peaks
  (`_blur_3x3_at_peaks`). Otherwise the whole map is blurred and read through the flat gather
  over the padded `[N, K, H+2, W+2]` block, which reproduces the reference's previous-channel
  reads for argmax -1 (JAX, like numpy, wraps negative indices). The 2x2 solve is a closed-form
  float32 inverse instead of the reference's float64 `np.linalg.inv`.
  """
  n, k, h, w = heatmaps.shape
  ci = coords.astype(jnp.int32)

  def local(_):
    logb = jnp.log(jnp.clip(_blur_3x3_at_peaks(heatmaps, ci, kernel), 0.001, 50.0))
    return (logb[..., 1, 1], logb[..., 1, 2], logb[..., 2, 1], logb[..., 2, 2],
            logb[..., 0, 0], logb[..., 1, 0], logb[..., 0, 1])

  def whole(_):
    logm = jnp.log(jnp.clip(gaussian_blur_jax(heatmaps, kernel), 0.001, 50.0))
    padded = jnp.pad(logm, ((0, 0), (0, 0), (1, 1), (1, 1)), mode='edge').reshape(-1)
    row = w + 2
    channel = jnp.arange(n * k, dtype=jnp.int32).reshape(n, k)
    index = (ci[..., 0] + 1) + (ci[..., 1] + 1) * row + channel * (row * (h + 2))
    return tuple(padded[index + o] for o in (0, 1, row, row + 1, -row - 1, -1, -row))

  if min(h, w) <= (kernel - 1) // 2:  # Reflection beyond one mirror: only the whole-map path.
    i_, ix1, iy1, ix1y1, ix1_y1_, ix1_, iy1_ = whole(None)
  else:
    i_, ix1, iy1, ix1y1, ix1_y1_, ix1_, iy1_ = jax.lax.cond(jnp.all(ci >= 0), local, whole, None)
  dx = 0.5 * (ix1 - ix1_)
  dy = 0.5 * (iy1 - iy1_)
  dxx = ix1 - 2 * i_ + ix1_ + _EPS_F32
  dyy = iy1 - 2 * i_ + iy1_ + _EPS_F32
  dxy = 0.5 * (ix1y1 - ix1 - iy1 + i_ + i_ - ix1_ - iy1_ + ix1_y1_)
  det = dxx * dyy - dxy * dxy
  # inv([[a, b], [b, d]]) @ [dx, dy] = [d*dx - b*dy, a*dy - b*dx] / det.
  off_x = (dyy * dx - dxy * dy) / det
  off_y = (dxx * dy - dxy * dx) / det
  return coords - jnp.stack([off_x, off_y], axis=-1)


def _quarter_offset_jax(coords: jax.Array, heatmaps: jax.Array) -> jax.Array:
  """The 'default' +-0.25 px step towards the higher neighbour, interior pixels only."""
  n, k, h, w = heatmaps.shape
  flat = heatmaps.reshape(n, k, h * w)
  ci = coords.astype(jnp.int32)  # Truncation like int(); -1 stays -1 and fails the test below.
  px, py = ci[..., 0], ci[..., 1]
  inside = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
  base = jnp.clip(py, 1, h - 2) * w + jnp.clip(px, 1, w - 2)

  def at(offset: int) -> jax.Array:
    return jnp.take_along_axis(flat, (base + offset)[..., None], axis=-1)[..., 0]

  diff = jnp.stack([at(1) - at(-1), at(w) - at(-w)], axis=-1)
  return coords + jnp.where(inside[..., None], jnp.sign(diff) * 0.25, 0.0)


def dark_udp_coords_jax(heatmaps: jax.Array, kernel: int = 11) -> tuple[jax.Array, jax.Array]:
  """Argmax + DARK-UDP refinement in heatmap pixels (`get_max_preds` + `post_dark_udp`), JAX.

  The heatmap-space half of the UDP decoder, shared by `decode_heatmaps_jax` and the CSS pseudo
  labels (spec §2.6.5 step 5). Not jitted itself; callers jit around it.

  Args:
    heatmaps: `[N, K, H, W]` heatmaps (cast to float32).
    kernel: odd Gaussian kernel size of the DARK-UDP blur (static).

  Returns:
    coords: `[N, K, 2]` float32 refined (x, y) in heatmap pixels. Channels with max <= 0 start
      from argmax -1 and are refined with the reference's previous-channel neighbours
      (meaningless; callers should mask them).
    maxvals: `[N, K]` float32 raw maxima (before the blur).
  """
  heatmaps = jnp.asarray(heatmaps, jnp.float32)
  coords, maxvals, _ = _argmax_coords_jax(heatmaps)
  return _dark_udp_jax(coords, heatmaps, kernel), maxvals[..., 0]


@functools.partial(jax.jit, static_argnames=('use_udp', 'post_process', 'kernel'))
def decode_heatmaps_jax(heatmaps: jax.Array, center: jax.Array, scale: jax.Array, *,
                        use_udp: bool, post_process: str | None = 'default',
                        kernel: int = 11) -> tuple[jax.Array, jax.Array]:
  """Jittable batched heatmap decoding (spec §5.3), float32.

  Matches `keypoints_from_heatmaps` for `use_udp=True` (DARK-UDP; `post_process` ignored) and
  for `use_udp=False` with `post_process` 'default' or None. 'unbiased'/'megvii' are numpy-only.

  Differences from the numpy reference: the blur is a JAX separable convolution instead of
  OpenCV's and the DARK-UDP 2x2 solve runs in float32 instead of float64, so refined
  coordinates agree to a few float32 ulp (max 1.8e-4 image px on the goldens; XLA also contracts
  `x * s + c` into FMAs). Channels with max <= 0 follow the reference's flat-index quirk too
  (previous-channel neighbours; 6e-5 px from numpy on the golden edge set), but such offsets are
  meaningless and, being built from clipped-log differences, less well conditioned; they are
  finite unless the heatmaps contain NaN/inf.

  Args:
    heatmaps: `[N, K, H, W]` heatmaps.
    center: `[N, 2]` box centres (image px).
    scale: `[N, 2]` box sizes / 200.
    use_udp: DARK-UDP + UDP transform.
    post_process: 'default' (quarter offset) or None (raw argmax); ignored when `use_udp`.
    kernel: Gaussian kernel size of the DARK-UDP blur (static).

  Returns:
    preds: `[N, K, 2]` float32 image coordinates.
    maxvals: `[N, K, 1]` float32 raw maxima.
  """
  if not use_udp and post_process not in ('default', None):
    raise NotImplementedError(f'decode_heatmaps_jax: post_process {post_process!r} is numpy-only')
  heatmaps = jnp.asarray(heatmaps, jnp.float32)
  center = jnp.asarray(center, jnp.float32)
  scale = jnp.asarray(scale, jnp.float32) * 200.0
  _, _, h, w = heatmaps.shape
  if use_udp:
    coords, maxvals = dark_udp_coords_jax(heatmaps, kernel)
    maxvals = maxvals[..., None]
    unit = scale / jnp.array([w - 1.0, h - 1.0], jnp.float32)
  else:
    coords, maxvals, _ = _argmax_coords_jax(heatmaps)
    if post_process == 'default':
      coords = _quarter_offset_jax(coords, heatmaps)
    unit = scale / jnp.array([w, h], jnp.float32)
  preds = coords * unit[:, None, :] + center[:, None, :] - (scale * 0.5)[:, None, :]
  return preds, maxvals
