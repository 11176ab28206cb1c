"""Skeleton metadata as data.

A skeleton is a named, ordered list of keypoints with left/right swap partners, OKS sigmas and
upper/lower body membership. Everything that depends on a skeleton (flip pairs, half-body ids,
OKS evaluation, drawing) is derived from a `SkeletonInfo`, so adding a dataset with a new skeleton
is a matter of adding one more `SkeletonInfo` value (or building one from a config entry with
`SkeletonInfo.from_dict`), never of changing code.

The real skeletons (`coco`, `aic`, `mpii`, `ap10k`, `apt36k`, `coco_wholebody`) transcribe the
reference's keypoint tables (spec §4.2, from mmpose's `configs/_base_/datasets/*.py`): names,
swap partners, upper/lower type, OKS sigmas and joint weights exactly as listed there.

The synthetic skeletons mirror the real ones they stand in for: `synth_coco` has COCO's 17
keypoints in COCO order, `synth_aic` AI Challenger's 14 (with head top and neck), and
`synth_ap10k` AP-10K's 17 quadruped keypoints (spec §4.2). The generator in
`data_pipelines/synthetic` renders figures whose landmarks carry exactly these names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Mapping, Sequence, Union

import numpy as np
from etils import epath

Color = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class SkeletonInfo:
  """One skeleton type.

  Attributes:
    name: unique name, e.g. "coco".
    keypoint_names: K names in channel order.
    swap: K names of the flip partner ("" for keypoints on the mirror axis). Must be symmetric.
    sigmas: K OKS sigmas (positive).
    upper_body: K booleans; keypoints not marked upper count as lower body (spec §4.4 step 3).
    body_type: what kind of body this skeleton describes ("biped" or "quadruped"); skeletons of the
      same body type can be measured on each other's images (cross-skeleton evaluation).
    limbs: pairs of keypoint indices drawn as sticks in overlays.
    joint_weights: K per-joint loss weights, or () for all 1.0. The reference never enables them
      (spec §4.1); kept so `use_different_joint_weights`-style experiments need no new table.
    keypoint_colors: K RGB triples for drawing keypoints, or () for the drawing code's default.
    limb_colors: one RGB triple per limb, or () for the drawing code's default.
  """

  name: str
  keypoint_names: tuple[str, ...]
  swap: tuple[str, ...]
  sigmas: tuple[float, ...]
  upper_body: tuple[bool, ...]
  body_type: str = "biped"
  limbs: tuple[tuple[int, int], ...] = ()
  joint_weights: tuple[float, ...] = ()
  keypoint_colors: tuple[Color, ...] = ()
  limb_colors: tuple[Color, ...] = ()

  def __post_init__(self):
    k = len(self.keypoint_names)
    for field in ("swap", "sigmas", "upper_body"):
      if len(getattr(self, field)) != k:
        raise ValueError(
            f"skeleton {self.name!r}: {field} has {len(getattr(self, field))} entries, "
            f"expected {k} (one per keypoint)")
    # Optional per-keypoint / per-limb fields: empty means "not given", anything else must match.
    for field, n, what in (("joint_weights", k, "keypoint"), ("keypoint_colors", k, "keypoint"),
                           ("limb_colors", len(self.limbs), "limb")):
      got = len(getattr(self, field))
      if got not in (0, n):
        raise ValueError(
            f"skeleton {self.name!r}: {field} has {got} entries, expected {n} (one per {what}) "
            f"or none")
    if len(set(self.keypoint_names)) != k:
      dups = sorted({n for n in self.keypoint_names if self.keypoint_names.count(n) > 1})
      raise ValueError(f"skeleton {self.name!r}: duplicate keypoint names {dups}")
    partner_of = dict(zip(self.keypoint_names, self.swap))
    for kp, partner in partner_of.items():
      if partner and partner not in partner_of:
        raise ValueError(f"skeleton {self.name!r}: swap partner {partner!r} of {kp!r} is unknown")
    for kp, partner in partner_of.items():
      if not partner:
        continue
      # An asymmetric swap would make `flip_pairs` depend on keypoint order and flipping twice
      # would not be the identity.
      if partner == kp or partner_of[partner] != kp:
        raise ValueError(
            f"skeleton {self.name!r}: swap is not symmetric: {kp!r} -> {partner!r} but "
            f"{partner!r} -> {partner_of[partner]!r}")
    # OKS divides by sigma², so a zero sigma is a division by zero at evaluation time.
    if not all(math.isfinite(s) and s > 0 for s in self.sigmas):
      raise ValueError(f"skeleton {self.name!r}: sigmas must be positive and finite")
    if not all(math.isfinite(w) and w >= 0 for w in self.joint_weights):
      raise ValueError(f"skeleton {self.name!r}: joint_weights must be non-negative and finite")
    for a, b in self.limbs:
      if not (0 <= a < k and 0 <= b < k):
        raise ValueError(f"skeleton {self.name!r}: limb ({a}, {b}) out of range")
    for field in ("keypoint_colors", "limb_colors"):
      for c in getattr(self, field):
        if len(c) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in c):
          raise ValueError(f"skeleton {self.name!r}: {field} entry {c!r} is not an RGB triple "
                           f"of ints in [0, 255]")

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

  @property
  def joint_weights_array(self) -> np.ndarray:
    """[K] float32 joint weights; all ones when the skeleton gives none."""
    if not self.joint_weights:
      return np.ones(self.num_keypoints, np.float32)
    return np.asarray(self.joint_weights, np.float32)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SkeletonInfo":
    """Builds a skeleton from a plain mapping (e.g. a ConfigDict entry).

    Keys (unknown keys are an error, so a misspelt one does not silently fall back to a default):
      name, keypoint_names, sigmas: required.
      swap: K partner names, or flip_pairs: index pairs [[i, j], ...] (at most one of the two;
        neither means no keypoint has a partner).
      upper_body: K booleans, or upper_body_ids: indices of upper-body keypoints (exactly one).
      body_type, joint_weights, keypoint_colors: optional, as the attributes.
      limbs: optional pairs of keypoint indices or of keypoint names.
      limb_colors: optional, one RGB triple per limb.

    Raises:
      ValueError: naming the skeleton, for missing, unknown, conflicting or inconsistent fields.
    """
    keys = set(d.keys())
    name = str(d["name"]) if "name" in keys else None
    if name is None:
      raise ValueError(f"skeleton config without 'name' (keys: {sorted(keys)})")
    unknown = keys - _FROM_DICT_KEYS
    if unknown:
      raise ValueError(f"skeleton {name!r}: unknown keys {sorted(unknown)}; "
                       f"known: {sorted(_FROM_DICT_KEYS)}")
    missing = {"keypoint_names", "sigmas"} - keys
    if missing:
      raise ValueError(f"skeleton {name!r}: missing keys {sorted(missing)}")
    names = tuple(str(n) for n in d["keypoint_names"])
    k = len(names)

    if "swap" in keys and "flip_pairs" in keys:
      raise ValueError(f"skeleton {name!r}: give either swap or flip_pairs, not both")
    if "flip_pairs" in keys:
      swap = swap_from_flip_pairs(name, names, d["flip_pairs"])
    else:
      swap = tuple(str(s) for s in d.get("swap", ("",) * k))

    if ("upper_body" in keys) == ("upper_body_ids" in keys):
      raise ValueError(f"skeleton {name!r}: give exactly one of upper_body or upper_body_ids")
    if "upper_body" in keys:
      upper = tuple(bool(u) for u in d["upper_body"])
    else:
      ids = [int(i) for i in d["upper_body_ids"]]
      bad = [i for i in ids if not 0 <= i < k]
      if bad or len(set(ids)) != len(ids):
        raise ValueError(f"skeleton {name!r}: upper_body_ids {ids} must be distinct indices in "
                         f"[0, {k})")
      upper = tuple(i in set(ids) for i in range(k))

    return cls(
        name=name,
        keypoint_names=names,
        swap=swap,
        sigmas=tuple(float(s) for s in d["sigmas"]),
        upper_body=upper,
        body_type=str(d.get("body_type", "biped")),
        limbs=_limb_indices(name, names, d.get("limbs", ())),
        joint_weights=tuple(float(w) for w in d.get("joint_weights", ())),
        keypoint_colors=tuple(tuple(int(v) for v in c) for c in d.get("keypoint_colors", ())),
        limb_colors=tuple(tuple(int(v) for v in c) for c in d.get("limb_colors", ())),
    )


_FROM_DICT_KEYS = frozenset({
    "name", "keypoint_names", "swap", "flip_pairs", "sigmas", "upper_body", "upper_body_ids",
    "body_type", "limbs", "joint_weights", "keypoint_colors", "limb_colors"})


def swap_from_flip_pairs(name: str, keypoint_names: Sequence[str],
                         flip_pairs: Sequence[Sequence[int]]) -> tuple[str, ...]:
  """Turns index flip pairs into per-keypoint swap partner names.

  Args:
    name: skeleton name, for error messages.
    keypoint_names: the K keypoint names.
    flip_pairs: pairs (i, j) of keypoint indices that trade places under a horizontal flip.

  Returns:
    K partner names ("" for keypoints in no pair).

  Raises:
    ValueError: for a pair that is not a pair, out of range, or pairs a keypoint with itself, and
      for a keypoint that appears in more than one pair.
  """
  k = len(keypoint_names)
  swap = [""] * k
  for pair in flip_pairs:
    if len(pair) != 2:
      raise ValueError(f"skeleton {name!r}: flip pair {list(pair)} is not a pair")
    i, j = int(pair[0]), int(pair[1])
    if not (0 <= i < k and 0 <= j < k):
      raise ValueError(f"skeleton {name!r}: flip pair ({i}, {j}) out of range for {k} keypoints")
    if i == j:
      raise ValueError(f"skeleton {name!r}: flip pair ({i}, {j}) pairs a keypoint with itself")
    for x in (i, j):
      if swap[x]:
        raise ValueError(f"skeleton {name!r}: keypoint {x} ({keypoint_names[x]!r}) is in more "
                         f"than one flip pair")
    swap[i], swap[j] = keypoint_names[j], keypoint_names[i]
  return tuple(swap)


def _limb_indices(name: str, keypoint_names: Sequence[str],
                  limbs: Sequence[Sequence[int | str]]) -> tuple[tuple[int, int], ...]:
  """Limbs given as index pairs or name pairs (mmpose's `skeleton_info` style) → index pairs."""
  index = {n: i for i, n in enumerate(keypoint_names)}
  out = []
  for limb in limbs:
    if len(limb) != 2:
      raise ValueError(f"skeleton {name!r}: limb {list(limb)} is not a pair")
    ends = []
    for end in limb:
      if isinstance(end, str):
        if end not in index:
          raise ValueError(f"skeleton {name!r}: limb {list(limb)} names unknown keypoint {end!r}")
        ends.append(index[end])
      else:
        ends.append(int(end))
    out.append((ends[0], ends[1]))
  return tuple(out)


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


def _side_palette(names: Sequence[str], limbs: Sequence[tuple[int, int]], left: Color,
                  right: Color, middle: Color) -> dict[str, tuple[Color, ...]]:
  """keypoint_colors and limb_colors: left/right/mirror-axis keypoints in three colours, a limb
  in its side's colour when both ends are on that side, else the middle colour."""
  def side(n: str) -> Color:
    return left if n.startswith("left_") else right if n.startswith("right_") else middle
  kp = tuple(side(n) for n in names)
  limb = tuple(kp[i] if kp[i] == kp[j] else middle for i, j in limbs)
  return dict(keypoint_colors=kp, limb_colors=limb)


# Each synthetic skeleton has its own palette, so that overlays of several skeletons predicted on
# one image tell them apart: COCO-like in mmpose's green/orange/blue, AIC-like magenta/cyan/
# yellow, the quadruped red/violet/white.
_SYNTH_PALETTES: dict[str, tuple[Color, Color, Color]] = {
    "synth_coco": ((0, 255, 0), (255, 128, 0), (51, 153, 255)),
    "synth_aic": ((255, 0, 255), (0, 255, 255), (255, 255, 0)),
    "synth_ap10k": ((255, 64, 64), (160, 96, 255), (255, 255, 255)),
}


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
_AIC_SIGMAS = (0.01388152, 0.01515228, 0.01057665, 0.01417709, 0.01497891, 0.01402144, 0.03909642,
               0.03686941, 0.01981803, 0.03843971, 0.03412318, 0.02415081, 0.01291456,
               0.01236173)

SYNTH_AIC = SkeletonInfo(
    name="synth_aic",
    keypoint_names=_AIC_NAMES,
    swap=_lr_swap(_AIC_NAMES),
    sigmas=_AIC_SIGMAS,
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

SYNTH_COCO, SYNTH_AIC, SYNTH_AP10K = (
    dataclasses.replace(s, **_side_palette(s.keypoint_names, s.limbs, *_SYNTH_PALETTES[s.name]))
    for s in (SYNTH_COCO, SYNTH_AIC, SYNTH_AP10K))

SYNTHETIC_SKELETONS: dict[str, SkeletonInfo] = {
    s.name: s for s in (SYNTH_COCO, SYNTH_AIC, SYNTH_AP10K)
}

# --- Real dataset skeletons (spec §4.2) ---------------------------------------------------------
#
# Limbs and colours are mmpose's standard `skeleton_info` links and `color` entries from
# `configs/_base_/datasets/{coco,aic,mpii,ap10k,coco_wholebody}.py`, in mmpose's order; the spec
# lists neither (PoseBH's `*_info.py` variants differ from these only in colours, spec §4.2). The
# triples are copied as mmpose writes them and read here as RGB.

_BLUE: Color = (51, 153, 255)
_GREEN: Color = (0, 255, 0)
_ORANGE: Color = (255, 128, 0)


def _links(names: Sequence[str], links: Sequence[tuple[str, str, Color]]
          ) -> tuple[tuple[tuple[int, int], ...], tuple[Color, ...]]:
  """(name, name, colour) triples → (limbs, limb_colors)."""
  return _limbs(names, [(a, b) for a, b, _ in links]), tuple(c for _, _, c in links)


def _side_colors(names: Sequence[str]) -> tuple[Color, ...]:
  """mmpose's human colouring: left green, right orange, keypoints on the mirror axis blue."""
  return tuple(_GREEN if n.startswith("left_") else _ORANGE if n.startswith("right_") else _BLUE
               for n in names)


# COCO (dataset_idx 0).
_COCO_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
                0.107, 0.107, 0.087, 0.087, 0.089, 0.089)
_COCO_LIMBS, _COCO_LIMB_COLORS = _links(_COCO_NAMES, [
    ("left_ankle", "left_knee", _GREEN), ("left_knee", "left_hip", _GREEN),
    ("right_ankle", "right_knee", _ORANGE), ("right_knee", "right_hip", _ORANGE),
    ("left_hip", "right_hip", _BLUE), ("left_shoulder", "left_hip", _BLUE),
    ("right_shoulder", "right_hip", _BLUE), ("left_shoulder", "right_shoulder", _BLUE),
    ("left_shoulder", "left_elbow", _GREEN), ("right_shoulder", "right_elbow", _ORANGE),
    ("left_elbow", "left_wrist", _GREEN), ("right_elbow", "right_wrist", _ORANGE),
    ("left_eye", "right_eye", _BLUE), ("nose", "left_eye", _BLUE), ("nose", "right_eye", _BLUE),
    ("left_eye", "left_ear", _BLUE), ("right_eye", "right_ear", _BLUE),
    ("left_ear", "left_shoulder", _BLUE), ("right_ear", "right_shoulder", _BLUE)])
# Face keypoints (eyes, ears) are blue in mmpose's COCO, not coloured by side.
_COCO_KEYPOINT_COLORS = (_BLUE,) * 5 + (_GREEN, _ORANGE) * 6

COCO = SkeletonInfo(
    name="coco",
    keypoint_names=_COCO_NAMES,
    swap=_lr_swap(_COCO_NAMES),
    sigmas=_COCO_SIGMAS,
    upper_body=(True,) * 11 + (False,) * 6,
    body_type="biped",
    limbs=_COCO_LIMBS,
    joint_weights=(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5, 1.0, 1.0, 1.2, 1.2, 1.5,
                   1.5),
    keypoint_colors=_COCO_KEYPOINT_COLORS,
    limb_colors=_COCO_LIMB_COLORS,
)

# AI Challenger (dataset_idx 1): same names and order as `synth_aic`.
_AIC_LIMBS, _AIC_LIMB_COLORS = _links(_AIC_NAMES, [
    ("right_wrist", "right_elbow", _ORANGE), ("right_elbow", "right_shoulder", _ORANGE),
    ("right_shoulder", "neck", _BLUE), ("neck", "left_shoulder", _BLUE),
    ("left_shoulder", "left_elbow", _GREEN), ("left_elbow", "left_wrist", _GREEN),
    ("right_ankle", "right_knee", _ORANGE), ("right_knee", "right_hip", _ORANGE),
    ("right_hip", "left_hip", _BLUE), ("left_hip", "left_knee", _GREEN),
    ("left_knee", "left_ankle", _GREEN), ("head_top", "neck", _BLUE),
    ("right_shoulder", "right_hip", _BLUE), ("left_shoulder", "left_hip", _BLUE)])

AIC = SkeletonInfo(
    name="aic",
    keypoint_names=_AIC_NAMES,
    swap=_lr_swap(_AIC_NAMES),
    sigmas=_AIC_SIGMAS,
    upper_body=(True,) * 6 + (False,) * 6 + (True, True),
    body_type="biped",
    limbs=_AIC_LIMBS,
    joint_weights=(1.0, 1.2, 1.5, 1.0, 1.2, 1.5, 1.0, 1.2, 1.5, 1.0, 1.2, 1.5, 1.0, 1.0),
    keypoint_colors=_side_colors(_AIC_NAMES),
    limb_colors=_AIC_LIMB_COLORS,
)

# MPII (dataset_idx 2).
_MPII_NAMES = ("right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
               "pelvis", "thorax", "upper_neck", "head_top", "right_wrist", "right_elbow",
               "right_shoulder", "left_shoulder", "left_elbow", "left_wrist")
_MPII_LIMBS, _MPII_LIMB_COLORS = _links(_MPII_NAMES, [
    ("right_ankle", "right_knee", _ORANGE), ("right_knee", "right_hip", _ORANGE),
    ("right_hip", "pelvis", _ORANGE), ("pelvis", "left_hip", _GREEN),
    ("left_hip", "left_knee", _GREEN), ("left_knee", "left_ankle", _GREEN),
    ("pelvis", "thorax", _BLUE), ("thorax", "upper_neck", _BLUE),
    ("upper_neck", "head_top", _BLUE), ("upper_neck", "right_shoulder", _ORANGE),
    ("right_shoulder", "right_elbow", _ORANGE), ("right_elbow", "right_wrist", _ORANGE),
    ("upper_neck", "left_shoulder", _GREEN), ("left_shoulder", "left_elbow", _GREEN),
    ("left_elbow", "left_wrist", _GREEN)])

MPII = SkeletonInfo(
    name="mpii",
    keypoint_names=_MPII_NAMES,
    swap=_lr_swap(_MPII_NAMES),
    # "Adapted from COCO" upstream; the shoulders' 0.179 is not COCO's 0.079 but is what the
    # reference uses, so it is kept.
    sigmas=(0.089, 0.083, 0.107, 0.107, 0.083, 0.089, 0.026, 0.026, 0.026, 0.026, 0.062, 0.072,
            0.179, 0.179, 0.072, 0.062),
    # Pelvis is 'lower', thorax/neck/head 'upper'.
    upper_body=(False,) * 7 + (True,) * 9,
    body_type="biped",
    limbs=_MPII_LIMBS,
    joint_weights=(1.5, 1.2, 1.0, 1.0, 1.2, 1.5, 1.0, 1.0, 1.0, 1.0, 1.5, 1.2, 1.0, 1.0, 1.2, 1.5),
    keypoint_colors=_side_colors(_MPII_NAMES),
    limb_colors=_MPII_LIMB_COLORS,
)

# AP-10K (dataset_idx 3) and APT-36K (dataset_idx 4, same definition). Names are mmpose's, which
# differ from `synth_ap10k`'s lower-case ones.
_AP10K_REAL_NAMES = ("L_Eye", "R_Eye", "Nose", "Neck", "Root of tail", "L_Shoulder", "L_Elbow",
                     "L_F_Paw", "R_Shoulder", "R_Elbow", "R_F_Paw", "L_Hip", "L_Knee", "L_B_Paw",
                     "R_Hip", "R_Knee", "R_B_Paw")
_AP10K_SWAP = ("R_Eye", "L_Eye", "", "", "", "R_Shoulder", "R_Elbow", "R_F_Paw", "L_Shoulder",
               "L_Elbow", "L_F_Paw", "R_Hip", "R_Knee", "R_B_Paw", "L_Hip", "L_Knee", "L_B_Paw")
_AP10K_LIMBS, _AP10K_LIMB_COLORS = _links(_AP10K_REAL_NAMES, [
    ("L_Eye", "R_Eye", (0, 0, 255)), ("L_Eye", "Nose", (0, 0, 255)),
    ("R_Eye", "Nose", (0, 0, 255)), ("Nose", "Neck", (0, 255, 0)),
    ("Neck", "Root of tail", (0, 255, 0)), ("Neck", "L_Shoulder", (255, 102, 0)),
    ("L_Shoulder", "L_Elbow", (255, 102, 0)), ("L_Elbow", "L_F_Paw", (255, 102, 0)),
    ("Neck", "R_Shoulder", (6, 156, 250)), ("R_Shoulder", "R_Elbow", (6, 156, 250)),
    ("R_Elbow", "R_F_Paw", (6, 156, 250)), ("Root of tail", "L_Hip", (255, 102, 0)),
    ("L_Hip", "L_Knee", (255, 102, 0)), ("L_Knee", "L_B_Paw", (255, 102, 0)),
    ("Root of tail", "R_Hip", (6, 156, 250)), ("R_Hip", "R_Knee", (6, 156, 250)),
    ("R_Knee", "R_B_Paw", (6, 156, 250))])

AP10K = SkeletonInfo(
    name="ap10k",
    keypoint_names=_AP10K_REAL_NAMES,
    swap=_AP10K_SWAP,
    sigmas=(0.025, 0.025, 0.026, 0.035, 0.035, 0.079, 0.072, 0.062, 0.079, 0.072, 0.062, 0.107,
            0.087, 0.089, 0.107, 0.087, 0.089),
    # As upstream (spec §4.2 note): R_F_Paw is 'lower' while L_F_Paw is 'upper'; kept so half-body
    # crops match the reference.
    upper_body=(True, True, True, True, False, True, True, True, True, True, False, False, False,
                False, False, False, False),
    body_type="quadruped",
    limbs=_AP10K_LIMBS,
    # Index-copied from COCO upstream (they do not follow the animal's anatomy); kept as is.
    joint_weights=(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5, 1.0, 1.0, 1.2, 1.2, 1.5,
                   1.5),
    # mmpose's AP-10K colours do not follow the sides either; copied as they are.
    keypoint_colors=(_GREEN, _ORANGE, _BLUE, _BLUE, _BLUE, _BLUE, _BLUE, _GREEN, _GREEN, _ORANGE,
                     _GREEN, _ORANGE, _ORANGE, _GREEN, _GREEN, _GREEN, _GREEN),
    limb_colors=_AP10K_LIMB_COLORS,
)

APT36K = dataclasses.replace(AP10K, name="apt36k")

# COCO-WholeBody (dataset_idx 5): body 17 (COCO) + feet 6 + face 68 + left hand 21 + right hand 21.
_WB_FEET = ("left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe",
            "right_heel")
_WB_FACE = tuple(f"face-{i}" for i in range(68))
_WB_FINGERS = ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")


def _wb_hand(side: str) -> tuple[str, ...]:
  return (f"{side}_hand_root",) + tuple(f"{side}_{f}{j}" for f in _WB_FINGERS for j in range(1, 5))


_WB_NAMES = _COCO_NAMES + _WB_FEET + _WB_FACE + _wb_hand("left") + _wb_hand("right")

# Mirror partners among the 68 face landmarks (iBUG 300-W numbering, as mmpose's swap names);
# landmarks 8, 27-30, 33, 51, 57, 62, 66 lie on the mirror axis.
_WB_FACE_MIRROR = (
    (0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9),  # jaw line
    (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),  # eyebrows
    (31, 35), (32, 34),  # nostrils
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),  # eyes
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),  # outer lips
    (60, 64), (61, 63), (65, 67))  # inner lips


