"""Heatmap decoding and flip-back parity with the reference goldens (spec §5.2-5.3).

Goldens: `decode.npz` (see the golden README).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_golden

from data_pipelines import heatmap_codec


# suffix -> keypoints_from_heatmaps kwargs (golden README, "decode.npz" settings table).
SETTINGS = {
    'default': dict(post_process='default', use_udp=False),
    'none': dict(post_process=None, use_udp=False),
    'unbiased': dict(post_process='unbiased', use_udp=False, kernel=11),
    'udp': dict(post_process='default', use_udp=True, kernel=11,
                target_type='GaussianHeatmap'),
}
# Float32 image coordinates reach ~550 px (ulp 6e-5); the JAX decoder differs from numpy by a
# few ulp because XLA contracts `x * s + c` into FMAs and the DARK-UDP blur/solve are not
# OpenCV's/float64. Measured max: 1.8e-4 px.
JAX_ATOL = 5e-4


@pytest.fixture(scope='module')
def golden() -> dict[str, np.ndarray]:
  return load_golden('decode.npz')


def _inputs(golden: dict[str, np.ndarray], prefix: str):
  return golden[f'{prefix}heatmaps'], golden[f'{prefix}center'], golden[f'{prefix}scale']


@pytest.mark.parametrize('prefix', ['', 'edge_'])
@pytest.mark.parametrize('suffix', list(SETTINGS))
def test_numpy_decode_matches_reference(golden, prefix, suffix):
  """Exact mmpose semantics, including the edge set's -1 channels and the UDP flat-index quirk."""
  heatmaps, center, scale = _inputs(golden, prefix)
  before = heatmaps.copy()
  preds, maxvals = heatmap_codec.keypoints_from_heatmaps(heatmaps, center, scale, **SETTINGS[suffix])
  ref_preds = golden[f'{prefix}preds_{suffix}']
  ref_maxvals = golden[f'{prefix}maxvals_{suffix}']
  assert preds.shape == ref_preds.shape and preds.dtype == np.float32
  assert maxvals.shape == ref_maxvals.shape
  np.testing.assert_allclose(preds, ref_preds, rtol=0, atol=1e-5)
  np.testing.assert_allclose(maxvals, ref_maxvals, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(heatmaps, before)  # The input is not blurred in place.


def test_edge_set_pathological_channels(golden):
  """Channels 5 (negative) and 9 (zero): argmax -1; UDP still refines them from channel 4's data."""
  heatmaps, center, scale = _inputs(golden, 'edge_')
  coords, maxvals = heatmap_codec.get_max_preds(heatmaps)
  np.testing.assert_array_equal(coords[0, [5, 9]], -np.ones((2, 2), np.float32))
  assert maxvals[0, 5, 0] < 0 and maxvals[0, 9, 0] == 0
  np.testing.assert_array_equal(coords[0, 0], [0.0, 0.0])  # Corner peak of channel 0.
  udp, _ = heatmap_codec.keypoints_from_heatmaps(heatmaps, center, scale, **SETTINGS['udp'])
  default, _ = heatmap_codec.keypoints_from_heatmaps(heatmaps, center, scale, **SETTINGS['default'])
  # Reference quirk (golden README): (25.09, 43.35) instead of default's (20.27, 37.61).
  np.testing.assert_allclose(udp[0, 5], [25.09, 43.35], atol=0.01)
  np.testing.assert_allclose(default[0, 5], [20.27, 37.61], atol=0.01)


def test_get_max_preds_small_case():
  hm = np.zeros((1, 3, 4, 5), np.float32)
  hm[0, 0, 2, 3] = 1.0
  hm[0, 1] = -0.5
  hm[0, 2, 1, 1] = hm[0, 2, 3, 4] = 0.7  # Tie: first in row-major order wins.
  coords, maxvals = heatmap_codec.get_max_preds(hm)
  np.testing.assert_array_equal(coords[0], [[3, 2], [-1, -1], [1, 1]])
  np.testing.assert_array_equal(maxvals[0, :, 0], np.array([1.0, -0.5, 0.7], np.float32))


def test_transform_preds_hand_computed():
  coords = np.array([[0.0, 0.0], [47.0, 63.0], [24.0, 32.0]], np.float32)
  center = np.array([100.0, 200.0], np.float32)
  scale = np.array([0.96, 1.28], np.float32)  # 192 x 256 px box.
  udp = heatmap_codec.transform_preds(coords, center, scale, (48, 64), use_udp=True)
  # UDP: x * 192 / 47 + 100 - 96, y * 256 / 63 + 200 - 128.
  np.testing.assert_allclose(
      udp, [[4.0, 72.0], [196.0, 328.0], [4.0 + 24 * 192 / 47, 72.0 + 32 * 256 / 63]], atol=1e-4)
  # Standard: x * 192 / 48 + 4, y * 256 / 64 + 72.
  std = heatmap_codec.transform_preds(coords, center, scale, (48, 64), use_udp=False)
  np.testing.assert_allclose(std, [[4.0, 72.0], [192.0, 324.0], [100.0, 200.0]], atol=1e-4)
  batched = heatmap_codec.transform_preds(coords[None], center[None], scale[None], (48, 64), use_udp=True)
  np.testing.assert_array_equal(batched[0], udp)


def test_flip_back_matches_reference(golden):
  out = heatmap_codec.flip_back(golden['heatmaps'], golden['flip_pairs'])
  np.testing.assert_allclose(out, golden['flip_back'], rtol=0, atol=1e-6)
  # Flipping back twice is the identity, and the JAX path gives the same array.
  np.testing.assert_array_equal(heatmap_codec.flip_back(out, golden['flip_pairs']), golden['heatmaps'])
  jax_out = jax.jit(lambda h: heatmap_codec.flip_back(h, golden['flip_pairs']))(golden['heatmaps'])
  np.testing.assert_array_equal(np.asarray(jax_out), golden['flip_back'])


def test_shift_heatmap_right():
  hm = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
  out = heatmap_codec.shift_heatmap_right(hm)
  np.testing.assert_array_equal(out[..., 1:], hm[..., :-1])
  np.testing.assert_array_equal(out[..., 0], hm[..., 0])
  np.testing.assert_array_equal(np.asarray(heatmap_codec.shift_heatmap_right(jax.numpy.asarray(hm))), out)


@pytest.mark.parametrize('prefix', ['', 'edge_'])
@pytest.mark.parametrize('suffix', ['default', 'none', 'udp'])
def test_jax_decode_matches_numpy(golden, prefix, suffix):
  """Jitted JAX decoder vs the numpy reference; for the edge set this includes channels 5/9,
  whose flat-index quirk the JAX version reproduces (agreement measured at 6e-5 px)."""
  heatmaps, center, scale = _inputs(golden, prefix)
  kwargs = SETTINGS[suffix]
  ref_preds, ref_maxvals = heatmap_codec.keypoints_from_heatmaps(heatmaps, center, scale, **kwargs)
  preds, maxvals = heatmap_codec.decode_heatmaps_jax(heatmaps, center, scale, use_udp=kwargs['use_udp'],
                                              post_process=kwargs['post_process'])
  preds, maxvals = np.asarray(preds), np.asarray(maxvals)
  assert preds.shape == ref_preds.shape and np.isfinite(preds).all()
  np.testing.assert_allclose(preds, ref_preds, rtol=0, atol=JAX_ATOL)
  np.testing.assert_array_equal(maxvals, ref_maxvals)
  np.testing.assert_allclose(preds, golden[f'{prefix}preds_{suffix}'], rtol=0, atol=JAX_ATOL)


def test_jax_blur_matches_opencv(golden):
  import cv2
  hm = golden['heatmaps'][:2]
  ref = np.stack([[cv2.GaussianBlur(c, (11, 11), 0) for c in s] for s in hm])
  out = np.asarray(jax.jit(heatmap_codec.gaussian_blur_jax)(hm))
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_blur_around_peaks_equals_the_whole_map_blur_there():
  """DARK-UDP blurs only the 3x3 block around each peak: the values of the whole-map blur up to
  float32 rounding (XLA contracts the two programs' multiply-adds differently: 1 ulp seen), also
  for peaks on the border and in the corners (edge clamp + reflection)."""
  rng = np.random.default_rng(1)
  n, k, h, w = 2, 9, 20, 14
  hm = jnp.asarray(rng.random((n, k, h, w), np.float32))
  peaks = np.stack([rng.integers(0, w, (n, k)), rng.integers(0, h, (n, k))], -1)
  peaks[0, :4] = [[0, 0], [w - 1, h - 1], [0, h - 1], [w - 1, 0]]
  ci = jnp.asarray(peaks, jnp.int32)
  local = np.asarray(jax.jit(heatmap_codec._blur_3x3_at_peaks, static_argnums=2)(hm, ci, 11))
  whole = np.asarray(jax.jit(heatmap_codec.gaussian_blur_jax)(hm))
  for b in range(n):
    for c in range(k):
      x, y = peaks[b, c]
      for i, dy in enumerate((-1, 0, 1)):
        for j, dx in enumerate((-1, 0, 1)):
          yy, xx = min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)
          np.testing.assert_allclose(local[b, c, i, j], whole[b, c, yy, xx], rtol=2.5e-7,
                                     atol=0, err_msg=str((b, c, dy, dx)))


