"""Reference-compatibility switches (spec §6): the authors' code as implemented vs. as intended.

Every field defaults to False, i.e. the *intended* behaviour. Setting a field to True reproduces
the reference implementation's behaviour for that item exactly, so the released numbers' training
can be replicated or ablated one item at a time (`--config.reference_compat.<name>=True`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class ReferenceCompat:
  """One flag per reference defect (spec §6.x); True = behave as the reference implementation.

  Attributes:
    css_pseudo_keypoint: 6.1, CSS pseudo keypoint `w_h·p_h + w_g·c_g` (adds a scalar) instead of
      the confidence-weighted mean `w_h·p_h + w_g·p_g`.
    css_peak_distance: 6.2, CSS peak distance `sqrt((hx−gx)² + (gx−gy)²)` instead of
      `sqrt((hx−gx)² + (hy−gy)²)`.
    proto_logit_offset: 6.3, prototype logit columns of dataset d start at flat column `s_d`
      instead of `s_d·M`.
    sinkhorn_local_column: 6.4, the Sinkhorn input of local class k uses the prototypes of global
      keypoint k instead of `s_d + k`.
    correct_mask_local: 6.5, the "correctly classified" mask compares the local class with the
      global argmax instead of `s_d + k`.
    cps_topk_sort: 6.6, cluster prototypes take the "top-M" by sorting along the centroid axis
      (cluster ids used as prototype ids) instead of the M prototypes nearest to each centroid.
    cps_target_order: 6.7, CPS cluster targets concatenated in dataset order while predictions
      are in batch order (mis-aligned) instead of aligned per sample.
    freeze_hook_bookkeeping: 6.8, a 'freeze' event of an already-frozen parameter group marks it
      non-learnable for good (ViT-B's backbone never trains) instead of freezing it again; acts
      on the stage schedule (`train/schedule.py`), not inside the step.
  """
  css_pseudo_keypoint: bool = False
  css_peak_distance: bool = False
  proto_logit_offset: bool = False
  sinkhorn_local_column: bool = False
  correct_mask_local: bool = False
  cps_topk_sort: bool = False
  cps_target_order: bool = False
  freeze_hook_bookkeeping: bool = False

  @classmethod
  def from_mapping(cls, m: Mapping[str, Any] | None) -> "ReferenceCompat":
    """Builds from a config section; unknown names raise (a typo must not silently do nothing)."""
    if m is None:
      return cls()
    m = dict(m)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(m) - known)
    if unknown:
      raise ValueError(f"unknown reference_compat flags {unknown}; known: {sorted(known)}")
    return cls(**{k: bool(v) for k, v in m.items()})
