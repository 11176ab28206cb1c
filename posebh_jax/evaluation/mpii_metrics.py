"""MPII PCKh (spec §5.6) and the hand-transfer PCK / AUC / EPE (spec §5.7), as the reference.

PCKh follows `TopDownMpiiDataset.evaluate` operation by operation: predictions sorted by
`bbox_id` (duplicates dropped) and made 1-based (`+ 1`), compared with `mpii_gt_val.mat`'s
`pos_gt_src`; a joint is correct when `||pred − gt|| ≤ thr · 0.6 · ||headbox diagonal||`; per
joint `PCKh_j = 100 · #correct / #annotated`; the mean weights joints by their annotated counts
with pelvis and thorax (rows 6, 7) masked out; PCKh@0.1 is row 10 of the 0:0.01:0.5 table.

Ground truth comes from `mpii_gt_val.mat` (`load_mpii_gt_mat`), from arrays in its layout
(`MpiiGroundTruth`), or from an mmpose MPII JSON (`mpii_gt_from_json`). The JSON has no head
boxes: pass them as arrays, or explicitly ask for the head-segment approximation, whose numbers
are then reported under keys prefixed `approx_head/` so they cannot pass for the official metric.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Sequence

import numpy as np

from data_pipelines import storage
from data_pipelines.skeletons import get_skeleton
from posebh_jax.evaluation.pck import keypoint_auc, keypoint_epe, keypoint_pck_accuracy

# `dataset_joints` of mpii_gt_val.mat, which is also the MPII skeleton's channel order.
MPII_JOINTS = ('rank', 'rkne', 'rhip', 'lhip', 'lkne', 'lank', 'pelv', 'thor', 'neck', 'head',
               'rwri', 'relb', 'rsho', 'lsho', 'lelb', 'lwri')
SC_BIAS = 0.6  # Head size = 0.6 · head-box diagonal (≈ the head segment length).
_MASKED_ROWS = slice(6, 8)  # Pelvis and thorax, by position as in the reference.
_SUMMARY = (('Head', ('head',)), ('Shoulder', ('lsho', 'rsho')), ('Elbow', ('lelb', 'relb')),
            ('Wrist', ('lwri', 'rwri')), ('Hip', ('lhip', 'rhip')), ('Knee', ('lkne', 'rkne')),
            ('Ankle', ('lank', 'rank')))
HEADBOX_APPROX = 'approx_head_segment'


@dataclasses.dataclass(frozen=True)
class MpiiGroundTruth:
  """MPII validation ground truth in `mpii_gt_val.mat`'s layout.

  Attributes:
    pos_gt_src: `[16, 2, N]` joint positions in 1-based (Matlab) image coordinates.
    jnt_missing: `[16, N]`, 1 where the joint is not annotated.
    headboxes_src: `[2, 2, N]` head-box corners `[corner (top-left, bottom-right), xy, n]`;
      only the diagonal's length is used.
    dataset_joints: the 16 joint abbreviations of the rows (`MPII_JOINTS` order in the file).
    headbox_source: where the head boxes come from: 'mpii_gt_val.mat', 'given' or
      `HEADBOX_APPROX` (see `mpii_gt_from_json`).
    skipped: instances whose joints were all marked missing because no head size could be
      approximated (only with `HEADBOX_APPROX`).
  """

  pos_gt_src: np.ndarray
  jnt_missing: np.ndarray
  headboxes_src: np.ndarray
  dataset_joints: tuple[str, ...] = MPII_JOINTS
  headbox_source: str = 'given'
  skipped: int = 0

  def __post_init__(self):
    if np.asarray(self.jnt_missing).dtype == bool:  # `1 - missing` needs numbers.
      object.__setattr__(self, 'jnt_missing', np.asarray(self.jnt_missing, np.uint8))
    n = np.shape(self.pos_gt_src)[-1] if np.ndim(self.pos_gt_src) == 3 else -1
    for name, shape in (('pos_gt_src', (16, 2, n)), ('jnt_missing', (16, n)),
                        ('headboxes_src', (2, 2, n))):
      if n < 0 or np.shape(getattr(self, name)) != shape:
        raise ValueError(f'MPII ground truth: {name} must have shape {shape} ([16, 2, N] for '
                         f'pos_gt_src), got {np.shape(getattr(self, name))}')
    if sorted(self.dataset_joints) != sorted(MPII_JOINTS):
      raise ValueError(f'MPII ground truth: dataset_joints must be a permutation of '
                       f'{MPII_JOINTS}, got {self.dataset_joints}')
    if not (np.isfinite(self.pos_gt_src).all() and np.isfinite(self.headboxes_src).all()):
      raise ValueError('MPII ground truth: non-finite joint positions or head boxes')

  @property
  def num_instances(self) -> int:
    return self.pos_gt_src.shape[-1]


def load_mpii_gt_mat(path: str | os.PathLike) -> MpiiGroundTruth:
  """Reads `mpii_gt_val.mat` (`dataset_joints`, `jnt_missing`, `pos_gt_src`, `headboxes_src`);
  local or gs:// (read as bytes: scipy takes a file object)."""
  try:
    data = storage.read_bytes(path)
  except FileNotFoundError:
    raise FileNotFoundError(f'MPII ground truth not found: {path}') from None
  import scipy.io  # Here, not at the top: ~0.4 s of every CLI's start, for MPII's .mat only.
  try:
    mat = scipy.io.loadmat(io.BytesIO(data))
  except Exception as e:  # scipy raises several types for files that are not .mat.
    raise ValueError(f'{path}: not a readable .mat file ({e})') from None
  missing = [k for k in ('dataset_joints', 'jnt_missing', 'pos_gt_src', 'headboxes_src')
             if k not in mat]
  if missing:
    raise ValueError(f'{path}: not an MPII ground-truth file (missing {missing})')
  # A 1×16 cell of strings loads as an object array of 1-element string arrays.
  names = tuple(str(np.asarray(x).reshape(-1)[0]) for x in np.asarray(mat['dataset_joints'])
                .reshape(-1))
  try:
    return MpiiGroundTruth(mat['pos_gt_src'], mat['jnt_missing'], mat['headboxes_src'], names,
                           'mpii_gt_val.mat')
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None