def _wb_swap() -> tuple[str, ...]:
  swap = dict(zip(_WB_NAMES, _lr_swap(_WB_NAMES)))
  for a, b in _WB_FACE_MIRROR:
    swap[f"face-{a}"], swap[f"face-{b}"] = f"face-{b}", f"face-{a}"
  return tuple(swap[n] for n in _WB_NAMES)


# From the COCO-WholeBody evaluation code (`myeval_wholebody.py`), via mmpose.
_WB_FOOT_SIGMAS = (0.068, 0.066, 0.066, 0.092, 0.094, 0.094)
_WB_FACE_SIGMAS = (
    0.042, 0.043, 0.044, 0.043, 0.040, 0.035, 0.031, 0.025, 0.020, 0.023, 0.029, 0.032, 0.037,
    0.038, 0.043, 0.041, 0.045, 0.013, 0.012, 0.011, 0.011, 0.012, 0.012, 0.011, 0.011, 0.013,
    0.015, 0.009, 0.007, 0.007, 0.007, 0.012, 0.009, 0.008, 0.016, 0.010, 0.017, 0.011, 0.009,
    0.011, 0.009, 0.007, 0.013, 0.008, 0.011, 0.012, 0.010, 0.034, 0.008, 0.008, 0.009, 0.008,
    0.008, 0.007, 0.010, 0.008, 0.009, 0.009, 0.009, 0.007, 0.007, 0.008, 0.011, 0.008, 0.008,
    0.008, 0.010, 0.008)
