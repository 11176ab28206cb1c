"""Tests for data_pipelines/transforms.py: golden parity with mmpose plus unit properties.

Golden vectors (`shared/golden/targets.npz`, `affine.npz`) come from the reference PoseBH code;
see `shared/golden/README.md`. Only the shared-data fixture may skip.
"""

from __future__ import annotations


import cv2
import numpy as np
import pytest

from conftest import load_golden, shared_path
from data_pipelines import heatmap_codec
from data_pipelines import transforms as T

IMAGE_WH = (192, 256)
HEATMAP_WH = (48, 64)
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
COCO_UPPER = tuple(range(11))


@pytest.fixture(scope="module")
def targets_npz():
  return load_golden("targets.npz")


@pytest.fixture(scope="module")
def affine_npz():
  return load_golden("affine.npz")


@pytest.fixture(scope="module")
def image_rgb():
  path = shared_path("data/samples/coco/000000000785.jpg")
  return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------------------------
# Literal per-joint ports of the reference loops: an oracle for the vectorised encoders.
# ----------------------------------------------------------------------------------------------


def _loop_target(xy, vis, udp, sigma=2, image_wh=IMAGE_WH, heatmap_wh=HEATMAP_WH):
  image_size, (w_hm, h_hm) = np.array(image_wh), heatmap_wh
  k_num = len(xy)
  target = np.zeros((k_num, h_hm, w_hm), np.float32)
  weight = np.asarray(vis, np.float32).copy()
  tmp = sigma * 3
  size = 2 * tmp + 1
  x = np.arange(0, size, 1, np.float32)
  y = x[:, None]
  stride = (image_size - 1.0) / (np.array(heatmap_wh) - 1.0) if udp else image_size / [w_hm, h_hm]
  for k in range(k_num):
    mu_x = int(xy[k][0] / stride[0] + 0.5)
    mu_y = int(xy[k][1] / stride[1] + 0.5)
    ul = [int(mu_x - tmp), int(mu_y - tmp)]
    br = [int(mu_x + tmp + 1), int(mu_y + tmp + 1)]
    if ul[0] >= w_hm or ul[1] >= h_hm or br[0] < 0 or br[1] < 0:
      weight[k] = 0
      continue
    x0 = y0 = size // 2
    if udp:
      x0 += xy[k][0] / stride[0] - mu_x
      y0 += xy[k][1] / stride[1] - mu_y
    g = np.exp(-((x - x0)**2 + (y - y0)**2) / (2 * sigma**2))
    g_x = max(0, -ul[0]), min(br[0], w_hm) - ul[0]
    g_y = max(0, -ul[1]), min(br[1], h_hm) - ul[1]
    img_x = max(0, ul[0]), min(br[0], w_hm)
    img_y = max(0, ul[1]), min(br[1], h_hm)
    if weight[k] > 0.5:
      target[k][img_y[0]:img_y[1], img_x[0]:img_x[1]] = g[g_y[0]:g_y[1], g_x[0]:g_x[1]]
  return target, weight


class _FixedRng:
  """Stand-in generator returning scripted values, to pin down which draw decides what."""

  def __init__(self, uniforms=(), normals=()):
    self.uniforms, self.normals = list(uniforms), list(normals)

  def random(self):
    return self.uniforms.pop(0)

  def standard_normal(self):
    return self.normals.pop(0)


# ----------------------------------------------------------------------------------------------
# targets.npz
# ----------------------------------------------------------------------------------------------

ENCODERS = {"msra": heatmap_codec.msra_target, "udp": heatmap_codec.udp_target}
ZEROED = {
    "msra": [(1, 1), (1, 3), (1, 4), (4, 1), (4, 2), (4, 4), (4, 6), (4, 7), (4, 9), (4, 10),
             (5, 0)],
    "udp": [(1, 1), (1, 3), (1, 4), (4, 2), (4, 4), (4, 7), (4, 10), (5, 0)],
}
EMPTY_WINDOW = {"msra": [(1, 0), (4, 0), (4, 3)], "udp": [(4, 0), (4, 1), (4, 3)]}