def mpii_gt_from_json(annotations: str | os.PathLike | Sequence[dict[str, Any]],
                      headboxes: np.ndarray | None = None, *,
                      approximate_headboxes: bool = False) -> MpiiGroundTruth:
  """Ground truth from an mmpose MPII JSON list (`joints` 1-based, `joints_vis`).

  `jnt_missing = 1 − joints_vis`. The JSON has no head boxes, so either:
  * `headboxes` `[N, 2, 2]` (per instance two opposite corners (x, y), 1-based), e.g. taken from
    the official annotation; or
  * `approximate_headboxes=True`: the head size is the head segment `||head_top − upper_neck||`
    (what `0.6 · diagonal` of the annotated head box estimates), encoded as a box whose diagonal
    is that length / 0.6. Instances without both joints annotated get all joints marked missing
    (counted in `skipped`). `mpii_pckh` names these results `approx_head/...`: they are close to,
    but not, the official PCKh.

  Raises:
    ValueError: neither head boxes nor the approximation, or malformed records (names the record).
  """
  source = 'MPII annotations'
  if isinstance(annotations, (str, os.PathLike)):
    source = os.fspath(annotations)
    annotations = json.loads(storage.read_text(source))
  joints, vis = [], []
  for i, rec in enumerate(annotations):
    try:
      j = np.asarray(rec['joints'], dtype=np.float64)
      v = np.asarray(rec['joints_vis'], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'{source}: record {i} needs numeric joints and joints_vis ({e})') from None
    if j.shape != (16, 2) or v.shape != (16,):
      raise ValueError(f'{source}: record {i} ({rec.get("image")}) has joints {j.shape} and '
                       f'joints_vis {v.shape}, expected (16, 2) and (16,)')
    joints.append(j)
    vis.append(v)
  joints, vis = np.stack(joints), np.stack(vis)  # [N, 16, 2], [N, 16]
  missing = (1 - vis).astype(np.uint8)
  skipped = 0
  if headboxes is not None:
    boxes = np.asarray(headboxes, dtype=np.float64)
    if boxes.shape != (len(joints), 2, 2):
      raise ValueError(f'{source}: headboxes must be [N={len(joints)}, 2, 2], got {boxes.shape}')
    source_name = 'given'
  elif approximate_headboxes:
    neck, top = joints[:, MPII_JOINTS.index('neck')], joints[:, MPII_JOINTS.index('head')]
    boxes = np.stack([neck, neck + (top - neck) / SC_BIAS], axis=1)
    no_head = (vis[:, MPII_JOINTS.index('neck')] <= 0) | (vis[:, MPII_JOINTS.index('head')] <= 0)
    missing[no_head] = 1
    skipped = int(no_head.sum())
    source_name = HEADBOX_APPROX
  else:
    raise ValueError(f'{source}: PCKh needs head boxes, which the JSON does not have: pass '
                     f'headboxes, use mpii_gt_val.mat, or approximate_headboxes=True')
  return MpiiGroundTruth(joints.transpose(1, 2, 0), missing.T, boxes.transpose(1, 2, 0),
                         MPII_JOINTS, source_name, skipped)