# The right hand uses the same list as the left.
_WB_HAND_SIGMAS = (0.029, 0.022, 0.035, 0.037, 0.047, 0.026, 0.025, 0.024, 0.035, 0.018, 0.024,
                   0.022, 0.026, 0.017, 0.021, 0.021, 0.032, 0.020, 0.019, 0.022, 0.031)

_WB_FINGER_COLORS = dict(zip(_WB_FINGERS, ((255, 128, 0), (255, 153, 255), (102, 178, 255),
                                           (255, 51, 51), (0, 255, 0))))
_WB_FACE_COLOR: Color = (196, 193, 68)


def _wb_hand_links(side: str) -> list[tuple[str, str, Color]]:
  links = []
  for f in _WB_FINGERS:
    chain = [f"{side}_hand_root"] + [f"{side}_{f}{j}" for j in range(1, 5)]
    links += [(a, b, _WB_FINGER_COLORS[f]) for a, b in zip(chain[:-1], chain[1:])]
  return links


_WB_HAND_COLORS = (_WB_FACE_COLOR,) + tuple(_WB_FINGER_COLORS[f] for f in _WB_FINGERS
                                            for _ in range(4))
# mmpose draws no face links; feet hang off the ankles, fingers off the hand root.
_WB_LIMBS, _WB_LIMB_COLORS = _links(_WB_NAMES, [
    (_COCO_NAMES[a], _COCO_NAMES[b], c) for (a, b), c in zip(_COCO_LIMBS, _COCO_LIMB_COLORS)] + [
        ("left_ankle", "left_big_toe", _GREEN), ("left_ankle", "left_small_toe", _GREEN),
        ("left_ankle", "left_heel", _GREEN), ("right_ankle", "right_big_toe", _ORANGE),
        ("right_ankle", "right_small_toe", _ORANGE), ("right_ankle", "right_heel", _ORANGE)] +
    _wb_hand_links("left") + _wb_hand_links("right"))

