"""PCK-family keypoint metrics (spec §5.7), numpy.

* mmpose-compatible `keypoint_pck_accuracy`, `pose_pck_accuracy`, `keypoint_auc`,
  `keypoint_epe`, `keypoint_nme` (same masking rules, strict `<` threshold, -1 sentinels).
* `pck_box`: the project's box-normalised PCK for synthetic evaluation, where a visible keypoint
  is correct if `||pred - gt||_2 <= thr * max(box_w, box_h)` (inclusive).
"""

from __future__ import annotations

import numpy as np

from data_pipelines.heatmap_codec import get_max_preds


def _calc_distances(preds: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                    normalize: np.ndarray) -> np.ndarray:
  """Normalised distances `||(pred - gt) / norm||`, -1 where not evaluated (mmpose semantics).

  A sample with any zero normaliser is masked out entirely; negative normalisers are replaced
  by 1e6 (so those distances are ~0, as in the reference). Inputs are not modified (the
  reference overwrites `normalize` in place).

  Args:
    preds: `[N, K, D]` predictions.
    targets: `[N, K, D]` ground truth.
    mask: `[N, K]` bool, True where the keypoint is evaluated.
    normalize: `[N, D]` per-sample normalisers.

  Returns:
    `[K, N]` float32 distances, -1 where masked.
  """
  preds = np.asarray(preds)
  targets = np.asarray(targets)
  n, k, _ = preds.shape
  normalize = np.array(normalize, copy=True)
  valid = np.array(mask, dtype=bool, copy=True)
  valid[np.where((normalize == 0).sum(1))[0], :] = False
  distances = np.full((n, k), -1, dtype=np.float32)
  normalize[np.where(normalize <= 0)] = 1e6
  distances[valid] = np.linalg.norm(((preds - targets) / normalize[:, None, :])[valid], axis=-1)
  return distances.T


def _distance_acc(distances: np.ndarray, thr: float = 0.5) -> float:
  """Fraction of valid (!= -1) distances strictly below `thr`; -1 if none is valid."""
  valid = distances != -1
  num_valid = valid.sum()
  if num_valid > 0:
    return (distances[valid] < thr).sum() / num_valid
  return -1


def keypoint_pck_accuracy(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, thr: float,
                          normalize: np.ndarray) -> tuple[np.ndarray, float, int]:
  """PCK per keypoint and averaged (mmpose `keypoint_pck_accuracy`).

  A keypoint is correct if its normalised distance is `< thr`.

  Args:
    pred: `[N, K, 2]` predicted coordinates.
    gt: `[N, K, 2]` ground-truth coordinates.
    mask: `[N, K]` bool visibility; False entries are ignored.
    thr: threshold on the normalised distance.
    normalize: `[N, 2]` normalisers for (x, y).

  Returns:
    acc: `[K]` per-keypoint accuracy, -1 for keypoints with no valid sample.
    avg_acc: mean of the non-negative entries of `acc` (0 if none).
    cnt: number of keypoints with a valid accuracy.
  """
  distances = _calc_distances(pred, gt, mask, normalize)
  acc = np.array([_distance_acc(d, thr) for d in distances])
  valid_acc = acc[acc >= 0]
  cnt = len(valid_acc)
  avg_acc = valid_acc.mean() if cnt > 0 else 0
  return acc, avg_acc, cnt


def pose_pck_accuracy(output: np.ndarray, target: np.ndarray, mask: np.ndarray,
                      thr: float = 0.05,
                      normalize: np.ndarray | None = None) -> tuple[np.ndarray | None, float, int]:
  """PCK between the argmaxes of predicted and target heatmaps (training-log "acc").

  Args:
    output: `[N, K, H, W]` predicted heatmaps.
    target: `[N, K, H, W]` target heatmaps.
    mask: `[N, K]` bool visibility.
    thr: threshold on the normalised distance.
    normalize: `[N, 2]` normalisers; defaults to `(H, W)` per sample as in mmpose (note the
      reference's (H, W) order although coordinates are (x, y)).

  Returns:
    (acc `[K]`, avg_acc, cnt) as in `keypoint_pck_accuracy`; (None, 0, 0) when K == 0.
  """
  n, k, h, w = output.shape
  if k == 0:
    return None, 0, 0
  if normalize is None:
    normalize = np.tile(np.array([[h, w]]), (n, 1))
  pred, _ = get_max_preds(output)
  gt, _ = get_max_preds(target)
  return keypoint_pck_accuracy(pred, gt, mask, thr, normalize)