def _sort_and_unique(preds: np.ndarray, bbox_ids: Sequence[int]) -> np.ndarray:
  """The reference's `_sort_and_unique_bboxes`: stable sort by id, keep the first of each id."""
  if len(bbox_ids) != len(preds):
    raise ValueError(f'{len(bbox_ids)} bbox_ids for {len(preds)} predictions')
  order = sorted(range(len(preds)), key=lambda i: bbox_ids[i])
  keep = [i for j, i in enumerate(order) if j == 0 or bbox_ids[i] != bbox_ids[order[j - 1]]]
  return preds[keep]


def mpii_pckh(preds: np.ndarray, gt: MpiiGroundTruth,
              bbox_ids: Sequence[int] | None = None) -> dict[str, float]:
  """PCKh@0.5 / @0.1 of MPII predictions (spec §5.6).

  Args:
    preds: `[N, 16, 2 or 3]` predictions (x, y[, score]) in 0-based image pixels, in the
      ground truth's instance order, or any order with `bbox_ids`.
    gt: the ground truth (`load_mpii_gt_mat`, `mpii_gt_from_json`).
    bbox_ids: optional `[N]` ids (the running index over the annotation file); predictions are
      sorted by them and duplicates dropped, as the reference does.

  Returns:
    'Head', 'Shoulder', 'Elbow', 'Wrist', 'Hip', 'Knee', 'Ankle' (left/right means of PCKh@0.5),
    'PCKh' (the count-weighted mean over the 14 joints other than pelvis and thorax), 'PCKh@0.1'
    (same at 0.1), and per joint 'PCKh/<joint>' and 'PCKh@0.1/<joint>' (all 16, skeleton names);
    NaN for a joint no instance annotates, as the reference. With approximated head boxes every
    key is prefixed `approx_head/` and 'approx_head/skipped_instances' is added.
  """
  preds = np.asarray(preds)
  if preds.ndim != 3 or preds.shape[1] != 16 or preds.shape[2] not in (2, 3):
    raise ValueError(f'MPII predictions must be [N, 16, 2|3], got {preds.shape}')
  if bbox_ids is not None:
    preds = _sort_and_unique(preds, bbox_ids)
  if len(preds) != gt.num_instances:
    raise ValueError(f'{len(preds)} MPII predictions (after deduplication) for '
                     f'{gt.num_instances} ground-truth instances')
  bad = np.where(~np.isfinite(preds[..., :2]).all(axis=(1, 2)))[0]
  if len(bad):
    raise ValueError(f'MPII predictions {bad.tolist()[:10]} have non-finite coordinates')
  preds = preds[..., :2] + 1.0  # 0-based → Matlab 1-based, as the reference.

  pos_pred_src = np.transpose(preds, [1, 2, 0])
  jnt_visible = 1 - gt.jnt_missing
  uv_err = np.linalg.norm(pos_pred_src - gt.pos_gt_src, axis=1)
  headsizes = np.linalg.norm(gt.headboxes_src[1, :, :] - gt.headboxes_src[0, :, :], axis=0)
  headsizes *= SC_BIAS
  scale = headsizes * np.ones((len(uv_err), 1), dtype=np.float32)
  with np.errstate(divide='ignore', invalid='ignore'):
    scaled_uv_err = uv_err / scale * jnt_visible
    jnt_count = np.sum(jnt_visible, axis=1)
    pckh = 100. * np.sum((scaled_uv_err <= 0.5) * jnt_visible, axis=1) / jnt_count
    rng = np.arange(0, 0.5 + 0.01, 0.01)
    pck_all = np.zeros((len(rng), 16), dtype=np.float32)
    for r, threshold in enumerate(rng):
      pck_all[r, :] = 100. * np.sum((scaled_uv_err <= threshold) * jnt_visible, axis=1) / jnt_count

  pckh_masked = np.ma.array(pckh, mask=False)
  pckh_masked.mask[_MASKED_ROWS] = True
  count_masked = np.ma.array(jnt_count, mask=False)
  count_masked.mask[_MASKED_ROWS] = True
  jnt_ratio = count_masked / np.sum(count_masked).astype(np.float64)

  row = {name: gt.dataset_joints.index(name) for name in MPII_JOINTS}
  out = {label: float(pckh[row[joints[0]]] if len(joints) == 1 else
                      0.5 * (pckh[row[joints[0]]] + pckh[row[joints[1]]]))
         for label, joints in _SUMMARY}
  out['PCKh'] = float(np.sum(pckh_masked * jnt_ratio))
  out['PCKh@0.1'] = float(np.sum(pck_all[10, :] * jnt_ratio))
  full_names = dict(zip(MPII_JOINTS, get_skeleton('mpii').keypoint_names))
  for r, abbrev in enumerate(gt.dataset_joints):
    out[f'PCKh/{full_names[abbrev]}'] = float(pckh[r])
    out[f'PCKh@0.1/{full_names[abbrev]}'] = float(pck_all[10, r])
  if gt.headbox_source == HEADBOX_APPROX:
    out = {f'approx_head/{k}': v for k, v in out.items()}
    out['approx_head/skipped_instances'] = float(gt.skipped)
  return out