def _gaussian_maps(rng, n, k, h, w, sigma=2.0):
  """[n, k, h, w] float32 Gaussian blobs at random sub-pixel centres (well-conditioned DARK)."""
  cx = rng.uniform(1, w - 2, (n, k, 1, 1))
  cy = rng.uniform(1, h - 2, (n, k, 1, 1))
  y, x = np.mgrid[:h, :w]
  return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_peak_local_blur_decodes_like_the_reference():
  """The peak-local path (every channel has a peak): numpy `post_dark_udp` on every channel."""
  hm = _gaussian_maps(np.random.default_rng(3), 2, 5, 16, 12)
  coords, _ = jax.jit(heatmap_codec.dark_udp_coords_jax)(hm)
  start, _ = heatmap_codec.get_max_preds(hm)
  ref = heatmap_codec.post_dark_udp(start.copy(), hm.copy())
  np.testing.assert_allclose(np.asarray(coords), ref, rtol=0, atol=JAX_ATOL)


def test_channel_without_peak_keeps_the_reference_reads():
  """A channel with max <= 0 (argmax -1) sends the batch through the whole-map blur, which keeps
  the reference's previous-channel reads: numpy `post_dark_udp` on every channel."""
  hm = _gaussian_maps(np.random.default_rng(2), 2, 3, 16, 12)
  hm[1, 1] = -1.0  # No peak: coords -1.
  coords, _ = jax.jit(heatmap_codec.dark_udp_coords_jax)(hm)
  start, _ = heatmap_codec.get_max_preds(hm)
  assert np.all(start[1, 1] == -1)
  ref = heatmap_codec.post_dark_udp(start.copy(), hm.copy())
  np.testing.assert_allclose(np.asarray(coords), ref, rtol=0, atol=JAX_ATOL)


