"""Evaluation utilities: heatmap decoding, flip test, OKS-NMS and PCK metrics.

* `decode`: mmpose-exact numpy heatmap decoding (argmax, quarter offset, DARK, DARK-UDP,
  transform back to image coordinates), flip-test helpers and a jittable JAX decoder
  (spec §5.2, §5.3).
* `nms`: OKS IoU, OKS-NMS, soft OKS-NMS and keypoint-score rescoring (spec §5.4).
* `pck`: mmpose PCK / AUC / EPE / NME and the project's box-normalised PCK (spec §5.7).
"""