COCO_WHOLEBODY = SkeletonInfo(
    name="coco_wholebody",
    keypoint_names=_WB_NAMES,
    swap=_wb_swap(),
    sigmas=_COCO_SIGMAS + _WB_FOOT_SIGMAS + _WB_FACE_SIGMAS + _WB_HAND_SIGMAS * 2,
    # Body as COCO, feet 'lower'; face and hands have no type upstream, so the half-body transform
    # counts them as lower body (spec §4.2, §6.16).
    upper_body=(True,) * 11 + (False,) * (133 - 11),
    body_type="biped",
    limbs=_WB_LIMBS,
    joint_weights=(1.0,) * 133,
    # mmpose colours every WholeBody foot keypoint orange, left or right.
    keypoint_colors=(_COCO_KEYPOINT_COLORS + (_ORANGE,) * 6 + (_WB_FACE_COLOR,) * 68 +
                     _WB_HAND_COLORS * 2),
    limb_colors=_WB_LIMB_COLORS,
)

# --- Transfer skeletons (the paper's "beyond" datasets) ------------------------------------------

# InterHand2.6M, one hand (the reference's configs/_base_/datasets/interhand2d_info.py): per
# finger tip (4) to base (1), then the wrist; no swap partners (one hand per crop, flip-free).
_IH_FINGERS = ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")
_IH_NAMES = tuple(f"{f}{j}" for f in _IH_FINGERS for j in (4, 3, 2, 1)) + ("wrist",)
# The reference lists no sigmas (InterHand is scored by PCK/AUC/EPE, never OKS). SkeletonInfo
# needs positive ones: COCO-WholeBody's hand sigmas (wrist, then each finger base to tip),
# reordered to this keypoint order; they are only used if someone asks for OKS on hands.
_IH_SIGMAS = tuple(_WB_HAND_SIGMAS[1 + 4 * f + (j - 1)] for f in range(5) for j in (4, 3, 2, 1)
                   ) + (_WB_HAND_SIGMAS[0],)
