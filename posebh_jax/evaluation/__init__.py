"""Evaluation utilities: heatmap decoding, flip test, OKS-NMS and PCK metrics.

* `decode`: mmpose-exact numpy heatmap decoding (argmax, quarter offset, DARK, DARK-UDP,
  transform back to image coordinates), flip-test helpers and a jittable JAX decoder
  (spec §5.2, §5.3).
* `nms`: OKS IoU, OKS-NMS, soft OKS-NMS and keypoint-score rescoring (spec §5.4).
* `pck`: mmpose PCK / AUC / EPE / NME and the project's box-normalised PCK (spec §5.7).
* `coco_metrics`: the paper's COCO-style protocol per benchmark (rescoring, OKS-NMS, result
  JSON, COCOeval with xtcocotools' rules: AIC `use_area=False`, WholeBody parts, per-category
  animals) behind `evaluate_dataset(kind, gt, predictions)` (spec §5.1, §5.4, §5.5).
* `mpii_metrics`: MPII PCKh@0.5/@0.1 from `mpii_gt_val.mat` (or JSON + head boxes) and the
  hand-transfer PCK / AUC / EPE (spec §5.6, §5.7).
"""