def test_jax_udp_on_smooth_random_heatmaps():
  """Sub-pixel DARK-UDP agreement on a different shape (odd batch, 32x24 maps, peaks anywhere)."""
  rng = np.random.default_rng(0)
  n, k, h, w = 3, 5, 32, 24
  ys, xs = np.mgrid[0:h, 0:w]
  cx = rng.uniform(-0.5, w - 0.5, (n, k, 1, 1))
  cy = rng.uniform(-0.5, h - 0.5, (n, k, 1, 1))
  hm = np.exp(-((xs - cx)**2 + (ys - cy)**2) / 8.0).astype(np.float32)
  center = rng.uniform(100, 300, (n, 2)).astype(np.float32)
  scale = rng.uniform(0.5, 2.0, (n, 2)).astype(np.float32)
  ref, _ = heatmap_codec.keypoints_from_heatmaps(hm, center, scale, use_udp=True)
  out, _ = heatmap_codec.decode_heatmaps_jax(hm, center, scale, use_udp=True)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=JAX_ATOL)
  # DARK-UDP recovers the true sub-pixel centre of a clean Gaussian closely (UDP: x_img
  # = x * s / (w - 1) + c - s / 2), away from the border.
  s = scale * 200.0
  true_x = cx[..., 0, 0] * s[:, None, 0] / (w - 1) + center[:, None, 0] - s[:, None, 0] / 2
  px, py = cx[..., 0, 0], cy[..., 0, 0]
  interior = (px > 3) & (px < w - 4) & (py > 3) & (py < h - 4)
  unit = s[:, None, 0] / (w - 1)
  assert interior.any()
  assert (np.abs(ref[..., 0] - true_x) < 0.1 * unit)[interior].all()


def test_argmax_first_is_jnp_argmax_ties_included():
  """`argmax_first` (max, then the first index reaching it) equals `jnp.argmax`/`jnp.max` on
  every axis, with many ties."""
  x = jnp.asarray(np.random.default_rng(5).integers(0, 4, (3, 5, 6, 4)).astype(np.float32))
  for axis in range(x.ndim):
    idx, top = heatmap_codec.argmax_first(x, axis)
    np.testing.assert_array_equal(idx, jnp.argmax(x, axis=axis))
    np.testing.assert_array_equal(top, jnp.max(x, axis=axis))
    assert idx.dtype == jnp.int32
