"""PCK evaluation on held-out images: per dataset and across skeletons.

For images of dataset b and the skeleton of dataset a, the model runs with expert a and head a
(the inference graph of the reference for dataset a), the heatmaps are decoded to image
coordinates with a's encoding, and compared with the ground truth of a's keypoints on b's images.
a == b is the ordinary per-dataset score; a ≠ b is the cross-skeleton score, measurable when the
images carry ground truth for a's skeleton (`full_keypoints`, as the synthetic data does).
Correct means within `thr · max(box w, box h)` of the ground truth (PCK normalised by box size).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import numpy as np
from jax.sharding import Mesh

from data_pipelines import pipeline
from data_pipelines.skeletons import SkeletonLayout
from posebh_jax.evaluation import pck, predict


@dataclasses.dataclass
class PairResult:
  images: str  # Dataset whose images were used.
  skeleton: str  # Dataset whose skeleton (expert + head) was predicted.
  num_instances: int
  pck: dict[str, float]  # "pck@0.1" → value over all visible ground-truth keypoints.
  pck_novel: dict[str, float] | None  # Same, keypoints whose names the image dataset lacks.


class PCKEvaluator:
  """Evaluates a model's heads on the held-out records of every dataset."""

  def __init__(self, model: nn.Module, layout: SkeletonLayout, dataset_names: Sequence[str],
               val_records: Sequence[Sequence[Mapping[str, Any]]], cfg: pipeline.TopDownConfig,
               mesh: Mesh, *, batch_size: int, thresholds: Sequence[float] = (0.05, 0.1),
               flip_test: bool = False):
    n_dev = mesh.devices.size
    if batch_size % n_dev:
      raise ValueError(f"eval.batch_size={batch_size} is not divisible by {n_dev} devices")
    self.model, self.layout, self.names = model, layout, tuple(dataset_names)
    self.val_records, self.cfg, self.mesh = val_records, cfg, mesh
    self.batch_size, self.thresholds = batch_size, tuple(thresholds)
    # One jitted crops → keypoints function per skeleton (forward, flip test, decode on device).
    self.predictor = predict.TopDownPredictor(model, cfg, batch_size=batch_size,
                                              flip_test=flip_test, mesh=mesh)

  def pairs(self) -> list[tuple[int, int]]:
    """(image dataset b, skeleton dataset a) pairs that have ground truth."""
    out = []
    for b, records in enumerate(self.val_records):
      if not records:
        continue
      for a, skel in enumerate(self.layout.skeletons):
        if a == b or all(skel.name in r.get("full_keypoints", {}) for r in records):
          out.append((b, a))
    return out

  def _predict(self, params, batch_stats, records, a: int) -> np.ndarray:
    """Image-space predictions [N, K_a, 2] of skeleton a on `records` (expert a, head a)."""
    preds = self.predictor.predict_records(params, batch_stats, None, records, a)
    return np.stack([p["keypoints"][:, :2] for p in preds])

  def run(self, params, batch_stats) -> list[PairResult]:
    results = []
    for b, a in self.pairs():
      records = self.val_records[b]
      skel = self.layout.skeletons[a]
      preds = self._predict(params, batch_stats, records, a)
      gt = np.stack([r["keypoints"] if a == b else r["full_keypoints"][skel.name]
                     for r in records])
      box_wh = np.stack([r["bbox"][2:4] for r in records])
      visible = gt[..., 2] > 0
      novel_names = set(skel.keypoint_names) - set(self.layout.skeletons[b].keypoint_names)
      novel = np.array([n in novel_names for n in skel.keypoint_names])
      scores, novel_scores = {}, ({} if a != b and novel.any() else None)
      for thr in self.thresholds:
        _, overall = pck.pck_box(preds, gt[..., :2], visible, box_wh, thr)
        scores[f"pck@{thr:g}"] = float(overall)
        if novel_scores is not None:
          _, o = pck.pck_box(preds[:, novel], gt[:, novel, :2], visible[:, novel], box_wh, thr)
          novel_scores[f"pck@{thr:g}"] = float(o)
      results.append(PairResult(self.names[b], self.names[a], len(records), scores, novel_scores))
    return results
