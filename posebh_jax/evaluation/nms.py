"""OKS-based NMS and keypoint rescoring (spec §5.4), numpy, matching mmpose 0.x `nms.py`.

Used for COCO-style evaluation (COCO, OCHuman, AIC, AP-10K, APT-36K, WholeBody): instances
are rescored by their confident keypoints, then greedily suppressed by OKS (`oks_thr=0.9`).

Database entries (`kpts_db`) are dicts with `keypoints` (`[K, 3]` x, y, score), `score`
(instance score, Python float or `[K]` per-joint scores) and `area` (box-record area).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

# COCO person sigmas (mmpose's default when `sigmas` is None).
COCO_SIGMAS = np.array([
    .26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89
]) / 10.0


def oks_iou(g: np.ndarray, d: np.ndarray, a_g: float, a_d: np.ndarray,
            sigmas: np.ndarray | None = None, vis_thr: float | None = None) -> np.ndarray:
  """OKS between one reference pose and several detections (mmpose `oks_iou`).

  `e_k = (dx_k^2 + dy_k^2) / (2 sigma_k)^2 / ((a_g + a_d) / 2 + eps) / 2`,
  `oks = mean_k exp(-e_k)`.

  With `vis_thr` set, only keypoints whose *detection* score exceeds `vis_thr` are averaged
  (0 if none). The reference intends both masks (`list(vg > t) and list(vd > t)`), but Python's
  `and` returns the second list, so the ground-truth side is ignored; reproduced as is.

  Args:
    g: `[3K]` flattened (x, y, score) of the reference pose (or `[K, 3]`).
    d: `[M, 3K]` flattened detections (or `[M, K, 3]`).
    a_g: area of the reference pose.
    a_d: `[M]` areas of the detections.
    sigmas: `[K]` per-keypoint sigmas (COCO if None).
    vis_thr: optional keypoint-score threshold.

  Returns:
    `[M]` float32 OKS values.
  """
  if sigmas is None:
    sigmas = COCO_SIGMAS
  g = np.asarray(g).reshape(-1)
  d = np.asarray(d).reshape(len(d), g.size)
  a_d = np.asarray(a_d)
  variances = (np.asarray(sigmas) * 2)**2
  xg, yg = g[0::3], g[1::3]
  xd, yd, vd = d[:, 0::3], d[:, 1::3], d[:, 2::3]
  dx = xd - xg
  dy = yd - yg
  # Same operation order/dtypes as the reference: float32 squares, then float64 divisions.
  e = (dx**2 + dy**2) / variances / ((a_g + a_d[:, None]) / 2 + np.spacing(1)) / 2
  ious = np.zeros(len(d), dtype=np.float32)
  for i in range(len(d)):
    e_i = e[i] if vis_thr is None else e[i][vd[i] > vis_thr]
    ious[i] = np.sum(np.exp(-e_i)) / len(e_i) if len(e_i) != 0 else 0.0
  return ious


def _db_arrays(kpts_db: Sequence[Mapping[str, Any]],
               score_per_joint: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(scores [N], flattened keypoints [N, 3K], areas [N]) from a keypoint database."""
  if score_per_joint:
    scores = np.array([np.asarray(k['score']).mean() for k in kpts_db])
  else:
    scores = np.array([k['score'] for k in kpts_db])
  kpts = np.array([np.asarray(k['keypoints']).flatten() for k in kpts_db])
  areas = np.array([k['area'] for k in kpts_db])
  return scores, kpts, areas


def oks_nms(kpts_db: Sequence[Mapping[str, Any]], thr: float, sigmas: np.ndarray | None = None,
            vis_thr: float | None = None, score_per_joint: bool = False) -> np.ndarray:
  """Greedy OKS-NMS (mmpose `oks_nms`).

  Sorts by score (descending), keeps the best remaining instance and drops every other
  remaining instance whose OKS with it is `> thr`.

  Args:
    kpts_db: list of dicts with `keypoints` `[K, 3]`, `score`, `area`.
    thr: OKS suppression threshold (0.9 in PoseBH's COCO-style evaluation).
    sigmas: `[K]` sigmas (COCO if None).
    vis_thr: optional keypoint-score threshold for the OKS (see `oks_iou`).
    score_per_joint: `score` holds per-joint scores; their mean is used.

  Returns:
    int64 indices into `kpts_db`, in keep order (empty list for an empty database).
  """
  if len(kpts_db) == 0:
    return []
  scores, kpts, areas = _db_arrays(kpts_db, score_per_joint)
  order = scores.argsort()[::-1]
  keep = []
  while len(order) > 0:
    i = order[0]
    keep.append(i)
    ovr = oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas, vis_thr)
    order = order[np.where(ovr <= thr)[0] + 1]
  return np.array(keep)


