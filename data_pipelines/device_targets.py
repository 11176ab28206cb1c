"""Gaussian heatmap targets generated on the accelerator from crop-space keypoints.

The same targets as `heatmap_codec.msra_target` / `heatmap_codec.udp_target` (spec §4.4 step 7), but
for a whole batch inside a jitted function with static shapes: the input pipeline then ships
`joints [B, K, 2]` and `joint_vis [B, K]` (a few hundred bytes per sample) instead of
`target [B, K, H, W]` (1.6 MB per sample at K = 133, 64×48), and the targets cost the device a
handful of element-wise ops.

Exactness. The reference rounds the heatmap centre with Python's `int(x / stride + 0.5)` in
float64 (x is float32, the stride `image / heatmap` or `(image − 1) / (heatmap − 1)` float64).
float32 arithmetic alone would pick the other integer for joints within ~1e-7 (relative) of a
half-way point, which at K = 133 happens in most batches, and moves the 13×13 window by one
pixel. So the centre is decided exactly:

* With the stride a reduced fraction A/B, `x / stride + 0.5 ≥ n  ⟺  D(n) = 2B·x − (2n − 1)·A ≥ 0`.
  x is split into two 12-bit halves (bit masks, no FMA-sensitive tricks), so `2B·x_hi`, `2B·x_lo`
  and `(2n − 1)·A` are exact float32 numbers and the sign of their sum is computed exactly with
  Knuth's two-sum (an error-free expansion, Shewchuk's Grow-Expansion).
* Where D = 0 exactly (x a float32 lying exactly on a half-way point, e.g. the UDP crop centre
  95.5 / 127.5), float64 rounding in the reference decides; those few points are evaluated once
  on the host with the reference's formula and looked up (`_tie_table`).
* The UDP sub-pixel offset `x / stride − mu = (D(mu) − A) / 2A` comes from the same expansion.

Values then agree with the numpy encoders to float32 rounding (a few 1e-7; the Gaussian is
evaluated separably as exp(−dx²/2σ²)·exp(−dy²/2σ²) instead of exp of the sum).

Wiring (train step): with `TopDownConfig(host_targets=False)` the pipeline's batches hold
`joints`, `joint_vis`, `dataset_index` and `skeleton_mask`; inside the jitted step call
`target, target_weight = dataset_targets(batch["joints"], batch["joint_vis"],
batch["dataset_index"], spec)` with `spec = TargetSpec.from_topdown(td_cfg)` (static, hashable)
before the losses. The function is element-wise over the batch, so under a batch-sharded `jit`
it runs sharded with no communication.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import heatmap_codec

# Joints farther than this many crop sizes outside the crop are clamped before rounding: their
# windows are off the heatmap either way, and the clamp keeps every product in the exact
# float32 integer range.
_CLAMP_CROPS = 4


@dataclasses.dataclass(frozen=True)
class _Axis:
  """Exact rounding data of one axis of one encoding: stride = a / b (reduced fraction)."""

  a: int
  b: int
  stride64: float  # The stride exactly as the numpy encoder computes it (float64).
  clamp: float  # |x| limit in crop pixels (see _CLAMP_CROPS).
  tie_lo: int  # First n of the tie table.
  tie_delta: tuple[int, ...]  # Reference result − n where x / stride + 0.5 == n exactly.


def _axis(num: int, den: int, stride64: float, image_extent: int, heatmap_extent: int,
          tmp_size: int) -> _Axis:
  g = math.gcd(num, den)
  a, b = num // g, den // g
  clamp = float(_CLAMP_CROPS * image_extent + 64)
  # Exactness conditions of the expansion: 2B fits 12 bits (so 2B·x_hi is exact) and every
  # (2n − 1)·A stays below 2^24.
  n_max = clamp * b / a + 2
  if 2 * b >= 2**12 or (2 * n_max + 1) * a >= 2**24:
    raise ValueError(f"stride {num}/{den}: too fine a heatmap for exact float32 rounding")
  # Centres that matter: any other mu gives an all-off window (weight 0) for both candidates.
  lo, hi = -tmp_size - 3, heatmap_extent + tmp_size + 3
  deltas = []
  for n in range(lo, hi + 1):
    x = fractions.Fraction((2 * n - 1) * a, 2 * b)  # x / stride + 0.5 == n exactly.
    x32 = np.float32(float(x))
    if fractions.Fraction(float(x32)) != x:
      deltas.append(0)  # No float32 lies exactly on this half-way point.
      continue
    # The reference's own arithmetic (heatmap_codec._target_windows): float32 / float64 + 0.5.
    ref = int(np.trunc(np.float64(x32) / stride64 + 0.5))
    deltas.append(ref - n)
  return _Axis(a, b, stride64, clamp, lo, tuple(deltas))


@dataclasses.dataclass(frozen=True)
class TargetSpec:
  """Static settings of the device target generator (hashable: a jit static argument).

  Attributes:
    image_size_wh: crop (width, height), e.g. (192, 256).
    heatmap_size_wh: heatmap (width, height), e.g. (48, 64).
    sigma: Gaussian std in heatmap pixels (3σ must be an integer, as in the numpy encoders).
    udp_per_dataset: per dataset index, True for UDP and False for MSRA encoding.
  """

  image_size_wh: tuple[int, int]
  heatmap_size_wh: tuple[int, int]
  sigma: float = 2.0
  udp_per_dataset: tuple[bool, ...] = ()

  def __post_init__(self):
    if self.sigma * 3 != int(self.sigma * 3):
      raise ValueError(f"3·sigma must be an integer, got sigma={self.sigma}")

  @classmethod
  def from_topdown(cls, cfg: Any) -> "TargetSpec":
    """From a `pipeline.TopDownConfig` (its crop/heatmap sizes, sigma and per-dataset encodings)."""
    return cls(image_size_wh=tuple(cfg.image_size_wh), heatmap_size_wh=tuple(cfg.heatmap_size_wh),
               sigma=float(cfg.sigma),
               udp_per_dataset=tuple(cfg.use_udp(d) for d in range(len(cfg.encodings))))

  @property
  def tmp_size(self) -> int:
    return int(self.sigma * 3)

  def axes(self, udp: bool) -> tuple[_Axis, _Axis]:
    """(x axis, y axis) rounding data of one encoding."""
    return _axes(self.image_size_wh, self.heatmap_size_wh, self.tmp_size, udp)


@functools.lru_cache(maxsize=None)
def _axes(image_wh: tuple[int, int], heatmap_wh: tuple[int, int], tmp_size: int, udp: bool
          ) -> tuple[_Axis, _Axis]:
  out = []
  for img, hm in zip(image_wh, heatmap_wh):
    img, hm = int(img), int(hm)
    # Strides exactly as heatmap_codec.udp_target / msra_target compute them (float64).
    if udp:
      num, den, stride64 = img - 1, hm - 1, (np.float64(img) - 1.0) / (np.float64(hm) - 1.0)
    else:
      num, den, stride64 = img, hm, np.float64(img) / np.float64(hm)
    out.append(_axis(num, den, float(stride64), img, hm, tmp_size))
  return tuple(out)


# ----------------------------------------------------------------------------------------------
# Exact float32 arithmetic
# ----------------------------------------------------------------------------------------------


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Knuth's error-free sum: a + b == s + e exactly (round-to-nearest float32)."""
  s = a + b
  bb = s - a
  e = (a - (s - bb)) + (b - bb)
  return s, e


