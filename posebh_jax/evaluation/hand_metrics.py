"""InterHand2.6M's 2-D metrics as the reference reports them: PCK, AUC and EPE.

mmpose's `Kpt2dSviewRgbImgTopDownDataset._report_metric` with the InterHand2D config's
`metric=['PCK', 'AUC', 'EPE']` and its defaults:

* PCK: a keypoint is correct when its distance to the ground truth, divided by the longer side
  of the instance's box (the tightest box around its valid joints), is below 0.2; averaged per
  keypoint over instances, then over keypoints (`pck.keypoint_pck_accuracy`);
* AUC: the area under the PCK curve for thresholds 0, 1/20, ..., 19/20 of 30 pixels
  (`pck.keypoint_auc`, normalize=30);
* EPE: the mean end-point error in pixels over valid keypoints (`pck.keypoint_epe`).

Only keypoints with a valid flag count. Values are fractions (PCK, AUC) and pixels (EPE); the
paper prints PCK and AUC in percent.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from posebh_jax.evaluation import pck

PCK_THR = 0.2
AUC_NORMALIZE = 30.0  # Pixels.


def hand_pck_auc_epe(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, bbox: np.ndarray
                     ) -> dict[str, float]:
  """PCK@0.2 (box-normalised), AUC (0–30 px) and EPE (px).

  Args:
    pred: `[N, K, 2]` predicted image coordinates.
    gt: `[N, K, 2]` ground truth.
    valid: `[N, K]` bool: the joints that count.
    bbox: `[N, 4]` (x, y, w, h) instance boxes; PCK's normaliser is max(w, h).
  """
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  valid = np.asarray(valid, bool)
  side = np.max(np.asarray(bbox, np.float64)[:, 2:4], axis=1)
  _, pck_value, _ = pck.keypoint_pck_accuracy(pred, gt, valid, PCK_THR,
                                              np.stack([side, side], axis=1))
  return dict(PCK=float(pck_value), AUC=float(pck.keypoint_auc(pred, gt, valid, AUC_NORMALIZE)),
              EPE=float(pck.keypoint_epe(pred, gt, valid)))


def score_records(records: Sequence[Mapping[str, Any]], preds: Sequence[Mapping[str, Any]]
                  ) -> dict[str, float]:
  """`hand_pck_auc_epe` of predictions (`keypoints [K, 3]`) for `records` (same order)."""
  if len(records) != len(preds):
    raise ValueError(f"{len(preds)} predictions for {len(records)} instances")
  gt = np.stack([r["keypoints"] for r in records])
  pred = np.stack([np.asarray(p["keypoints"])[:, :2] for p in preds])
  return hand_pck_auc_epe(pred, gt[..., :2], gt[..., 2] > 0,
                          np.stack([r["bbox"] for r in records]))
