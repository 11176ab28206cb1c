"""OKS-NMS parity with `oks_nms.npz` (spec §5.4) and hand-computed PCK cases (spec §5.7)."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import load_golden

from posebh_jax.evaluation import nms, pck



@pytest.fixture(scope='module')
def golden() -> dict[str, np.ndarray]:
  return load_golden('oks_nms.npz')


def _db(golden):
  """The reference's database: dicts with the [17, 3] array and Python-float score / area."""
  return [dict(keypoints=golden['keypoints'][i], score=float(golden['scores'][i]),
               area=float(golden['areas'][i])) for i in range(len(golden['keypoints']))]


# ---------------------------------------------------------------------------------------------
# OKS / NMS.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('suffix,vis_thr', [('', None), ('_visthr0p2', 0.2)])
def test_oks_iou_matrix(golden, suffix, vis_thr):
  flat = golden['keypoints'].reshape(len(golden['keypoints']), -1)
  areas = golden['areas']  # "areas as given" (float32).
  mat = np.stack([nms.oks_iou(flat[i], flat, areas[i], areas, golden['sigmas'], vis_thr)
                  for i in range(len(flat))])
  ref = golden[f'oks_iou_matrix{suffix}']
  np.testing.assert_allclose(mat, ref, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.diag(mat), 1.0, atol=1e-6)  # A pose overlaps itself perfectly.


@pytest.mark.parametrize('thr_name,thr', [('0p9', 0.9), ('0p5', 0.5)])
@pytest.mark.parametrize('vis_name,vis_thr', [('', None), ('_visthr0p2', 0.2)])
def test_oks_nms_keep(golden, thr_name, thr, vis_name, vis_thr):
  keep = nms.oks_nms(_db(golden), thr, sigmas=golden['sigmas'], vis_thr=vis_thr)
  np.testing.assert_array_equal(keep, golden[f'keep_oks_nms_thr{thr_name}{vis_name}'])


@pytest.mark.parametrize('thr_name,thr', [('0p9', 0.9), ('0p5', 0.5)])
def test_soft_oks_nms_keep(golden, thr_name, thr):
  keep = nms.soft_oks_nms(_db(golden), thr, sigmas=golden['sigmas'])
  np.testing.assert_array_equal(keep, golden[f'keep_soft_oks_nms_thr{thr_name}'])
  assert len(set(keep.tolist())) == 20  # Never drops, only re-orders and truncates to max_dets.


def test_oks_iou_vis_thr_uses_detection_side_only():
  g = np.array([[0.0, 0.0, 0.1], [10.0, 0.0, 0.1]])  # Every GT score below vis_thr.
  d = np.array([[[0.0, 0.0, 0.9], [13.0, 4.0, 0.1]]])  # Detection: keypoint 1 far but unconfident.
  sigmas = np.array([0.1, 0.1])
  # Only detection keypoint 0 (exact match) survives the mask -> OKS 1, despite low GT scores.
  np.testing.assert_allclose(nms.oks_iou(g.ravel(), d.reshape(1, -1), 100.0, np.array([100.0]),
                                         sigmas, vis_thr=0.2), [1.0])
  # Without the mask: e_1 = 25 / 0.04 / 100 / 2 = 3.125.
  np.testing.assert_allclose(nms.oks_iou(g.ravel(), d.reshape(1, -1), 100.0, np.array([100.0]),
                                         sigmas), [(1 + np.exp(-3.125)) / 2], rtol=1e-6)


def test_oks_nms_empty_and_single():
  assert len(nms.oks_nms([], 0.9)) == 0
  kp = np.zeros((17, 3), np.float32)
  np.testing.assert_array_equal(nms.oks_nms([dict(keypoints=kp, score=0.5, area=10.0)], 0.9), [0])