@pytest.mark.parametrize("enc", ["msra", "udp"])
def test_targets_match_golden(targets_npz, enc):
  g = targets_npz
  assert tuple(g["image_size"]) == IMAGE_WH and tuple(g["heatmap_size"]) == HEATMAP_WH
  fn = ENCODERS[enc]
  for b in range(g["joints"].shape[0]):
    target, weight = fn(g["joints"][b], g["joints_visible"][b], IMAGE_WH, HEATMAP_WH, sigma=2.)
    assert target.dtype == np.float32 and target.shape == (17, 64, 48)
    assert weight.dtype == np.float32 and weight.shape == (17,)
    np.testing.assert_allclose(target, g[f"{enc}_target"][b], rtol=0, atol=1e-5)
    np.testing.assert_allclose(weight, g[f"{enc}_target_weight"][b, :, 0], rtol=0, atol=1e-5)
    # Joint-weights variant: same targets, weight × joint_weights.
    target_jw, weight_jw = fn(g["joints"][b], g["joints_visible"][b], IMAGE_WH, HEATMAP_WH,
                              sigma=2., joint_weights=g["joint_weights"])
    np.testing.assert_array_equal(target_jw, target)
    np.testing.assert_allclose(weight_jw, g[f"{enc}_target_weight_jw"][b, :, 0], rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("enc", ["msra", "udp"])
def test_targets_padded133_match_golden(targets_npz, enc):
  g = targets_npz
  target, weight = ENCODERS[enc](g["joints"][0], g["joints_visible"][0], IMAGE_WH, HEATMAP_WH)
  target, weight = heatmap_codec.pad_keypoints(target, weight[:, None], 133)
  assert target.shape == (133, 64, 48) and weight.shape == (133, 1)
  np.testing.assert_allclose(target, g[f"{enc}_target_padded133_sample0"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(weight, g[f"{enc}_target_weight_padded133_sample0"], rtol=0,
                             atol=1e-5)
  assert not target[17:].any() and not weight[17:].any()
  # Drawn straight into 133 channels (the pipeline's path): the same arrays, bit for bit.
  direct, direct_weight = ENCODERS[enc](g["joints"][0], g["joints_visible"][0], IMAGE_WH,
                                        HEATMAP_WH, num_channels=133)
  assert direct.shape == (133, 64, 48) and direct_weight.shape == (133,)
  np.testing.assert_array_equal(direct, target)
  np.testing.assert_array_equal(direct_weight, weight[:, 0])
  with pytest.raises(ValueError, match="num_channels=10 < K=17"):
    ENCODERS[enc](g["joints"][0], g["joints_visible"][0], IMAGE_WH, HEATMAP_WH, num_channels=10)


@pytest.mark.parametrize("enc", ["msra", "udp"])
def test_targets_edge_cases(targets_npz, enc):
  g = targets_npz
  for b, k in ZEROED[enc]:
    target, weight = ENCODERS[enc](g["joints"][b], g["joints_visible"][b], IMAGE_WH, HEATMAP_WH)
    assert g["joints_visible"][b, k, 0] == 1, (b, k)
    assert weight[k] == 0 and not target[k].any(), (enc, b, k, g["joints"][b, k])
  for b, k in EMPTY_WINDOW[enc]:
    target, weight = ENCODERS[enc](g["joints"][b], g["joints_visible"][b], IMAGE_WH, HEATMAP_WH)
    assert weight[k] == 1 and not target[k].any(), (enc, b, k, g["joints"][b, k])
  # x = −33.9 is kept by int() truncation but would be dropped by floor (MSRA, sample 4 joint 0).
  if enc == "msra":
    assert g["joints"][4, 0, 0] == np.float32(-33.9)
    assert (4, 0) not in ZEROED[enc]


@pytest.mark.parametrize("udp", [False, True])
def test_targets_match_literal_loop(udp):
  """Vectorised encoders equal a literal port of the reference loop, bit for bit."""
  rng = np.random.default_rng(1)
  k = 133
  xy = rng.uniform(-60, 320, (k, 2)).astype(np.float32)
  # Boundary values around the truncation and bounds tests, plus far-away joints.
  xy[:12, 0] = [-33.9, -34.0, -34.6, -30.1, -26.0, 213.9, 214.0, 217.5, 1e6, -1e6, 0.0, 191.0]
  xy[12:24, 1] = [-33.9, -34.0, -34.6, -26.0, 277.9, 278.0, 282.0, 1e6, -1e6, 0.0, 255.0, -2.1]
  vis = (rng.random(k) > 0.2).astype(np.float32)
  fn = heatmap_codec.udp_target if udp else heatmap_codec.msra_target
  target, weight = fn(xy, vis, IMAGE_WH, HEATMAP_WH)
  ref_target, ref_weight = _loop_target(xy, vis, udp)
  np.testing.assert_array_equal(weight, ref_weight)
  np.testing.assert_array_equal(target, ref_target)
  assert target.any() and (weight == 0).any()


def test_msra_peak_is_one_at_integer_centre():
  target, weight = heatmap_codec.msra_target(np.array([[40.0, 60.0]]), np.array([1.0]), IMAGE_WH, HEATMAP_WH)
  assert weight[0] == 1 and target[0, 15, 10] == 1.0 and target[0].sum() > 1
  with pytest.raises(ValueError):
    heatmap_codec.msra_target(np.array([[40.0, 60.0]]), np.array([1.0]), IMAGE_WH, HEATMAP_WH, sigma=1.5)


# ----------------------------------------------------------------------------------------------
# affine.npz
# ----------------------------------------------------------------------------------------------


def test_affine_matrices_match_golden(affine_npz):
  g = affine_npz
  for i in range(len(g["case_rot"])):
    args = (g["case_center"][i], g["case_scale"][i], g["case_rot"][i], g["case_output_size"][i])
    fwd = T.get_affine_transform(*args, shift=g["case_shift"][i])
    inv = T.get_affine_transform(*args, shift=g["case_shift"][i], inv=True)
    udp = T.get_warp_matrix(g["case_rot"][i], g["case_center"][i] * 2,
                            g["case_output_size"][i] - 1.0, g["case_scale"][i] * 200)
    assert fwd.dtype == np.float64 and udp.dtype == np.float32 and fwd.shape == (2, 3)
    np.testing.assert_allclose(fwd, g["case_affine"][i], rtol=0, atol=1e-5)
    np.testing.assert_allclose(inv, g["case_affine_inv"][i], rtol=0, atol=1e-5)
    np.testing.assert_allclose(udp, g["case_warp_udp"][i], rtol=0, atol=1e-5)


def test_box_center_scale_match_golden(affine_npz):
  g = affine_npz
  h_img, w_img = g["image_rgb"].shape[:2]
  assert (w_img, h_img) == (640, 425)
  clean = T.sanitize_bbox(g["bbox_raw"], w_img, h_img)
  np.testing.assert_allclose(clean, g["bbox_clean"], rtol=0, atol=1e-9)
  center, scale = T.box_to_center_scale(clean, IMAGE_WH[0] / IMAGE_WH[1])
  assert center.dtype == np.float32 and scale.dtype == np.float32
  np.testing.assert_allclose(center, g["center"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(scale, g["scale"], rtol=0, atol=1e-6)


def test_decoded_image_matches_golden(affine_npz, image_rgb):
  np.testing.assert_array_equal(image_rgb, affine_npz["image_rgb"])


@pytest.mark.parametrize("udp", [False, True])
@pytest.mark.parametrize("rot", [0, 30])
def test_top_down_affine_matches_golden(affine_npz, image_rgb, udp, rot):
  g = affine_npz
  name = f"{'udp' if udp else 'std'}_rot{rot}"
  crop, joints, trans = T.top_down_affine(image_rgb, g["joints_in"], g["joints_visible"],
                                          g["center"], g["scale"], rot, IMAGE_WH, udp)
  assert crop.shape == (256, 192, 3) and crop.dtype == np.uint8
  diff = np.abs(crop.astype(np.int16) - g[f"crop_{name}"].astype(np.int16))
  assert diff.max() <= 1, diff.max()
  assert trans.dtype == g[f"trans_{name}"].dtype
  np.testing.assert_allclose(trans, g[f"trans_{name}"], rtol=0, atol=1e-5)
  assert joints.dtype == np.float32 and joints.shape == (17, 2)
  np.testing.assert_allclose(joints, g[f"joints_{name}"][:, :2], rtol=0, atol=1e-4)


def test_rotation_senses_differ(affine_npz):
  """Same positive angle: standard and UDP crops rotate opposite ways (reference quirk)."""
  g = affine_npz
  std = T.crop_matrix(g["center"], g["scale"], 30, IMAGE_WH, use_udp=False)
  udp = T.crop_matrix(g["center"], g["scale"], 30, IMAGE_WH, use_udp=True)
  assert np.sign(std[0, 1]) != np.sign(udp[0, 1])


def test_input_tensor_matches_golden(affine_npz, image_rgb):
  g = affine_npz
  crop, _, _ = T.top_down_affine(image_rgb, g["joints_in"], g["joints_visible"], g["center"],
                                 g["scale"], 0, IMAGE_WH, use_udp=True)
  x = T.normalize_image(crop)
  assert x.dtype == np.float32 and x.shape == (256, 192, 3)
  np.testing.assert_allclose(x.transpose(2, 0, 1), g["input_tensor_udp_rot0"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Unit properties (no golden data)
# ----------------------------------------------------------------------------------------------


def _random_pose(rng, k=17, w=120, h=90):
  xy = np.stack([rng.uniform(0, w - 1, k), rng.uniform(0, h - 1, k)], 1).astype(np.float32)
  return xy


def test_flip_twice_is_identity():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
  xy = _random_pose(rng)
  vis = np.ones(17, np.float32)
  center = np.array([50.5, 40.0], np.float32)
  always = _FixedRng(uniforms=[0.0, 0.5])  # <= 0.5 flips (boundary included).
  im1, xy1, vis1, c1, f1 = T.random_flip(image, xy, vis, center, COCO_FLIP_PAIRS, always)
  im2, xy2, vis2, c2, f2 = T.random_flip(im1, xy1, vis1, c1, COCO_FLIP_PAIRS, always)
  assert f1 and f2
  assert not np.array_equal(im1, image)
  np.testing.assert_array_equal(im1, image[:, ::-1])
  np.testing.assert_array_equal(im2, image)
  np.testing.assert_allclose(xy2, xy, atol=1e-4)
  np.testing.assert_array_equal(vis2, vis)
  np.testing.assert_allclose(c2, center, atol=1e-5)
  np.testing.assert_allclose(c1[0], 120 - 50.5 - 1)


def test_flip_swaps_pairs_and_zeroes_invisible():
  xy = np.array([[10., 5.], [20., 6.], [30., 7.], [40., 8.]], np.float32)
  vis = np.array([1., 1., 0., 1.], np.float32)
  image = np.zeros((10, 100, 3), np.uint8)
  _, out, out_vis, _, flipped = T.random_flip(image, xy, vis, [50., 5.], [(1, 3)],
                                              _FixedRng(uniforms=[0.3]))
  assert flipped
  np.testing.assert_allclose(out[0], [99 - 10, 5])
  np.testing.assert_allclose(out[1], [99 - 40, 8])  # joint 1 now holds joint 3's data.
  np.testing.assert_allclose(out[3], [99 - 20, 6])
  np.testing.assert_allclose(out[2], [0, 0])  # invisible → multiplied by 0.
  np.testing.assert_array_equal(out_vis, [1, 1, 0, 1])
  # mmpose-style [K, 3] inputs keep their shapes.
  xy3 = np.concatenate([xy, np.zeros((4, 1), np.float32)], 1)
  vis3 = np.stack([vis, vis, np.zeros(4, np.float32)], 1)
  _, out3, vis3_out, _, _ = T.random_flip(image, xy3, vis3, [50., 5.], [(1, 3)],
                                          _FixedRng(uniforms=[0.3]))
  assert out3.shape == (4, 3) and vis3_out.shape == (4, 3)
  np.testing.assert_allclose(out3[:, :2], out)


def test_flip_not_applied_above_prob():
  image = np.arange(30, dtype=np.uint8).reshape(2, 5, 3)
  xy = np.array([[1., 1.]], np.float32)
  out_img, out_xy, _, out_c, flipped = T.random_flip(image, xy, np.ones(1), [2., 1.], [],
                                                     _FixedRng(uniforms=[0.5000001]))
  assert not flipped
  np.testing.assert_array_equal(out_img, image)
  np.testing.assert_array_equal(out_xy, xy)
  np.testing.assert_array_equal(out_c, [2., 1.])


def test_half_body_none_with_few_visible_joints():
  rng = np.random.default_rng(3)
  xy = _random_pose(rng)
  vis = np.zeros(17, np.float32)
  vis[:8] = 1  # 8 visible: the reference needs strictly more than 8.
  assert T.half_body_center_scale(xy, vis, COCO_UPPER, 0.75, rng, prob_half_body=1.0) is None
  # Enough joints overall, but the probability draw fails.
  vis[:] = 1
  assert T.half_body_center_scale(xy, vis, COCO_UPPER, 0.75, _FixedRng(uniforms=[0.3])) is None


@pytest.mark.parametrize("normal,expect_upper", [(0.0, True), (0.49, True), (0.5, False)])
def test_half_body_box_around_chosen_joints(normal, expect_upper):
  rng = np.random.default_rng(4)
  xy = _random_pose(rng)
  vis = np.ones(17, np.float32)
  vis[12] = 0  # An invisible lower-body joint must not count.
  xy[12] = [1000., 1000.]
  out = T.half_body_center_scale(xy, vis, COCO_UPPER, 0.75,
                                 _FixedRng(uniforms=[0.29], normals=[normal]))
  assert out is not None
  center, scale = out
  ids = [i for i in range(17) if vis[i] > 0 and (i in COCO_UPPER) == expect_upper]
  chosen = xy[ids]
  np.testing.assert_allclose(center, chosen.mean(0), atol=1e-4)
  assert center.dtype == np.float32 and scale.dtype == np.float32
  box_wh = scale * 200 / 1.5
  np.testing.assert_allclose(box_wh[0] / box_wh[1], 0.75, rtol=1e-5)
  extent = chosen.max(0) - chosen.min(0)
  assert np.all(box_wh >= extent - 1e-3) and np.isclose(box_wh, extent, rtol=1e-5).any()


def test_random_scale_rotation_ranges_and_draw_order():
  rng = np.random.default_rng(7)
  base = np.array([1.0, 4 / 3], np.float32)
  n = 20000
  scales, rots = np.empty((n, 2)), np.empty(n)
  for i in range(n):
    scales[i], rots[i] = T.random_scale_rotation(base, rng)
  ratio = scales / base
  assert ratio.min() >= 0.5 - 1e-7 and ratio.max() <= 1.5 + 1e-7
  assert (ratio.min() == pytest.approx(0.5)) and (ratio.max() == pytest.approx(1.5))
  np.testing.assert_allclose(ratio[:, 0], ratio[:, 1], rtol=1e-6)
  assert np.abs(rots).max() <= 80 and np.abs(rots).max() == 80
  assert abs(np.mean(rots == 0) - 0.4) < 0.02
  # Draw order: normal (scale), normal (rotation), uniform (rotation gate).
  a, b = np.random.default_rng(11), np.random.default_rng(11)
  s, r = T.random_scale_rotation(base, a)
  n1, n2, u = b.standard_normal(), b.standard_normal(), b.random()
  np.testing.assert_allclose(s, base * np.clip(n1 * 0.5 + 1, 0.5, 1.5))
  assert r == (np.clip(n2 * 40, -80, 80) if u <= 0.6 else 0.0)
  assert a.random() == b.random()  # Both streams consumed exactly three draws.


@pytest.mark.parametrize("udp", [False, True])
def test_transform_preds_inverts_crop(udp):
  center = np.array([210.3, 145.8], np.float32)
  scale = np.array([1.3, 1.7333334], np.float32)
  pts = np.array([[150., 80.], [210.3, 145.8], [260.7, 301.2], [100., 20.]])
  m = T.crop_matrix(center, scale, 0, IMAGE_WH, udp).astype(np.float64)
  # Crop pixels → heatmap pixels: UDP scales by (hm − 1)/(img − 1), standard by hm/img.
  if udp:
    factor = (np.array(HEATMAP_WH) - 1.0) / (np.array(IMAGE_WH) - 1.0)
  else:
    factor = np.array(HEATMAP_WH) / np.array(IMAGE_WH)
  hm = T.affine_points(pts, m) * factor
  back = heatmap_codec.transform_preds(hm, center, scale, HEATMAP_WH, udp)
  np.testing.assert_allclose(back, pts, atol=1e-3)
  # The other convention does not invert it: the test can tell UDP from standard.
  wrong = heatmap_codec.transform_preds(hm, center, scale, HEATMAP_WH, not udp)
  assert np.abs(wrong - pts).max() > 0.5


def test_standard_affine_moves_only_visible_joints():
  image = np.zeros((100, 100, 3), np.uint8)
  xy = np.array([[10., 20.], [30., 40.], [50., 60.]], np.float32)
  vis = np.array([1., 0., 1.], np.float32)
  center, scale = np.array([50., 50.], np.float32), np.array([0.75, 1.0], np.float32)
  _, std, m = T.top_down_affine(image, xy, vis, center, scale, 0, IMAGE_WH, use_udp=False)
  np.testing.assert_array_equal(std[1], xy[1])
  np.testing.assert_allclose(std[[0, 2]], T.affine_points(xy[[0, 2]], m), atol=1e-4)
  _, udp, mu = T.top_down_affine(image, xy, vis, center, scale, 0, IMAGE_WH, use_udp=True)
  np.testing.assert_allclose(udp, T.affine_points(xy, mu), atol=1e-4)
  assert not np.allclose(udp[1], xy[1])


def test_sanitize_bbox_rejects_and_clips():
  np.testing.assert_allclose(T.sanitize_bbox([-5., -3., 20., 10.], 100, 50), [0, 0, 19, 9])
  np.testing.assert_allclose(T.sanitize_bbox([90., 40., 50., 50.], 100, 50), [90, 40, 9, 9])
  assert T.sanitize_bbox([10., 10., 1., 5.], 100, 50) is None  # w − 1 = 0 → x2 == x1.
  assert T.sanitize_bbox([10., 10., 5., 5.], 100, 50, area=0) is None
  assert T.sanitize_bbox([120., 10., 5., 5.], 100, 50) is None


def test_box_to_center_scale_aspect_and_jitter():
  c, s = T.box_to_center_scale([10., 20., 30., 100.], 0.75)  # Too tall → widen.
  np.testing.assert_allclose(c, [25., 70.])
  np.testing.assert_allclose(s, [75. / 200 * 1.25, 100. / 200 * 1.25], rtol=1e-6)
  _, s = T.box_to_center_scale([0., 0., 150., 100.], 0.75)  # Too wide → heighten.
  np.testing.assert_allclose(s, [150. / 200 * 1.25, 200. / 200 * 1.25], rtol=1e-6)
  c, _ = T.box_to_center_scale([10., 20., 30., 100.], 0.75, rng=_FixedRng(uniforms=[0.3]))
  np.testing.assert_allclose(c, [25., 70.])  # 0.3 is not < 0.3: no jitter.
  c, _ = T.box_to_center_scale([10., 20., 30., 100.], 0.75, rng=np.random.default_rng(0),
                               jitter_prob=1.0)
  assert np.all(np.abs(c - [25., 70.]) <= [0.2 * 30, 0.2 * 100]) and not np.allclose(c, [25, 70])


def test_mpii_center_scale():
  c, s = T.mpii_center_scale([100., 200.], 2.0)
  np.testing.assert_allclose(c, [99., 200. + 30. - 1.])
  np.testing.assert_allclose(s, [2.5, 2.5])
  c, s = T.mpii_center_scale([-1., 50.], 2.0)
  np.testing.assert_allclose(c, [-2., 49.])
  np.testing.assert_allclose(s, [2., 2.])


def test_normalize_image_values():
  crop = np.zeros((2, 3, 3), np.uint8)
  crop[0, 0] = [255, 128, 0]
  x = T.normalize_image(crop)
  assert x.shape == (2, 3, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x[0, 0], [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224,
                                       -0.406 / 0.225], rtol=1e-6)
  np.testing.assert_allclose(x[1, 1], -T.IMAGENET_MEAN / T.IMAGENET_STD, rtol=1e-6)


def test_pipeline_normalisation_table_equals_normalize_image():
  from data_pipelines import pipeline
  # Every uint8 value in every channel, as a BGR crop: the lookup equals the float32 formula.
  values = np.arange(256, dtype=np.uint8)
  crop_bgr = np.stack([np.roll(values, 85 * c) for c in range(3)], axis=-1).reshape(16, 16, 3)
  np.testing.assert_array_equal(pipeline._normalize_bgr_crop(crop_bgr),
                                T.normalize_image(crop_bgr[..., ::-1]))


def test_pad_keypoints():
  t, w = np.ones((14, 4, 3), np.float32), np.ones(14, np.float32)
  pt, pw = heatmap_codec.pad_keypoints(t, w, 133)
  assert pt.shape == (133, 4, 3) and pw.shape == (133,) and pt.dtype == np.float32
  assert pt[:14].all() and not pt[14:].any() and pw.sum() == 14
  with pytest.raises(ValueError):
    heatmap_codec.pad_keypoints(t, w, 10)
