"""Device heatmap targets (data_pipelines/device_targets.py) equal the numpy encoders."""

import fractions

import jax
import numpy as np
import pytest

from data_pipelines import device_targets as dt
from data_pipelines import heatmap_codec

SPEC = dt.TargetSpec(image_size_wh=(192, 256), heatmap_size_wh=(48, 64), sigma=2.0,
                     udp_per_dataset=(True, False, True))


def _device(joints, vis, use_udp, spec=SPEC):
  fn = jax.jit(lambda j, v, u: dt.batch_targets(j, v, u, spec))
  target, weight = fn(joints, vis, np.asarray(use_udp))
  return np.asarray(target), np.asarray(weight)


def _assert_parity(joints, vis, use_udp, spec=SPEC):
  target, weight = _device(joints, vis, use_udp, spec)
  want_t, want_w = dt.numpy_targets(joints, vis, use_udp, spec)
  np.testing.assert_array_equal(weight, want_w)
  np.testing.assert_allclose(target, want_t, rtol=0, atol=1e-5)
  # Same pixels switched on: a window moved by one pixel would differ by far more than 1e-5,
  # but check the support too so a zero-vs-tiny mismatch cannot hide.
  np.testing.assert_array_equal(target > 0, want_t > 0)
  return target, weight


def test_random_joints_match_numpy_both_encodings():
  rs = np.random.RandomState(0)
  b, k = 24, 133
  # Inside, around and far outside the crop, plus fractional values near every half-way point.
  joints = rs.uniform(-60, 260, (b, k, 2)).astype(np.float32)
  joints[:, :20] = np.round(joints[:, :20] * 2) / 2 + rs.uniform(-1e-4, 1e-4, (b, 20, 2))
  joints[:, 20:25] = rs.uniform(-5e3, 5e3, (b, 5, 2))
  vis = (rs.rand(b, k) > 0.2).astype(np.float32)
  use_udp = np.arange(b) % 2 == 0
  target, weight = _assert_parity(joints, vis, use_udp)
  assert 0 < weight.sum() < vis.sum()  # Some joints fall off the heatmap.
  assert (target.max(axis=(2, 3)) > 0.9).sum() > b * k // 3


@pytest.mark.parametrize("udp", [True, False])
def test_half_way_points_and_their_float32_neighbours(udp):
  # x / stride + 0.5 exactly an integer (e.g. the UDP crop centre 95.5, 127.5) and the float32
  # values just below/above: the reference's float64 truncation decides between two windows.
  a_x, b_x = (191, 47) if udp else (4, 1)
  a_y, b_y = (85, 21) if udp else (4, 1)
  xs, ys = [], []
  for n in range(-8, 60):
    for (a, b, out) in ((a_x, b_x, xs), (a_y, b_y, ys)):
      x = fractions.Fraction((2 * n - 1) * a, 2 * b)
      x32 = np.float32(float(x))
      out.extend([x32, np.nextafter(x32, np.float32(-1e9)), np.nextafter(x32, np.float32(1e9))])
  n = min(len(xs), len(ys))
  joints = np.stack([np.asarray(xs[:n]), np.asarray(ys[::-1][:n])], axis=-1)[None]
  vis = np.ones(joints.shape[:2], np.float32)
  _assert_parity(joints.astype(np.float32), vis, [udp])


def test_float64_rounding_of_exact_half_way_points_is_followed():
  # Sizes where the reference's float64 division lands below an exact half-way point, so its
  # truncation gives n − 1 where exact arithmetic gives n: the host tie table must be used.
  spec = dt.TargetSpec(image_size_wh=(18, 22), heatmap_size_wh=(7, 9), sigma=2.0)
  ax_x, ax_y = spec.axes(udp=False)
  ties = [(ax.tie_lo + i, d) for ax in (ax_x,) for i, d in enumerate(ax.tie_delta) if d]
  assert ties, "the chosen sizes must have a half-way point the reference rounds differently"
  xs = [np.float32(float(fractions.Fraction((2 * n - 1) * ax_x.a, 2 * ax_x.b))) for n, _ in ties]
  joints = np.array([[[x, 10.0] for x in xs]], np.float32)
  vis = np.ones(joints.shape[:2], np.float32)
  target, _ = _assert_parity(joints, vis, [False], spec)
  # The exact rational rounding (no table) would put the peak one column further.
  checked = 0
  for k, (n, delta) in enumerate(ties):
    if 0 <= n + delta < spec.heatmap_size_wh[0]:
      assert int(np.argmax(target[0, k].max(axis=0))) == n + delta
      checked += 1
  assert checked


def test_non_finite_and_invisible_joints_get_zero_weight_and_no_heatmap():
  joints = np.array([[[np.nan, 50.0], [40.0, np.inf], [96.0, 128.0], [96.0, 128.0]]], np.float32)
  vis = np.array([[1.0, 1.0, 0.0, 1.0]], np.float32)
  for udp in (True, False):
    target, weight = _assert_parity(joints, vis, [udp])
    np.testing.assert_array_equal(weight[0], [0, 0, 0, 1])
    assert np.all(target[0, :3] == 0) and target[0, 3].max() > 0.9


def test_dataset_targets_picks_each_samples_encoding_and_runs_sharded():
  rs = np.random.RandomState(1)
  b, k = 8, 17
  joints = rs.uniform(0, 190, (b, k, 2)).astype(np.float32)
  vis = np.ones((b, k), np.float32)
  ds = np.array([0, 1, 2, 1, 0, 0, 1, 2], np.int32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  args = [jax.device_put(x, sharding) for x in (joints, vis, ds)]
  target, weight = dt.jitted_dataset_targets(SPEC)(*args)
  assert target.sharding.spec[0] == "data"
  want_t, want_w = dt.numpy_targets(joints, vis, [SPEC.udp_per_dataset[d] for d in ds], SPEC)
  np.testing.assert_allclose(np.asarray(target), want_t, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(weight), want_w)
  # MSRA peaks are exactly 1 at integer centres, UDP peaks generally are not.
  assert np.all(np.asarray(target)[ds == 1].max(axis=(2, 3)) == 1.0)


def test_spec_validation():
  with pytest.raises(ValueError, match="3·sigma"):
    dt.TargetSpec(image_size_wh=(192, 256), heatmap_size_wh=(48, 64), sigma=1.5)
  with pytest.raises(ValueError, match="udp_per_dataset"):
    dt.dataset_targets(np.zeros((1, 1, 2), np.float32), np.ones((1, 1), np.float32),
                       np.zeros((1,), np.int32), dt.TargetSpec((192, 256), (48, 64)))
  # The numpy encoders agree on what they accept.
  with pytest.raises(ValueError, match="3·sigma"):
    heatmap_codec.msra_target(np.zeros((1, 2)), np.ones(1), (192, 256), (48, 64), sigma=1.5)