def keypoint_auc(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, normalize: float,
                 num_step: int = 20) -> float:
  """Area under the PCK curve for thresholds `i / num_step`, i = 0..num_step-1 (mmpose).

  Args:
    pred: `[N, K, 2]` predicted coordinates.
    gt: `[N, K, 2]` ground-truth coordinates.
    mask: `[N, K]` bool visibility.
    normalize: scalar normaliser in pixels (same for x and y).
    num_step: number of thresholds.

  Returns:
    Mean of the average PCK over the thresholds.
  """
  nor = np.tile(np.array([[normalize, normalize]]), (pred.shape[0], 1))
  auc = 0
  for i in range(num_step):
    _, avg_acc, _ = keypoint_pck_accuracy(pred, gt, mask, 1.0 * i / num_step, nor)
    auc += 1.0 / num_step * avg_acc
  return auc


def keypoint_nme(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray,
                 normalize_factor: np.ndarray) -> float:
  """Normalised mean error over valid keypoints (mmpose `keypoint_nme`).

  Args:
    pred: `[N, K, 2]` predicted coordinates.
    gt: `[N, K, 2]` ground-truth coordinates.
    mask: `[N, K]` bool visibility.
    normalize_factor: `[N, 2]` normalisers.

  Returns:
    Mean normalised distance (0 if nothing is valid).
  """
  distances = _calc_distances(pred, gt, mask, normalize_factor)
  valid = distances[distances != -1]
  return valid.sum() / max(1, len(valid))


def keypoint_epe(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
  """Mean end-point (Euclidean) error in pixels over valid keypoints (mmpose `keypoint_epe`).

  Args:
    pred: `[N, K, 2]` predicted coordinates.
    gt: `[N, K, 2]` ground-truth coordinates.
    mask: `[N, K]` bool visibility.

  Returns:
    Mean distance (0 if nothing is valid).
  """
  pred = np.asarray(pred)
  ones = np.ones((pred.shape[0], pred.shape[2]), dtype=np.float32)
  distances = _calc_distances(pred, gt, mask, ones)
  valid = distances[distances != -1]
  return valid.sum() / max(1, len(valid))


def pck_box(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, box_wh: np.ndarray,
            thr: float) -> tuple[np.ndarray, float]:
  """Box-normalised PCK used for the project's synthetic evaluation.

  A visible keypoint is correct if `||pred - gt||_2 <= thr * max(box_w, box_h)` (inclusive,
  unlike mmpose's strict `<`). Distances are computed in float64.

  Args:
    pred: `[N, K, 2]` predicted coordinates (pixels).
    gt: `[N, K, 2]` ground-truth coordinates (pixels).
    visible: `[N, K]` bool; only visible ground truth is scored.
    box_wh: `[N, 2]` box width and height (pixels).
    thr: fraction of the longer box side.

  Returns:
    per_keypoint: `[K]` float64 accuracy, NaN for keypoints with no visible ground truth.
    overall: mean correctness over all visible (n, k) pairs (NaN if none is visible).
  """
  pred = np.asarray(pred, dtype=np.float64)
  gt = np.asarray(gt, dtype=np.float64)
  visible = np.asarray(visible, dtype=bool)
  box_wh = np.asarray(box_wh, dtype=np.float64)
  dist = np.linalg.norm(pred - gt, axis=-1)  # [N, K]
  radius = thr * np.max(box_wh, axis=-1)  # [N]
  correct = (dist <= radius[:, None]) & visible
  n_vis = visible.sum(axis=0)  # [K]
  with np.errstate(invalid='ignore', divide='ignore'):
    per_keypoint = np.where(n_vis > 0, correct.sum(axis=0) / n_vis, np.nan)
  total = visible.sum()
  overall = float(correct.sum() / total) if total > 0 else float('nan')
  return per_keypoint, overall