def _rescore(overlap: np.ndarray, scores: np.ndarray, thr: float,
             kind: str = 'gaussian') -> np.ndarray:
  """Soft-NMS rescoring: Gaussian `s * exp(-oks^2 / thr)`, or linear `s * (1 - oks)` where
  oks >= thr."""
  if len(overlap) != len(scores):
    raise ValueError('overlap and scores must have the same length')
  if kind == 'linear':
    scores = scores.copy()
    inds = np.where(overlap >= thr)[0]
    scores[inds] = scores[inds] * (1 - overlap[inds])
    return scores
  if kind != 'gaussian':
    raise ValueError(f'unknown rescoring {kind!r}')
  return scores * np.exp(-overlap**2 / thr)


def soft_oks_nms(kpts_db: Sequence[Mapping[str, Any]], thr: float, max_dets: int = 20,
                 sigmas: np.ndarray | None = None, vis_thr: float | None = None,
                 score_per_joint: bool = False) -> np.ndarray:
  """Soft OKS-NMS (mmpose `soft_oks_nms`, Gaussian rescoring).

  Never drops an instance: each step keeps the current best, rescores the rest by their OKS
  with it and re-sorts; stops after `max_dets` instances.

  Args:
    kpts_db: list of dicts with `keypoints` `[K, 3]`, `score`, `area`.
    thr: Gaussian rescoring parameter.
    max_dets: maximum number of returned instances.
    sigmas: `[K]` sigmas (COCO if None).
    vis_thr: optional keypoint-score threshold for the OKS.
    score_per_joint: `score` holds per-joint scores; their mean is used.

  Returns:
    int64 (intp) indices in keep order, at most `max_dets`.
  """
  if len(kpts_db) == 0:
    return []
  scores, kpts, areas = _db_arrays(kpts_db, score_per_joint)
  order = scores.argsort()[::-1]
  scores = scores[order]
  keep = np.zeros(max_dets, dtype=np.intp)
  count = 0
  while len(order) > 0 and count < max_dets:
    i = order[0]
    ovr = oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas, vis_thr)
    order = order[1:]
    scores = _rescore(ovr, scores[1:], thr)
    resort = scores.argsort()[::-1]
    order, scores = order[resort], scores[resort]
    keep[count] = i
    count += 1
  return keep[:count]


def rescore_instances(keypoints: np.ndarray, box_scores: np.ndarray,
                      vis_thr: float = 0.2) -> np.ndarray:
  """Instance score = mean confident keypoint score x box score (spec §5.4 step 2).

  `kpt_score` is the mean of the keypoint scores `> vis_thr` (0 when none is), accumulated
  joint by joint in the keypoints' dtype like the reference's Python loop so float32 sums
  round identically.

  Args:
    keypoints: `[N, K, 3]` (x, y, score) predictions.
    box_scores: `[N]` detector box scores.
    vis_thr: keypoint-score threshold.

  Returns:
    `[N]` rescored instance scores.
  """
  keypoints = np.asarray(keypoints)
  box_scores = np.asarray(box_scores)
  kpt_scores = keypoints[..., 2]
  valid = kpt_scores > vis_thr
  total = np.zeros(kpt_scores.shape[0], dtype=kpt_scores.dtype)
  for j in range(kpt_scores.shape[1]):  # Sequential, not pairwise, summation.
    total = total + np.where(valid[:, j], kpt_scores[:, j], 0)
  count = valid.sum(axis=1)
  mean = np.where(count > 0, total / np.maximum(count, 1).astype(total.dtype), 0)
  mean = mean.astype(total.dtype)
  return mean * box_scores