INTERHAND2D = SkeletonInfo(
    name="interhand2d",
    keypoint_names=_IH_NAMES,
    swap=("",) * 21,
    sigmas=_IH_SIGMAS,
    upper_body=(True,) * 21,
    body_type="hand",
    limbs=_limbs(_IH_NAMES, [p for f in _IH_FINGERS for p in (
        ("wrist", f"{f}1"), (f"{f}1", f"{f}2"), (f"{f}2", f"{f}3"), (f"{f}3", f"{f}4"))]),
    joint_weights=(1.0,) * 21,
    keypoint_colors=tuple(_WB_FINGER_COLORS[f] for f in _IH_FINGERS for _ in range(4)) +
    ((255, 255, 255),),
    limb_colors=tuple(_WB_FINGER_COLORS[f] for f in _IH_FINGERS for _ in range(4)),
)

# 3DPW's 24 SMPL joints (the reference's configs/_base_/datasets/pw3d_info.py).
_PW3D_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "jaw", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_thumb", "right_thumb")
_PW3D_LOWER = {"pelvis", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
               "right_ankle", "left_foot", "right_foot"}
_PW3D_LINKS = (
    ("left_ankle", "left_knee"), ("left_knee", "left_hip"), ("right_ankle", "right_knee"),
    ("right_knee", "right_hip"), ("left_hip", "pelvis"), ("right_hip", "pelvis"),
    ("pelvis", "spine1"), ("spine1", "spine2"), ("spine2", "spine3"), ("spine3", "neck"),
    ("neck", "jaw"), ("neck", "left_shoulder"), ("neck", "right_shoulder"),
    ("left_shoulder", "left_elbow"), ("right_shoulder", "right_elbow"),
    ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"), ("left_wrist", "left_thumb"),
    ("right_wrist", "right_thumb"), ("left_ankle", "left_foot"), ("right_ankle", "right_foot"),
    ("left_shoulder", "left_collar"), ("right_shoulder", "right_collar"))


