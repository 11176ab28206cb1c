"""MPII PCKh (spec §5.6) and hand PCK/AUC/EPE (spec §5.7) against numbers computed here by loops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io
from conftest import shared_path

from posebh_jax.evaluation import mpii_metrics as mm

NAMES = ('right_ankle', 'right_knee', 'right_hip', 'left_hip', 'left_knee', 'left_ankle',
         'pelvis', 'thorax', 'upper_neck', 'head_top', 'right_wrist', 'right_elbow',
         'right_shoulder', 'left_shoulder', 'left_elbow', 'left_wrist')
GROUPS = {'Head': (9,), 'Shoulder': (12, 13), 'Elbow': (11, 14), 'Wrist': (10, 15),
          'Hip': (2, 3), 'Knee': (1, 4), 'Ankle': (0, 5)}


def _expected(pred0: np.ndarray, gt1: np.ndarray, visible: np.ndarray,
              headsize: np.ndarray) -> dict[str, float]:
  """PCKh by its definition, one joint and instance at a time.

  pred0: [N, 16, 2] 0-based predictions; gt1: [N, 16, 2] 1-based ground truth;
  visible: [N, 16] bool; headsize: [N] 0.6 · head-box diagonal.
  """
  n = len(pred0)
  out, counts = {}, {}
  for thr, key in ((0.5, 'PCKh'), (0.1, 'PCKh@0.1')):
    for j in range(16):
      hits = total = 0
      for i in range(n):
        if visible[i, j]:
          total += 1
          d = np.hypot(pred0[i, j, 0] + 1 - gt1[i, j, 0], pred0[i, j, 1] + 1 - gt1[i, j, 1])
          hits += d <= thr * headsize[i]
      out[f'{key}/{NAMES[j]}'] = 100 * hits / total if total else float('nan')
      counts[j] = total
    kept = [j for j in range(16) if j not in (6, 7)]  # Pelvis and thorax do not count.
    out[key] = sum(out[f'{key}/{NAMES[j]}'] * counts[j] for j in kept) / sum(counts[j]
                                                                            for j in kept)
  for label, joints in GROUPS.items():
    out[label] = np.mean([out[f'PCKh/{NAMES[j]}'] for j in joints])
  return out


def _assert_close(ours: dict, expected: dict, prefix: str = ''):
  assert set(ours) - {f'{prefix}skipped_instances'} == {prefix + k for k in expected}
  for k, v in expected.items():
    # The reference keeps its 0:0.01:0.5 table (PCKh@0.1) in float32.
    tol = 1e-6 if '@0.1' in k else 1e-12
    assert ours[prefix + k] == pytest.approx(v, rel=tol, abs=tol), k


@pytest.fixture(scope='module')
def samples():
  path = shared_path('data/samples/mpii/test_mpii.json')
  records = json.load(open(path))
  gt1 = np.array([r['joints'] for r in records], np.float64)
  visible = np.array([r['joints_vis'] for r in records]) > 0
  return path, gt1, visible


def _head_segment(gt1):
  return np.linalg.norm(gt1[:, 9] - gt1[:, 8], axis=-1)


# ---------------------------------------------------------------------------------------------
# The MPII samples (JSON: no head boxes).
# ---------------------------------------------------------------------------------------------


def test_ground_truth_as_predictions_is_100(samples):
  path, gt1, visible = samples
  stats = mm.mpii_pckh(gt1 - 1, mm.mpii_gt_from_json(path, approximate_headboxes=True))
  assert stats['approx_head/skipped_instances'] == 0
  assert all(v == 100.0 for k, v in stats.items() if k != 'approx_head/skipped_instances')
  assert len(stats) == 9 + 2 * 16 + 1


def test_shifted_predictions_with_approximate_head_boxes(samples):
  path, gt1, visible = samples
  rng = np.random.default_rng(0)
  seg = _head_segment(gt1)
  # Each joint moved by a fraction of the head segment chosen away from 0.1 and 0.5.
  frac = rng.choice([0.05, 0.3, 0.45, 0.7, 1.5], size=visible.shape)
  angle = rng.uniform(0, 2 * np.pi, size=visible.shape)
  shift = frac[..., None] * seg[:, None, None] * np.stack([np.cos(angle), np.sin(angle)], -1)
  pred0 = gt1 - 1 + shift
  ours = mm.mpii_pckh(pred0, mm.mpii_gt_from_json(path, approximate_headboxes=True))
  # The approximation's head size is the head segment itself.
  _assert_close(ours, _expected(pred0, gt1, visible, seg), 'approx_head/')
  assert 0 < ours['approx_head/PCKh'] < 100


def test_given_head_boxes_are_used_as_is(samples):
  path, gt1, visible = samples
  rng = np.random.default_rng(1)
  n = len(gt1)
  corner = rng.uniform(0, 500, size=(n, 2))
  boxes = np.stack([corner, corner + rng.uniform(20, 80, size=(n, 2))], axis=1)  # [N, 2, 2]
  pred0 = gt1 - 1 + rng.normal(0, 12, size=gt1.shape)
  ours = mm.mpii_pckh(pred0, mm.mpii_gt_from_json(path, boxes))
  headsize = 0.6 * np.linalg.norm(boxes[:, 1] - boxes[:, 0], axis=-1)
  _assert_close(ours, _expected(pred0, gt1, visible, headsize))
  assert 0 < ours['PCKh'] < 100 and not any(k.startswith('approx') for k in ours)


def test_approximation_skips_instances_without_a_head(samples):
  path, gt1, visible = samples
  records = json.load(open(path))
  records[2]['joints_vis'][9] = 0  # Head top not annotated.
  gt = mm.mpii_gt_from_json(records, approximate_headboxes=True)
  assert gt.skipped == 1 and gt.jnt_missing[:, 2].all()
  stats = mm.mpii_pckh(gt1 - 1, gt)
  assert stats['approx_head/skipped_instances'] == 1 and stats['approx_head/PCKh'] == 100.0


# ---------------------------------------------------------------------------------------------
# A synthetic mpii_gt_val.mat in the reference's layout.
# ---------------------------------------------------------------------------------------------


def _write_mat(path, rng, n=25):
  gt1 = rng.uniform(50, 900, size=(n, 16, 2))
  missing = (rng.random((n, 16)) < 0.15).astype(np.uint8)
  corner = rng.uniform(0, 800, size=(n, 2))
  boxes = np.stack([corner, corner + rng.uniform(15, 90, size=(n, 2))], axis=1)
  joints = np.empty((1, 16), dtype=object)  # A 1×16 cell of strings, as in the real file.
  for j, name in enumerate(mm.MPII_JOINTS):
    joints[0, j] = name
  scipy.io.savemat(path, {'dataset_joints': joints, 'jnt_missing': missing.T,
                          'pos_gt_src': gt1.transpose(1, 2, 0),
                          'headboxes_src': boxes.transpose(1, 2, 0)})
  return gt1, missing == 0, 0.6 * np.linalg.norm(boxes[:, 1] - boxes[:, 0], axis=-1)


def test_pckh_from_mat_file(tmp_path):
  rng = np.random.default_rng(2)
  gt1, visible, headsize = _write_mat(tmp_path / 'mpii_gt_val.mat', rng)
  gt = mm.load_mpii_gt_mat(tmp_path / 'mpii_gt_val.mat')
  assert gt.dataset_joints == mm.MPII_JOINTS and gt.headbox_source == 'mpii_gt_val.mat'
  frac = rng.uniform(0, 0.8, size=visible.shape)
  angle = rng.uniform(0, 2 * np.pi, size=visible.shape)
  pred0 = gt1 - 1 + (frac * headsize[:, None])[..., None] * np.stack([np.cos(angle),
                                                                      np.sin(angle)], -1)
  scores = rng.random(visible.shape + (1,))
  ours = mm.mpii_pckh(np.concatenate([pred0, scores], -1), gt)
  _assert_close(ours, _expected(pred0, gt1, visible, headsize))
  assert 10 < ours['PCKh'] < 90 and 0 < ours['PCKh@0.1'] < ours['PCKh']
  # Shuffled with duplicated boxes (distributed padding), sorted back by bbox_id.
  order = np.concatenate([rng.permutation(len(gt1)), [0, 7]])
  again = mm.mpii_pckh(pred0[order], gt, bbox_ids=order.tolist())
  assert not any(np.isnan(v) for v in ours.values()) and again == ours


def test_mat_with_permuted_joint_rows(tmp_path):
  """Summary groups follow `dataset_joints` names (the masked rows stay rows 6 and 7)."""
  rng = np.random.default_rng(3)
  gt1, visible, headsize = _write_mat(tmp_path / 'a.mat', rng)
  gt = mm.load_mpii_gt_mat(tmp_path / 'a.mat')
  pred0 = gt1 - 1 + rng.normal(0, 6, size=gt1.shape)
  swap = list(range(16))
  swap[9], swap[10] = 10, 9  # Rows 9 and 10 exchanged: 'rwri' first, then 'head'.
  permuted = mm.MpiiGroundTruth(gt.pos_gt_src[swap], gt.jnt_missing[swap], gt.headboxes_src,
                                tuple(gt.dataset_joints[j] for j in swap))
  a, b = mm.mpii_pckh(pred0, gt), mm.mpii_pckh(pred0[:, swap], permuted)
  for key in ('Head', 'Wrist', 'PCKh', 'PCKh@0.1', 'PCKh/head_top', 'PCKh/right_wrist'):
    assert a[key] == pytest.approx(b[key], rel=1e-12), key


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(samples, tmp_path):
  path, gt1, _ = samples
  with pytest.raises(ValueError, match='needs head boxes'):
    mm.mpii_gt_from_json(path)
  gt = mm.mpii_gt_from_json(path, approximate_headboxes=True)
  with pytest.raises(ValueError, match=r'must be \[N, 16, 2\|3\]'):
    mm.mpii_pckh(gt1[:, :14] - 1, gt)
  with pytest.raises(ValueError, match='4 MPII predictions .* for 5 ground-truth'):
    mm.mpii_pckh(gt1[:4] - 1, gt)
  bad = gt1 - 1
  bad[3, 5, 1] = np.nan
  with pytest.raises(ValueError, match=r'predictions \[3\] have non-finite'):
    mm.mpii_pckh(bad, gt)
  with pytest.raises(ValueError, match=r'headboxes must be \[N=5, 2, 2\]'):
    mm.mpii_gt_from_json(path, np.zeros((4, 2, 2)))
  scipy.io.savemat(tmp_path / 'x.mat', {'pos_gt_src': np.zeros((16, 2, 3))})
  with pytest.raises(ValueError, match=r"x.mat: not an MPII ground-truth file \(missing "
                                       r"\['dataset_joints'"):
    mm.load_mpii_gt_mat(tmp_path / 'x.mat')
  with pytest.raises(FileNotFoundError, match='MPII ground truth not found'):
    mm.load_mpii_gt_mat(tmp_path / 'none.mat')
  with pytest.raises(ValueError, match='record 0 .* expected \\(16, 2\\)'):
    mm.mpii_gt_from_json([{'joints': [[0, 0]] * 14, 'joints_vis': [1] * 16}],
                         approximate_headboxes=True)


# ---------------------------------------------------------------------------------------------
# Hand transfer metrics (InterHand2.6M protocol).
# ---------------------------------------------------------------------------------------------


def test_hand_pck_auc_epe():
  rng = np.random.default_rng(4)
  n, k = 12, 21
  gt = rng.uniform(0, 256, size=(n, k, 2))
  pred = gt + rng.normal(0, 8, size=gt.shape)
  mask = rng.random((n, k)) > 0.1
  bbox = np.concatenate([rng.uniform(0, 50, (n, 2)), rng.uniform(40, 160, (n, 2))], axis=1)
  ours = mm.hand_pck_auc_epe(pred, gt, mask, bbox)
  dist = np.linalg.norm(pred - gt, axis=-1)
  side = bbox[:, 2:].max(axis=1)

  def pck(norm, thr):  # Mean over keypoints of the per-keypoint hit rate (strict <).
    return np.mean([np.mean(dist[mask[:, j], j] / norm[mask[:, j]] < thr) for j in range(k)])

  assert ours['PCK'] == pytest.approx(pck(side, 0.2), rel=1e-6)
  assert ours['AUC'] == pytest.approx(np.mean([pck(np.full(n, 30.0), i / 20) for i in range(20)]),
                                      rel=1e-6)
  assert ours['EPE'] == pytest.approx(dist[mask].mean(), rel=1e-6)
  assert 0 < ours['PCK'] < 1 and 0 < ours['AUC'] < 1
  with pytest.raises(ValueError, match=r'mask must be \[N, K\]'):
    mm.hand_pck_auc_epe(pred, gt, mask[:, :5], bbox)