def _split12(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x == hi + lo exactly, each with at most 12 significant bits (x float32)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  return hi, x - hi  # Exact: lo is the low part of x's own mantissa.


def _sign_and_value(p1: jax.Array, p2: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Exact sign of p1 + p2 − c (three exact float32 numbers) and its float32 value.

  Grow-Expansion of the two-term expansion of p1 − c by p2; the result [h0, h1, q] is
  non-overlapping with increasing magnitude, so its sign is that of its last non-zero term.
  """
  s, e = _two_sum(p1, -c)
  q1, h0 = _two_sum(p2, e)
  q, h1 = _two_sum(q1, s)
  sign = jnp.where(q != 0, jnp.sign(q), jnp.where(h1 != 0, jnp.sign(h1), jnp.sign(h0)))
  return sign, q + (h1 + h0)


def _round_centre(x: jax.Array, ax: _Axis) -> tuple[jax.Array, jax.Array]:
  """The reference's `int(x / stride + 0.5)` and the sub-pixel offset `x / stride − mu`.

  Args:
    x: [...] float32 finite coordinates in crop pixels.
    ax: the axis' rounding data.

  Returns:
    mu [...] int32 and offset [...] float32.
  """
  x = jnp.clip(x, -ax.clamp, ax.clamp)
  hi, lo = _split12(x)
  two_b = np.float32(2 * ax.b)
  p1, p2 = two_b * hi, two_b * lo  # Exact products (12-bit × 12-bit).

  def d(n):  # Sign and value of D(n) = 2B·x − (2n − 1)·A.
    return _sign_and_value(p1, p2, (2.0 * n - 1.0) * np.float32(ax.a))

  # float32 estimate of floor(x / stride + 0.5), off by at most one; fixed by exact signs.
  n0 = jnp.floor(x * np.float32(ax.b / ax.a) + np.float32(0.5))
  s_up, _ = d(n0 + 1)
  s_n0, _ = d(n0)
  floor_y = jnp.where(s_up >= 0, n0 + 1, jnp.where(s_n0 >= 0, n0, n0 - 1))
  s_floor, _ = d(floor_y)
  is_int = s_floor == 0
  # trunc = floor for y ≥ 0, ceil for y < 0 (ceil = floor unless y is not an integer).
  mu = jnp.where((floor_y >= 0) | is_int, floor_y, floor_y + 1)
  # Exact half-way points: the reference's float64 rounding decides (host table).
  table = jnp.asarray(ax.tie_delta, jnp.float32)
  idx = (mu - ax.tie_lo).astype(jnp.int32)
  in_table = (idx >= 0) & (idx < len(ax.tie_delta))
  delta = jnp.where(is_int & in_table, table[jnp.clip(idx, 0, len(ax.tie_delta) - 1)], 0.0)
  mu = mu + delta
  _, d_mu = d(mu)
  offset = (d_mu - np.float32(ax.a)) / np.float32(2 * ax.a)  # x / stride − mu.
  return mu.astype(jnp.int32), offset


def _encode_axis(coord: jax.Array, ax: _Axis, extent: int, tmp_size: int, sigma: float,
                 udp: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One axis of one encoding.

  Returns:
    g [..., extent] float32 1-D Gaussian restricted to the 13-wide window, in_bounds [...] bool
    (the window's far edge ≥ 0 and near edge < extent: the reference's bounds test).
  """
  mu, offset = _round_centre(coord, ax)
  pix = jnp.arange(extent, dtype=jnp.int32)
  rel = pix - mu[..., None]  # Pixel − centre, integer.
  in_window = jnp.abs(rel) <= tmp_size
  d = rel.astype(jnp.float32)
  if udp:
    d = d - offset[..., None]
  g = jnp.where(in_window, jnp.exp(-(d * d) / np.float32(2 * sigma**2)), 0.0)
  in_bounds = (mu - tmp_size < extent) & (mu + tmp_size + 1 >= 0)
  return g, in_bounds


def batch_targets(joints: jax.Array, joint_vis: jax.Array, use_udp: jax.Array,
                  spec: TargetSpec) -> tuple[jax.Array, jax.Array]:
  """Heatmap targets of a batch, equal to the numpy encoders sample by sample.

  Traceable (call it inside `jit`; every shape is static).

  Args:
    joints: [B, K, 2] float32 keypoints (x, y) in crop pixels (after the affine).
    joint_vis: [B, K] float32 visibility (0 for padded channels).
    use_udp: [B] bool, per sample: UDP (True) or MSRA (False) encoding.
    spec: static sizes and sigma.

  Returns:
    target [B, K, H_hm, W_hm] float32 and target_weight [B, K] float32 (visibility, zeroed for
    joints whose window misses the heatmap or that are not finite).
  """
  joints = jnp.asarray(joints, jnp.float32)
  vis = jnp.asarray(joint_vis, jnp.float32)
  finite = jnp.all(jnp.isfinite(joints), axis=-1)
  xy = jnp.where(finite[..., None], joints, 0.0)
  w_hm, h_hm = spec.heatmap_size_wh
  t = spec.tmp_size
  per_encoding = []
  for udp in (False, True):
    ax_x, ax_y = spec.axes(udp)
    gx, in_x = _encode_axis(xy[..., 0], ax_x, w_hm, t, spec.sigma, udp)
    gy, in_y = _encode_axis(xy[..., 1], ax_y, h_hm, t, spec.sigma, udp)
    per_encoding.append((gx, gy, in_x & in_y))
  sel = jnp.asarray(use_udp, bool)[:, None]
  gx = jnp.where(sel[..., None], per_encoding[1][0], per_encoding[0][0])
  gy = jnp.where(sel[..., None], per_encoding[1][1], per_encoding[0][1])
  in_bounds = jnp.where(sel, per_encoding[1][2], per_encoding[0][2])
  weight = jnp.where(in_bounds & finite, vis, 0.0)
  paste = (weight > 0.5).astype(jnp.float32)
  target = gy[..., :, None] * gx[..., None, :] * paste[..., None, None]
  return target, weight


def dataset_targets(joints: jax.Array, joint_vis: jax.Array, dataset_index: jax.Array,
                    spec: TargetSpec) -> tuple[jax.Array, jax.Array]:
  """`batch_targets` with each sample's encoding looked up from its dataset index.

  Args:
    joints: [B, K, 2] float32 crop-space keypoints.
    joint_vis: [B, K] float32 visibility.
    dataset_index: [B] int32.
    spec: static settings; `spec.udp_per_dataset[d]` is dataset d's encoding.

  Returns:
    target [B, K, H_hm, W_hm] and target_weight [B, K], float32.
  """
  if not spec.udp_per_dataset:
    raise ValueError("TargetSpec.udp_per_dataset is empty: build it with from_topdown(cfg)")
  udp = jnp.asarray(spec.udp_per_dataset, bool)[dataset_index]
  return batch_targets(joints, joint_vis, udp, spec)


def jitted_dataset_targets(spec: TargetSpec):
  """`dataset_targets` compiled for one spec (for host-side use and benchmarks)."""
  return jax.jit(lambda j, v, d: dataset_targets(j, v, d, spec))


def numpy_targets(joints: np.ndarray, joint_vis: np.ndarray, use_udp: Sequence[bool],
                  spec: TargetSpec) -> tuple[np.ndarray, np.ndarray]:
  """The host path for the same batch (per-sample numpy encoders), for parity and timing.

  Returns:
    target [B, K, H_hm, W_hm] and target_weight [B, K], float32.
  """
  outs = [(heatmap_codec.udp_target if u else heatmap_codec.msra_target)(
      j, v, spec.image_size_wh, spec.heatmap_size_wh, sigma=spec.sigma)
          for j, v, u in zip(joints, joint_vis, use_udp)]
  return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])