def test_rescore_instances_hand_computed():
  kps = np.zeros((3, 4, 3), np.float32)
  kps[0, :, 2] = [0.1, 0.5, 0.9, 0.2]  # 0.2 is not > 0.2: mean(0.5, 0.9) = 0.7.
  kps[1, :, 2] = [0.1, 0.05, 0.2, 0.0]  # None above vis_thr -> 0.
  kps[2, :, 2] = 1.0
  box = np.array([0.8, 0.9, 0.5], np.float32)
  np.testing.assert_allclose(nms.rescore_instances(kps, box, vis_thr=0.2), [0.56, 0.0, 0.5],
                             rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# PCK family.
# ---------------------------------------------------------------------------------------------


def _grid(n: int = 2, k: int = 3) -> np.ndarray:
  return np.arange(n * k * 2, dtype=np.float32).reshape(n, k, 2) * 7.0


def test_keypoint_pck_perfect():
  gt = _grid()
  acc, avg, cnt = pck.keypoint_pck_accuracy(gt.copy(), gt, np.ones((2, 3), bool), 0.05,
                                            np.full((2, 2), 10.0, np.float32))
  np.testing.assert_array_equal(acc, [1.0, 1.0, 1.0])
  assert avg == 1.0 and cnt == 3


def test_keypoint_pck_threshold_is_strict_and_masks():
  gt = np.zeros((2, 3, 2), np.float32)
  pred = gt.copy()
  pred[0, 0] = [3.0, 3.9]  # 4.92 px -> 0.492 < 0.5: correct.
  pred[1, 0] = [3.0, 4.0]  # Exactly 5 px -> 0.5, not < 0.5: wrong.
  pred[0, 1] = [30.0, 40.0]  # Wrong but invisible: ignored.
  mask = np.ones((2, 3), bool)
  mask[0, 1] = False
  mask[:, 2] = False  # Keypoint 2 never visible -> -1, excluded from the mean.
  normalize = np.full((2, 2), 10.0, np.float32)
  acc, avg, cnt = pck.keypoint_pck_accuracy(pred, gt, mask, 0.5, normalize)
  np.testing.assert_allclose(acc, [0.5, 1.0, -1.0])
  assert cnt == 2 and avg == pytest.approx(0.75)
  np.testing.assert_array_equal(normalize, 10.0)  # The reference's in-place edit is not copied.
  # A sample with a zero normaliser is dropped entirely.
  normalize[1] = [0.0, 10.0]
  acc, _, _ = pck.keypoint_pck_accuracy(pred, gt, mask, 0.5, normalize)
  np.testing.assert_allclose(acc, [1.0, -1.0, -1.0])  # Keypoint 1 had only sample 1 visible.


def test_pose_pck_accuracy_from_heatmaps():
  target = np.zeros((1, 2, 20, 20), np.float32)
  output = np.zeros_like(target)
  target[0, 0, 10, 10] = target[0, 1, 5, 5] = 1.0
  output[0, 0, 10, 10] = 1.0  # Exact.
  output[0, 1, 5, 8] = 1.0  # 3 px off; normaliser (H, W) = 20 -> 0.15 > 0.05.
  acc, avg, cnt = pck.pose_pck_accuracy(output, target, np.ones((1, 2), bool), thr=0.05)
  np.testing.assert_array_equal(acc, [1.0, 0.0])
  assert avg == 0.5 and cnt == 2


def test_keypoint_auc_and_epe_and_nme():
  gt = np.zeros((1, 2, 2), np.float32)
  pred = gt.copy()
  mask = np.ones((1, 2), bool)
  # Zero error: every threshold i/20 except thr=0 (strict <) counts -> 19/20.
  assert pck.keypoint_auc(pred, gt, mask, 10.0) == pytest.approx(0.95)
  pred[0, 1] = [3.0, 4.0]  # 5 px / 10 = 0.5: correct only for thr 0.55..0.95 (9 of 20).
  assert pck.keypoint_auc(pred, gt, mask, 10.0) == pytest.approx((19 + 9) / 40)
  assert pck.keypoint_epe(pred, gt, mask) == pytest.approx(2.5)
  mask[0, 0] = False
  assert pck.keypoint_epe(pred, gt, mask) == pytest.approx(5.0)
  assert pck.keypoint_nme(pred, gt, mask, np.array([[10.0, 10.0]])) == pytest.approx(0.5)


def test_pck_box_perfect():
  gt = _grid()
  per_kpt, overall = pck.pck_box(gt, gt, np.ones((2, 3), bool), np.array([[50.0, 80.0]] * 2), 0.05)
  np.testing.assert_array_equal(per_kpt, [1.0, 1.0, 1.0])
  assert overall == 1.0


def test_pck_box_threshold_visibility_and_nan():
  gt = np.zeros((3, 3, 2), np.float32)
  pred = gt.copy()
  box_wh = np.array([[100.0, 50.0], [40.0, 100.0], [100.0, 100.0]])  # Radius 5 px at thr 0.05.
  pred[0, 0] = [3.0, 4.0]  # Exactly 5 px: inside (inclusive).
  pred[1, 0] = [3.0, 4.1]  # 5.06 px: outside.
  pred[2, 0] = [0.0, 4.9]  # Inside.
  pred[0, 1] = [0.0, 5.2]  # Outside.
  pred[1, 1] = [100.0, 0.0]  # Far off but invisible: ignored.
  visible = np.ones((3, 3), bool)
  visible[1, 1] = False
  visible[:, 2] = False  # Keypoint 2 has no visible ground truth -> NaN.
  per_kpt, overall = pck.pck_box(pred, gt, visible, box_wh, 0.05)
  np.testing.assert_allclose(per_kpt[:2], [2 / 3, 1 / 2])
  assert np.isnan(per_kpt[2])
  # Overall pools the 5 visible (n, k) pairs (3 correct), not the per-keypoint means.
  assert overall == pytest.approx(3 / 5)
  per_kpt, overall = pck.pck_box(pred, gt, np.zeros((3, 3), bool), box_wh, 0.05)
  assert np.isnan(per_kpt).all() and np.isnan(overall)