def _pw3d_color(name: str) -> Color:
  return _GREEN if name.startswith("left") else _ORANGE if name.startswith("right") else _BLUE


PW3D = SkeletonInfo(
    name="pw3d",
    keypoint_names=_PW3D_NAMES,
    swap=_lr_swap(_PW3D_NAMES),
    sigmas=(0.107, 0.107, 0.107, 0.107, 0.087, 0.087, 0.107, 0.089, 0.089, 0.107, 0.089, 0.089,
            0.079, 0.079, 0.079, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.062, 0.062),
    upper_body=tuple(n not in _PW3D_LOWER for n in _PW3D_NAMES),
    body_type="biped",
    limbs=_limbs(_PW3D_NAMES, _PW3D_LINKS),
    joint_weights=(1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.0, 1.5, 1.5, 1.0, 1.5, 1.5, 1.0, 1.0, 1.0,
                   1.0, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5, 1.5, 1.5),
    keypoint_colors=tuple(_pw3d_color(n) for n in _PW3D_NAMES),
    limb_colors=tuple(_GREEN if a.startswith("left") else _ORANGE if a.startswith("right")
                      else _BLUE for a, _ in _PW3D_LINKS),
)

# Skeletons of the paper's transfer experiments (new datasets with their own heads).
TRANSFER_SKELETONS: dict[str, SkeletonInfo] = {s.name: s for s in (INTERHAND2D, PW3D)}

