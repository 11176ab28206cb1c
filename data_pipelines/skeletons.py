"""Skeleton metadata as data.

A skeleton is a named, ordered list of keypoints with left/right swap partners, OKS sigmas and
upper/lower body membership. Everything that depends on a skeleton (flip pairs, half-body ids,
OKS evaluation, drawing) is derived from a `SkeletonInfo`, so adding a dataset with a new skeleton
is a matter of adding one more `SkeletonInfo` value (or building one from a config entry with
`SkeletonInfo.from_dict`), never of changing code.

The synthetic skeletons mirror the real ones they stand in for: `synth_coco` has COCO's 17
keypoints in COCO order, `synth_aic` AI Challenger's 14 (with head top and neck), and
`synth_ap10k` AP-10K's 17 quadruped keypoints (spec §4.2). The generator in
`data_pipelines/synthetic` renders figures whose landmarks carry exactly these names.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SkeletonInfo:
  """One skeleton type.

  Attributes:
    name: unique name, e.g. "coco".
    keypoint_names: K names in channel order.
    swap: K names of the flip partner ("" for keypoints on the mirror axis).
    sigmas: K OKS sigmas.
    upper_body: K booleans; keypoints not marked upper count as lower body (spec §4.4 step 3).
    body_type: what kind of body this skeleton describes ("biped" or "quadruped"); skeletons of the
      same body type can be measured on each other's images (cross-skeleton evaluation).
    limbs: pairs of keypoint indices drawn as sticks in overlays.
  """

  name: str
  keypoint_names: tuple[str, ...]
  swap: tuple[str, ...]
  sigmas: tuple[float, ...]
  upper_body: tuple[bool, ...]
  body_type: str = "biped"
  limbs: tuple[tuple[int, int], ...] = ()

  def __post_init__(self):
    k = len(self.keypoint_names)
    for field in ("swap", "sigmas", "upper_body"):
      if len(getattr(self, field)) != k:
        raise ValueError(
            f"skeleton {self.name!r}: {field} has {len(getattr(self, field))} entries, "
            f"expected {k} (one per keypoint)")
    if len(set(self.keypoint_names)) != k:
      raise ValueError(f"skeleton {self.name!r}: duplicate keypoint names")
    names = set(self.keypoint_names)
    for kp, partner in zip(self.keypoint_names, self.swap):
      if partner and partner not in names:
        raise ValueError(f"skeleton {self.name!r}: swap partner {partner!r} of {kp!r} is unknown")
    for a, b in self.limbs:
      if not (0 <= a < k and 0 <= b < k):
        raise ValueError(f"skeleton {self.name!r}: limb ({a}, {b}) out of range")

  @property
  def num_keypoints(self) -> int:
    return len(self.keypoint_names)

  @property
  def flip_pairs(self) -> tuple[tuple[int, int], ...]:
    """Pairs (i, j), i < j, each listed once in order of first occurrence (as mmpose builds them)."""
    index = {n: i for i, n in enumerate(self.keypoint_names)}
    pairs, seen = [], set()
    for i, partner in enumerate(self.swap):
      if not partner:
        continue
      j = index[partner]
      key = (min(i, j), max(i, j))
      if key not in seen:
        seen.add(key)
        pairs.append((i, j))
    return tuple(pairs)

  @property
  def flip_permutation(self) -> np.ndarray:
    """[K] int: channel k of a flipped image holds keypoint flip_permutation[k]."""
    perm = np.arange(self.num_keypoints)
    for i, j in self.flip_pairs:
      perm[i], perm[j] = j, i
    return perm

  @property
  def upper_body_ids(self) -> tuple[int, ...]:
    return tuple(i for i, u in enumerate(self.upper_body) if u)

  @property
  def lower_body_ids(self) -> tuple[int, ...]:
    return tuple(i for i, u in enumerate(self.upper_body) if not u)

  @classmethod
  def from_dict(cls, d: Mapping) -> "SkeletonInfo":
    """Builds a skeleton from a plain mapping (e.g. a ConfigDict entry)."""
    return cls(
        name=str(d["name"]),
        keypoint_names=tuple(d["keypoint_names"]),
        swap=tuple(d.get("swap", ("",) * len(d["keypoint_names"]))),
        sigmas=tuple(float(s) for s in d["sigmas"]),
        upper_body=tuple(bool(u) for u in d["upper_body"]),
        body_type=str(d.get("body_type", "biped")),
        limbs=tuple(tuple(l) for l in d.get("limbs", ())),
    )


def _limbs(names: Sequence[str], pairs: Sequence[tuple[str, str]]) -> tuple[tuple[int, int], ...]:
  index = {n: i for i, n in enumerate(names)}
  return tuple((index[a], index[b]) for a, b in pairs)


# --- Synthetic skeletons ------------------------------------------------------------------------

_COCO_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
               "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
               "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")


def _lr_swap(names: Sequence[str]) -> tuple[str, ...]:
  out = []
  for n in names:
    if n.startswith("left_"):
      out.append("right_" + n[5:])
    elif n.startswith("right_"):
      out.append("left_" + n[6:])
    else:
      out.append("")
  return tuple(out)


SYNTH_COCO = SkeletonInfo(
    name="synth_coco",
    keypoint_names=_COCO_NAMES,
    swap=_lr_swap(_COCO_NAMES),
    sigmas=(0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107,
            0.107, 0.087, 0.087, 0.089, 0.089),
    upper_body=(True,) * 11 + (False,) * 6,
    body_type="biped",
    limbs=_limbs(_COCO_NAMES, [
        ("left_ankle", "left_knee"), ("left_knee", "left_hip"), ("right_ankle", "right_knee"),
        ("right_knee", "right_hip"), ("left_hip", "right_hip"), ("left_shoulder", "left_hip"),
        ("right_shoulder", "right_hip"), ("left_shoulder", "right_shoulder"),
        ("left_shoulder", "left_elbow"), ("right_shoulder", "right_elbow"),
        ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"), ("left_eye", "right_eye"),
        ("nose", "left_eye"), ("nose", "right_eye"), ("left_eye", "left_ear"),
        ("right_eye", "right_ear")]),
)

_AIC_NAMES = ("right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
              "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee",
              "left_ankle", "head_top", "neck")

SYNTH_AIC = SkeletonInfo(
    name="synth_aic",
    keypoint_names=_AIC_NAMES,
    swap=_lr_swap(_AIC_NAMES),
    sigmas=(0.01388152, 0.01515228, 0.01057665, 0.01417709, 0.01497891, 0.01402144, 0.03909642,
            0.03686941, 0.01981803, 0.03843971, 0.03412318, 0.02415081, 0.01291456, 0.01236173),
    upper_body=(True,) * 6 + (False,) * 6 + (True, True),
    body_type="biped",
    limbs=_limbs(_AIC_NAMES, [
        ("right_wrist", "right_elbow"), ("right_elbow", "right_shoulder"),
        ("right_shoulder", "neck"), ("left_shoulder", "neck"), ("left_shoulder", "left_elbow"),
        ("left_elbow", "left_wrist"), ("right_ankle", "right_knee"), ("right_knee", "right_hip"),
        ("right_hip", "left_hip"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
        ("head_top", "neck"), ("right_shoulder", "right_hip"), ("left_shoulder", "left_hip")]),
)

_AP10K_NAMES = ("left_eye", "right_eye", "nose", "neck", "tail_root", "left_front_shoulder",
                "left_front_elbow", "left_front_paw", "right_front_shoulder", "right_front_elbow",
                "right_front_paw", "left_back_hip", "left_back_knee", "left_back_paw",
                "right_back_hip", "right_back_knee", "right_back_paw")

SYNTH_AP10K = SkeletonInfo(
    name="synth_ap10k",
    keypoint_names=_AP10K_NAMES,
    swap=_lr_swap(_AP10K_NAMES),
    sigmas=(0.025, 0.025, 0.026, 0.035, 0.035, 0.079, 0.072, 0.062, 0.079, 0.072, 0.062, 0.107,
            0.087, 0.089, 0.107, 0.087, 0.089),
    # As upstream AP-10K (spec §4.2 note): R_F_Paw is 'lower' while L_F_Paw is 'upper'.
    upper_body=(True, True, True, True, False, True, True, True, True, True, False, False, False,
                False, False, False, False),
    body_type="quadruped",
    limbs=_limbs(_AP10K_NAMES, [
        ("left_eye", "right_eye"), ("left_eye", "nose"), ("right_eye", "nose"), ("nose", "neck"),
        ("neck", "tail_root"), ("neck", "left_front_shoulder"),
        ("left_front_shoulder", "left_front_elbow"), ("left_front_elbow", "left_front_paw"),
        ("neck", "right_front_shoulder"), ("right_front_shoulder", "right_front_elbow"),
        ("right_front_elbow", "right_front_paw"), ("tail_root", "left_back_hip"),
        ("left_back_hip", "left_back_knee"), ("left_back_knee", "left_back_paw"),
        ("tail_root", "right_back_hip"), ("right_back_hip", "right_back_knee"),
        ("right_back_knee", "right_back_paw")]),
)

SYNTHETIC_SKELETONS: dict[str, SkeletonInfo] = {
    s.name: s for s in (SYNTH_COCO, SYNTH_AIC, SYNTH_AP10K)
}

# Every skeleton this package knows by name. Real dataset skeletons are added here (issue 3).
SKELETONS: dict[str, SkeletonInfo] = dict(SYNTHETIC_SKELETONS)


def get_skeleton(name: str) -> SkeletonInfo:
  """Looks a skeleton up by name, with an error that lists the known ones."""
  try:
    return SKELETONS[name]
  except KeyError:
    raise KeyError(f"unknown skeleton {name!r}; known: {sorted(SKELETONS)}") from None


@dataclasses.dataclass(frozen=True)
class SkeletonLayout:
  """How several datasets' skeletons share one padded channel space and one prototype space.

  Dataset d owns channels [0, K_d) of the padded [K_max] target and global keypoint ids
  [offsets[d], offsets[d] + K_d) of the prototype table (spec §1, `kpt_idxs`).
  """

  skeletons: tuple[SkeletonInfo, ...]

  @property
  def num_datasets(self) -> int:
    return len(self.skeletons)

  @property
  def num_keypoints(self) -> tuple[int, ...]:
    return tuple(s.num_keypoints for s in self.skeletons)

  @property
  def max_keypoints(self) -> int:
    return max(self.num_keypoints)

  @property
  def total_keypoints(self) -> int:
    return sum(self.num_keypoints)

  @property
  def offsets(self) -> tuple[int, ...]:
    return tuple(int(x) for x in np.cumsum((0,) + self.num_keypoints[:-1]))

  def skeleton_mask(self) -> np.ndarray:
    """[D, K_max] float32: 1 where channel k exists in dataset d's skeleton."""
    m = np.zeros((self.num_datasets, self.max_keypoints), np.float32)
    for d, k in enumerate(self.num_keypoints):
      m[d, :k] = 1.0
    return m

  def global_index(self) -> np.ndarray:
    """[D, K_max] int32: global keypoint id of (dataset d, channel k); 0 for padded channels."""
    g = np.zeros((self.num_datasets, self.max_keypoints), np.int32)
    for d, (o, k) in enumerate(zip(self.offsets, self.num_keypoints)):
      g[d, :k] = np.arange(o, o + k)
    return g