def hand_pck_auc_epe(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, bbox: np.ndarray, *,
                     pck_thr: float = 0.2, auc_norm: float = 30.0) -> dict[str, float]:
  """InterHand2.6M transfer metrics (spec §5.7, mmpose `InterHand2DDataset._report_metric`).

  PCK normalises by the longer side of each hand box (`< pck_thr`, mean over keypoints), AUC is
  the mean PCK over thresholds i/20 of `auc_norm` pixels, EPE the mean pixel error; all over
  visible keypoints (fractions, as mmpose; multiply by 100 for the README's percentages).

  Args:
    pred: `[N, K, 2]` predicted keypoints (pixels).
    gt: `[N, K, 2]` ground-truth keypoints.
    mask: `[N, K]` bool, visible ground truth.
    bbox: `[N, 4]` hand boxes (x, y, w, h).
    pck_thr: PCK threshold (0.2 in the reference).
    auc_norm: AUC normaliser in pixels (30 in the reference).

  Returns:
    {'PCK', 'AUC', 'EPE'}.
  """
  pred, gt = np.asarray(pred), np.asarray(gt)
  mask, bbox = np.asarray(mask, dtype=bool), np.asarray(bbox, dtype=np.float64)
  if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[2] != 2:
    raise ValueError(f'pred and gt must both be [N, K, 2], got {pred.shape} and {gt.shape}')
  if mask.shape != pred.shape[:2] or bbox.shape != (len(pred), 4):
    raise ValueError(f'mask must be [N, K] and bbox [N, 4], got {mask.shape} and {bbox.shape}')
  if not (np.isfinite(pred).all() and np.isfinite(gt).all()):
    raise ValueError('non-finite hand keypoints')
  side = np.max(bbox[:, 2:], axis=1)
  _, pck, _ = keypoint_pck_accuracy(pred, gt, mask, pck_thr, np.stack([side, side], axis=1))
  return {'PCK': float(pck), 'AUC': float(keypoint_auc(pred, gt, mask, auc_norm)),
          'EPE': float(keypoint_epe(pred, gt, mask))}