# The reference's six training skeletons, in dataset_idx order (spec §1).
REAL_SKELETONS: dict[str, SkeletonInfo] = {
    s.name: s for s in (COCO, AIC, MPII, AP10K, APT36K, COCO_WHOLEBODY)
}

# Every skeleton this package knows by name.
SKELETONS: dict[str, SkeletonInfo] = {**SYNTHETIC_SKELETONS, **REAL_SKELETONS,
                                      **TRANSFER_SKELETONS}


def get_skeleton(name: str) -> SkeletonInfo:
  """Looks a skeleton up by name, with an error that lists the known ones."""
  try:
    return SKELETONS[name]
  except KeyError:
    raise KeyError(f"unknown skeleton {name!r}; known: {sorted(SKELETONS)}") from None


SkeletonSpec = Union[str, Mapping[str, Any], SkeletonInfo]


def resolve_skeleton(spec: SkeletonSpec, *, default_name: str | None = None) -> SkeletonInfo:
  """A dataset entry's `skeleton` field → its `SkeletonInfo`.

  The one resolver behind every use of a config's skeleton (layout, config checks, TFDS builds,
  evaluation, inference), so a new skeleton is declared once, in the config, and no package
  table needs editing.

  Args:
    spec: one of
      * a known name (`SKELETONS`: "coco", "synth_aic", ...);
      * a mapping (dict or `ml_collections.ConfigDict`) of `SkeletonInfo.from_dict` keys;
      * a path, local or gs:// (read with `etils.epath`), to a JSON file holding such a mapping;
        a string is taken as a path when it ends in ".json" or contains "/";
      * a `SkeletonInfo` (returned as is).
    default_name: the skeleton's name when a mapping or file gives none (the dataset's name).

  Raises:
    ValueError: an unknown name, an unreadable file, or fields `from_dict` rejects; the message
      names the skeleton (and the file).
  """
  if isinstance(spec, SkeletonInfo):
    return spec
  if isinstance(spec, str):
    if spec in SKELETONS:
      return SKELETONS[spec]
    if not (spec.endswith(".json") or "/" in spec):
      raise ValueError(f"unknown skeleton {spec!r}: not a known name ({sorted(SKELETONS)}), "
                       f"a mapping of SkeletonInfo.from_dict keys, or a .json file")
    return _skeleton_file(spec, default_name)
  if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict.
    spec = spec.to_dict()
  if not isinstance(spec, Mapping):
    raise ValueError(f"skeleton must be a name, a mapping or a .json path, not "
                     f"{type(spec).__name__}")
  return _from_mapping(spec, default_name)


def _from_mapping(d: Mapping[str, Any], default_name: str | None) -> SkeletonInfo:
  d = dict(d)
  if "name" not in d and default_name is not None:
    d["name"] = default_name
  return SkeletonInfo.from_dict(d)


@functools.lru_cache(maxsize=64)
def _skeleton_file(path: str, default_name: str | None) -> SkeletonInfo:
  """A JSON skeleton file (cached: every call site resolves the same entry)."""
  try:
    d = json.loads(epath.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"skeleton file {path}: cannot read it as JSON ({e})") from None
  if not isinstance(d, Mapping):
    raise ValueError(f"skeleton file {path}: expected a JSON object of SkeletonInfo.from_dict "
                     f"keys, got {type(d).__name__}")
  try:
    return _from_mapping(d, default_name)
  except ValueError as e:
    raise ValueError(f"skeleton file {path}: {e}") from None


def skeleton_to_dict(skeleton: SkeletonInfo) -> dict[str, Any]:
  """A JSON-serialisable mapping that `SkeletonInfo.from_dict` turns back into `skeleton`."""
  return dict(
      name=skeleton.name, keypoint_names=list(skeleton.keypoint_names), swap=list(skeleton.swap),
      sigmas=list(skeleton.sigmas), upper_body=list(skeleton.upper_body),
      body_type=skeleton.body_type, limbs=[list(l) for l in skeleton.limbs],
      joint_weights=list(skeleton.joint_weights),
      keypoint_colors=[list(c) for c in skeleton.keypoint_colors],
      limb_colors=[list(c) for c in skeleton.limb_colors])


def keypoint_offsets(num_keypoints: Sequence[int]) -> tuple[int, ...]:
  """Global id of each dataset's first keypoint in the shared prototype space (spec §1)."""
  return tuple(int(x) for x in np.cumsum((0,) + tuple(num_keypoints)[:-1]))


def global_index_table(num_keypoints: Sequence[int]) -> np.ndarray:
  """[D, K_max] int32: global keypoint id of (dataset d, channel k); 0 for padded channels."""
  g = np.zeros((len(num_keypoints), max(num_keypoints)), np.int32)
  for d, (o, k) in enumerate(zip(keypoint_offsets(num_keypoints), num_keypoints)):
    g[d, :k] = np.arange(o, o + k)
  return g


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
    return keypoint_offsets(self.num_keypoints)

  def skeleton_mask(self) -> np.ndarray:
    """[D, K_max] float32: 1 where channel k exists in dataset d's skeleton."""
    m = np.zeros((self.num_datasets, self.max_keypoints), np.float32)
    for d, k in enumerate(self.num_keypoints):
      m[d, :k] = 1.0
    return m

  def global_index(self) -> np.ndarray:
    """[D, K_max] int32: global keypoint id of (dataset d, channel k); 0 for padded channels."""
    return global_index_table(self.num_keypoints)
