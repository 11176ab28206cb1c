"""Procedural rendering of one stick-figure biped or quadruped on a textured background.

A figure is built in a canonical frame (y down, unit ≈ standing height for a biped and body
length for a quadruped) as a dict of named landmarks plus a list of drawing primitives in paint
order. It is then rotated, scaled and translated into the image by one similarity transform, so
landmarks and strokes can never disagree. Every keypoint name of the synthetic skeletons
(`data_pipelines.skeletons`) is an explicit landmark: a joint centre, a feature on the head, or
the point where two parts meet.

Conventions:
  * Coordinates are pixel centres: (x, y) = (column, row); OpenCV draws at the same convention
    when points are passed with sub-pixel `shift`.
  * Left/right are the figure's own sides. Bipeds always face the viewer, so their left side is
    on the image right (before rotation). Limbs, ears and eye rims of the left side are a darker
    shade of their colour and those of the right side a lighter one: the figure is otherwise
    mirror symmetric, and without this cue a small model confuses the sides for a long time.
    Under horizontal-flip augmentation the shade stays with the pixels while the labels swap, so
    it is then only consistent together with the geometry (which side the dark shoulder is on).
  * Images are uint8 [H, W, 3] in OpenCV (BGR) channel order.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

BIPED = "biped"
QUADRUPED = "quadruped"

_SHIFT = 4  # Sub-pixel bits for OpenCV drawing.
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

# Landmarks each body type renders (the union of the synthetic skeletons of that body type).
BIPED_LANDMARKS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle", "head_top", "neck")
QUADRUPED_LANDMARKS = (
    "left_eye", "right_eye", "nose", "neck", "tail_root", "left_front_shoulder",
    "left_front_elbow", "left_front_paw", "right_front_shoulder", "right_front_elbow",
    "right_front_paw", "left_back_hip", "left_back_knee", "left_back_paw", "right_back_hip",
    "right_back_knee", "right_back_paw")

Color = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Style:
  """A dataset's look: what makes two synthetic datasets different domains (issue 18).

  Every field changes how random draws are used, never how many are drawn, so the default style
  renders exactly the images of the unstyled renderer.

  Attributes:
    name: for messages and the manifest.
    palette_lo, palette_hi: BGR range that random clothing/fur/accent colours are mapped into
      (affine per channel; (0, 0, 0)–(255, 255, 255) is the identity).
    backgrounds: background kinds allowed (0 gradient, 1 colour noise, 2 stripes, 3 flat); the
      kind drawn is taken modulo this list.
    background_gain, background_offset: the background's pixels become gain · p + offset.
    arm_angle: shoulder angle range (radians from hanging down; the pose prior of the arms).
    lean: torso lean range (radians).
    head: "round" (a disk with eyes, ears, nose and mouth) or "square" (a visored box: the face
      features are drawn as slits and studs at the same landmarks).
    hair_prob: chance of a hair cap on a round head.
    occluders: probabilities of 0, 1 and 2 occluders.
    limb_width: scale of arm and leg widths.
  """

  name: str = "default"
  palette_lo: tuple[float, float, float] = (0.0, 0.0, 0.0)
  palette_hi: tuple[float, float, float] = (255.0, 255.0, 255.0)
  backgrounds: tuple[int, ...] = (0, 1, 2, 3)
  background_gain: float = 1.0
  background_offset: float = 0.0
  arm_angle: tuple[float, float] = (-0.5, 2.9)
  lean: tuple[float, float] = (-0.3, 0.3)
  head: str = "round"
  hair_prob: float = 0.7
  occluders: tuple[float, float, float] = (0.45, 0.35, 0.2)
  limb_width: float = 1.0

  def color(self, c: np.ndarray) -> np.ndarray:
    """A random [0, 255] BGR colour mapped into the palette."""
    lo, hi = np.asarray(self.palette_lo), np.asarray(self.palette_hi)
    return lo + c * (hi - lo) / 255.0


DEFAULT_STYLE = Style()
# The per-dataset domains of the synthetic study (benchmarks/synthetic_study.py): a COCO-like set
# of bright, warm-clothed, round-headed figures with arms mostly low on busy bright backgrounds,
# and an AIC-like set of dark-clad, box-headed figures with arms mostly raised on dark plain
# backgrounds with more occluders; a third domain for the transfer to a new skeleton.
STYLES: dict[str, Style] = {
    "coco_like": Style(
        name="coco_like", palette_lo=(0.0, 60.0, 150.0), palette_hi=(110.0, 230.0, 255.0),
        backgrounds=(1, 2), background_gain=0.55, background_offset=110.0,
        arm_angle=(-0.5, 1.3), lean=(-0.15, 0.15), head="round", hair_prob=0.95,
        occluders=(0.7, 0.25, 0.05), limb_width=0.85),
    "aic_like": Style(
        name="aic_like", palette_lo=(60.0, 30.0, 0.0), palette_hi=(150.0, 110.0, 60.0),
        backgrounds=(0, 3), background_gain=0.45, background_offset=0.0,
        arm_angle=(1.0, 2.9), lean=(-0.35, 0.35), head="square", hair_prob=0.0,
        occluders=(0.3, 0.4, 0.3), limb_width=1.25),
    "third": Style(
        name="third", palette_lo=(0.0, 120.0, 0.0), palette_hi=(120.0, 255.0, 120.0),
        backgrounds=(0, 2), background_gain=0.5, background_offset=60.0,
        arm_angle=(0.3, 2.0), lean=(-0.25, 0.25), head="round", hair_prob=0.0,
        occluders=(0.5, 0.35, 0.15), limb_width=1.0),
}


# --- Drawing primitives ---------------------------------------------------------------------------


def _fixed(points: np.ndarray) -> np.ndarray:
  """[N, 2] float pixel coordinates → [N, 2] int32 OpenCV fixed point."""
  return np.round(points * _ONE).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _Stroke:
  """A polyline of constant width with round caps (OpenCV thick lines)."""

  points: np.ndarray  # [N, 2]
  width: float
  color: Color

  def moved(self, m: np.ndarray, t: np.ndarray, s: float) -> "_Stroke":
    return _Stroke(self.points @ m.T + t, self.width * s, self.color)

  def extent(self) -> tuple[np.ndarray, np.ndarray]:
    r = self.width / 2
    return self.points.min(0) - r, self.points.max(0) + r

  def draw(self, img: np.ndarray, outline: int, outline_color: Color) -> None:
    pts = [tuple(map(int, q)) for q in _fixed(self.points)]
    width = max(1, int(round(self.width)))
    passes = ((width + 2 * outline, outline_color),) if outline else ()
    for w, c in passes + ((width, self.color),):
      for a, b in zip(pts[:-1], pts[1:]):
        cv2.line(img, a, b, c, w, _AA, _SHIFT)


@dataclasses.dataclass(frozen=True)
class _Disk:
  center: np.ndarray  # [2]
  radius: float
  color: Color

  def moved(self, m: np.ndarray, t: np.ndarray, s: float) -> "_Disk":
    return _Disk(m @ self.center + t, self.radius * s, self.color)

  def extent(self) -> tuple[np.ndarray, np.ndarray]:
    return self.center - self.radius, self.center + self.radius

  def draw(self, img: np.ndarray, outline: int, outline_color: Color) -> None:
    c = tuple(map(int, _fixed(self.center[None])[0]))
    r = max(_ONE // 2, int(round(self.radius * _ONE)))
    if outline:
      cv2.circle(img, c, r + outline * _ONE, outline_color, -1, _AA, _SHIFT)
    cv2.circle(img, c, r, self.color, -1, _AA, _SHIFT)


@dataclasses.dataclass(frozen=True)
class _Polygon:
  points: np.ndarray  # [N, 2], convex or simple
  color: Color

  def moved(self, m: np.ndarray, t: np.ndarray, s: float) -> "_Polygon":
    del s
    return _Polygon(self.points @ m.T + t, self.color)

  def extent(self) -> tuple[np.ndarray, np.ndarray]:
    return self.points.min(0), self.points.max(0)

  def draw(self, img: np.ndarray, outline: int, outline_color: Color) -> None:
    pts = _fixed(self.points)[None]
    if outline:
      cv2.polylines(img, pts, True, outline_color, 2 * outline, _AA, _SHIFT)
    cv2.fillPoly(img, pts, self.color, _AA, _SHIFT)


_Part = _Stroke | _Disk | _Polygon


# --- Small geometry and colour helpers ------------------------------------------------------------


def _rot(v: np.ndarray, angle: float) -> np.ndarray:
  """Rotates 2-vector(s) by `angle` radians (clockwise on screen, since y points down)."""
  c, s = math.cos(angle), math.sin(angle)
  return np.asarray(v, np.float64) @ np.array([[c, s], [-s, c]])


def _ellipse(center: np.ndarray, major: np.ndarray, a: float, b: float, n: int = 20) -> np.ndarray:
  """[n, 2] points of an ellipse with semi-axes a (along unit vector `major`) and b."""
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
  minor = np.array([-major[1], major[0]])
  return center + a * np.cos(t) * major + b * np.sin(t) * minor


def _color(rng: np.random.Generator) -> np.ndarray:
  return rng.integers(0, 256, 3).astype(np.float64)


def _c(v: np.ndarray) -> Color:
  # Plain Python: np.clip on 3-vectors costs more than the drawing it feeds.
  return tuple(min(255, max(0, int(round(float(x))))) for x in v)


def _dark(c: np.ndarray, f: float = 0.55) -> Color:
  return _c(c * f)


def _light(c: np.ndarray, f: float = 0.45) -> Color:
  return _c(c + (255.0 - c) * f)


def _side_color(c: np.ndarray, side: str) -> Color:
  """Left side dark, right side light (see module docstring)."""
  return _dark(c) if side == "left" else _light(c)


_SKIN = np.array([[60, 90, 140], [90, 130, 190], [120, 165, 225], [40, 60, 95], [150, 190, 235]],
                 np.float64)  # BGR


# --- Biped ----------------------------------------------------------------------------------------


def _biped(rng: np.random.Generator, style: Style = DEFAULT_STYLE
           ) -> tuple[dict[str, np.ndarray], list[_Part]]:
  """A front-facing human stick figure in canonical units (standing height ≈ 1, y down).

  Returns:
    landmarks: name → [2] position, for every name in BIPED_LANDMARKS.
    parts: primitives in paint order.
  """
  u = rng.uniform
  lm: dict[str, np.ndarray] = {}
  lean = u(*style.lean)
  up = _rot([0.0, -1.0], lean)
  side = _rot([1.0, 0.0], lean)  # Towards the figure's left (image right: it faces the viewer).
  down = -up
  torso, shoulder_half, hip_half = u(0.26, 0.32), u(0.085, 0.125), u(0.06, 0.085)
  neck_len, head_r = u(0.03, 0.055), u(0.055, 0.075)
  arm_w, leg_w = u(0.022, 0.042) * style.limb_width, u(0.03, 0.055) * style.limb_width

  shirt, pants, accent = (style.color(_color(rng)) for _ in range(3))
  skin = _SKIN[rng.integers(len(_SKIN))] + rng.uniform(-20, 20, 3)
  hair = style.color(_color(rng)) * 0.5

  neck_base = up * torso
  for name, sgn in (("left", 1.0), ("right", -1.0)):
    lm[f"{name}_shoulder"] = neck_base + sgn * shoulder_half * side
    lm[f"{name}_hip"] = sgn * hip_half * side

  # Head: tilted relative to the torso; face features shifted sideways by a small head turn.
  tilt = u(-0.35, 0.35)
  head_up, head_side = _rot(up, tilt), _rot(side, tilt)
  lm["neck"] = neck_base + neck_len * head_up  # Base of the head.
  head_c = lm["neck"] + head_r * head_up
  lm["head_top"] = head_c + head_r * head_up
  turn = u(-0.25, 0.25) * head_r
  for name, sgn in (("left", 1.0), ("right", -1.0)):
    lm[f"{name}_eye"] = head_c + (sgn * 0.4 * head_r + turn) * head_side + 0.15 * head_r * head_up
    lm[f"{name}_ear"] = head_c + sgn * 1.0 * head_r * head_side + 0.05 * head_r * head_up
  lm["nose"] = head_c + 1.2 * turn * head_side - 0.2 * head_r * head_up

  limbs: dict[str, list[_Part]] = {}
  for name, sgn in (("left", 1.0), ("right", -1.0)):
    out = sgn * side
    # Arm: shoulder angle from hanging down (0) through sideways to raised (≈165°), slightly
    # across the body allowed; segments foreshortened as if moving out of the image plane.
    a = u(*style.arm_angle)
    d1 = math.cos(a) * down + math.sin(a) * out
    lm[f"{name}_elbow"] = lm[f"{name}_shoulder"] + d1 * u(0.14, 0.18) * u(0.7, 1.0)
    d2 = _rot(d1, u(-2.4, 2.4))
    lm[f"{name}_wrist"] = lm[f"{name}_elbow"] + d2 * u(0.13, 0.17) * u(0.7, 1.0)
    # Leg: mostly down and somewhat outwards, sometimes a high kick.
    a = u(-0.25, 0.8) if rng.random() > 0.1 else u(0.8, 1.6)
    d3 = math.cos(a) * down + math.sin(a) * out
    lm[f"{name}_knee"] = lm[f"{name}_hip"] + d3 * u(0.21, 0.26) * u(0.75, 1.0)
    d4 = _rot(d3, u(-1.0, 1.0))
    lm[f"{name}_ankle"] = lm[f"{name}_knee"] + d4 * u(0.2, 0.25) * u(0.75, 1.0)

    sleeve, trouser = _side_color(shirt, name), _side_color(pants, name)
    joint = _side_color(accent, name)
    hand = _side_color(skin, name)
    perp = np.array([-d4[1], d4[0]])
    perp = perp if perp @ out >= 0 else -perp
    toe = lm[f"{name}_ankle"] + 0.06 * (0.35 * d4 + 0.94 * perp)  # Feet point outwards.
    limbs[f"{name}_leg"] = [
        _Stroke(np.stack([lm[f"{name}_hip"], lm[f"{name}_knee"], lm[f"{name}_ankle"]]), leg_w,
                trouser),
        _Stroke(np.stack([lm[f"{name}_ankle"], toe]), leg_w * 0.8, _dark(pants, 0.3)),
        _Disk(lm[f"{name}_knee"], leg_w * 0.62, joint),
        _Disk(lm[f"{name}_ankle"], leg_w * 0.55, joint),
    ]
    limbs[f"{name}_hip"] = [_Disk(lm[f"{name}_hip"], leg_w * 0.62, joint)]
    limbs[f"{name}_arm"] = [
        _Stroke(np.stack([lm[f"{name}_shoulder"], lm[f"{name}_elbow"], lm[f"{name}_wrist"]]),
                arm_w, sleeve),
        _Disk(lm[f"{name}_wrist"] + d2 * arm_w * 1.1, arm_w * 0.95, hand),
        _Disk(lm[f"{name}_shoulder"], arm_w * 0.65, joint),
        _Disk(lm[f"{name}_elbow"], arm_w * 0.62, joint),
        _Disk(lm[f"{name}_wrist"], arm_w * 0.55, joint),
    ]

  # Torso: shoulders and hips sit just inside its corners, with a narrower waist.
  ls, rs, lh, rh = (lm[k] for k in ("left_shoulder", "right_shoulder", "left_hip", "right_hip"))
  waist = 0.5 * (ls + lh), 0.5 * (rs + rh)
  pad = 0.5 * arm_w
  torso_poly = np.stack([
      ls + pad * (side + up), rs + pad * (up - side), waist[1] + 0.15 * (waist[0] - waist[1]),
      rh - pad * (side - down), lh + pad * (side + down), waist[0] + 0.15 * (waist[1] - waist[0])])

  skin_c = _c(skin)
  if style.head == "square":
    face = _square_face(rng, lm, neck_base, head_c, head_r, head_up, head_side, turn, arm_w, skin,
                        hair)
  else:
    face: list[_Part] = [
        _Stroke(np.stack([neck_base, head_c]), max(arm_w, 0.35 * head_r) * 1.3, skin_c),
        _Disk(lm["left_ear"], 0.3 * head_r, _side_color(skin, "left")),
        _Disk(lm["right_ear"], 0.3 * head_r, _side_color(skin, "right")),
        _Disk(head_c, head_r, skin_c),
    ]
    if rng.random() < style.hair_prob:  # Hair cap: marks the top of the head.
      t = np.linspace(0, np.pi, 12)[:, None]
      cap = head_c + head_r * 1.04 * (np.cos(t) * head_side + np.sin(t) * head_up)
      face.append(_Polygon(np.concatenate([cap, [head_c + 0.45 * head_r * head_up]]), _c(hair)))
    for name in ("left", "right"):
      face += [_Disk(lm[f"{name}_eye"], 0.2 * head_r, _side_color(np.full(3, 150.0), name)),
               _Disk(lm[f"{name}_eye"], 0.12 * head_r, (255, 255, 255)),
               _Disk(lm[f"{name}_eye"], 0.06 * head_r, (20, 20, 20))]
    mouth = head_c + turn * head_side - 0.55 * head_r * head_up
    face += [_Disk(lm["nose"], 0.13 * head_r, _dark(skin, 0.6)),
             _Stroke(np.stack([mouth - 0.25 * head_r * head_side,
                               mouth + 0.25 * head_r * head_side]), 0.07 * head_r, (40, 40, 150))]

  order = ["left", "right"] if rng.random() < 0.5 else ["right", "left"]
  parts: list[_Part] = []
  for name in order:
    parts += limbs[f"{name}_leg"]
  parts.append(_Polygon(torso_poly, _c(shirt)))
  for name in order:
    parts += limbs[f"{name}_hip"]
  parts += face
  for name in order:
    parts += limbs[f"{name}_arm"]
  return lm, parts


def _square_face(rng: np.random.Generator, lm: dict[str, np.ndarray], neck_base: np.ndarray,
                 head_c: np.ndarray, head_r: float, head_up: np.ndarray, head_side: np.ndarray,
                 turn: float, arm_w: float, skin: np.ndarray, hair: np.ndarray) -> list[_Part]:
  """A box head with a visor (the "square" head style) at the round head's landmarks.

  Draws as many random numbers as the round head does (the hair-cap draw), so a style switch
  changes the look, not the rest of the sample.
  """
  rng.random()  # The round head's hair-cap draw.
  r = head_r * 1.05
  box = np.stack([head_c + r * (sx * head_side + sy * head_up)
                  for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1))])
  helmet = _c(hair * 0.6 + 40.0)
  parts: list[_Part] = [
      _Stroke(np.stack([neck_base, head_c]), max(arm_w, 0.35 * head_r) * 1.3, _dark(skin, 0.7)),
      _Polygon(box, helmet),
  ]
  for name in ("left", "right"):
    # Ear studs: small squares at the ear landmarks.
    e = lm[f"{name}_ear"]
    q = 0.22 * head_r
    parts.append(_Polygon(np.stack([e + q * (sx * head_side + sy * head_up)
                                    for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1))]),
                          _side_color(np.full(3, 200.0), name)))
  visor_c = head_c + turn * head_side + 0.15 * head_r * head_up
  visor = np.stack([visor_c - 0.75 * head_r * head_side, visor_c + 0.75 * head_r * head_side])
  parts.append(_Stroke(visor, 0.28 * head_r, (30, 30, 30)))
  for name in ("left", "right"):
    parts.append(_Stroke(np.stack([lm[f"{name}_eye"] - 0.15 * head_r * head_side,
                                   lm[f"{name}_eye"] + 0.15 * head_r * head_side]), 0.1 * head_r,
                         _side_color(np.full(3, 120.0), name)))
  parts.append(_Polygon(np.stack([lm["nose"] + 0.15 * head_r * head_up,
                                  lm["nose"] - 0.1 * head_r * (head_up + head_side),
                                  lm["nose"] - 0.1 * head_r * (head_up - head_side)]),
                        (200, 200, 230)))
  return parts


# --- Quadruped ------------------------------------------------------------------------------------


def _quadruped(rng: np.random.Generator, style: Style = DEFAULT_STYLE
               ) -> tuple[dict[str, np.ndarray], list[_Part]]:
  """A four-legged animal seen from the side, in canonical units (body length ≈ 1, y down).

  It faces image right or left at random. The near side (right when facing right, left when
  facing left) has its legs painted last; both sides keep the left-dark/right-light shading.
  In a side view the shading alone is a weak, relative cue (the two legs of a pair are rarely
  seen side by side), so the left legs also wear light "socks" and light paws: a local cue that
  says which leg is which, while finding the joints stays as hard as before.

  Returns:
    landmarks: name → [2] position, for every name in QUADRUPED_LANDMARKS.
    parts: primitives in paint order.
  """
  u = rng.uniform
  facing = 1.0 if rng.random() < 0.5 else -1.0
  fwd, up, down = np.array([facing, 0.0]), np.array([0.0, -1.0]), np.array([0.0, 1.0])
  near, far = ("right", "left") if facing > 0 else ("left", "right")
  lm: dict[str, np.ndarray] = {}
  a, b = u(0.42, 0.55), u(0.13, 0.2)  # Body semi-axes.
  fur, accent = style.color(_color(rng)), style.color(_color(rng))
  leg_scale, leg_w = u(0.8, 1.3), u(0.045, 0.08)

  lm["neck"] = 0.8 * a * fwd + 0.55 * b * up
  lm["tail_root"] = -0.93 * a * fwd + 0.35 * b * up
  attach = {
      (near, "front"): 0.62 * a * fwd + 0.3 * b * down,
      (far, "front"): 0.52 * a * fwd + 0.05 * b * up,
      (near, "back"): -0.62 * a * fwd + 0.3 * b * down,
      (far, "back"): -0.72 * a * fwd + 0.05 * b * up,
  }
  legs: dict[str, list[_Part]] = {near: [], far: []}
  for (side, end), top in attach.items():
    j1, j2, j3 = ("shoulder", "elbow", "paw") if end == "front" else ("hip", "knee", "paw")
    k1, k2, k3 = (f"{side}_{end}_{j}" for j in (j1, j2, j3))
    lm[k1] = top
    ang = u(-0.6, 0.6)  # Upper leg swing, positive = forwards.
    d1 = math.cos(ang) * down + math.sin(ang) * fwd
    lm[k2] = top + d1 * u(0.2, 0.3) * leg_scale
    ang += u(-0.9, 0.3) if end == "front" else u(-0.3, 0.9)
    d2 = math.cos(ang) * down + math.sin(ang) * fwd
    lm[k3] = lm[k2] + d2 * u(0.2, 0.3) * leg_scale
    color, joint = _side_color(fur, side), _side_color(accent, side)
    lower, paw = (_light(fur, 0.7), _light(fur, 0.85)) if side == "left" else (color, _dark(fur, 0.3))
    legs[side] += [
        _Stroke(np.stack([lm[k1], lm[k2]]), leg_w, color),
        _Stroke(np.stack([lm[k2], lm[k3]]), leg_w * 0.8, lower),
        _Disk(lm[k3], leg_w * 0.75, paw),
        _Disk(lm[k1], leg_w * 0.6, joint),
        _Disk(lm[k2], leg_w * 0.55, joint),
    ]

  # Neck rises forwards from the body to the head; the snout points forwards-down.
  ang = u(0.35, 1.3)
  neck_dir = math.cos(ang) * fwd + math.sin(ang) * up
  neck_w = u(0.1, 0.15)
  head_c = lm["neck"] + neck_dir * u(0.2, 0.32)
  ang = u(-0.8, 0.25)
  snout = math.cos(ang) * fwd + math.sin(ang) * up
  head_up = facing * np.array([snout[1], -snout[0]])  # Perpendicular to the snout, upwards.
  ha, hb = u(0.1, 0.13), u(0.065, 0.085)
  lm["nose"] = head_c + snout * (ha + u(0.04, 0.1))
  # Head turned a little towards the viewer: the far eye sits higher, the near eye lower.
  lm[f"{far}_eye"] = head_c + 0.02 * snout + 0.6 * hb * head_up
  lm[f"{near}_eye"] = head_c + 0.05 * snout + 0.05 * hb * head_up

  t = lm["tail_root"]
  ang = u(-1.0, 1.2)
  d = math.cos(ang) * -fwd + math.sin(ang) * up
  tail_len = u(0.2, 0.45)
  t1 = t + d * tail_len / 2
  t2 = t1 + _rot(d, u(-0.8, 0.8)) * tail_len / 2

  fur_c = _c(fur)
  parts: list[_Part] = [
      _Stroke(np.stack([t, t1]), u(0.04, 0.06), fur_c),
      _Stroke(np.stack([t1, t2]), 0.03, fur_c),
      _Polygon(_ellipse(np.zeros(2), fwd, a, b, 24), fur_c),
  ]
  for _ in range(int(rng.integers(0, 4)) if rng.random() < 0.4 else 0):
    spot = np.array([u(-0.7, 0.7) * a, u(-0.5, 0.5) * b])
    parts.append(_Disk(spot, u(0.3, 0.6) * b, _dark(fur, 0.4)))
  parts += legs[far]
  for sgn in (1.0, -0.2):  # Ears: triangles on the back of the head.
    base = head_c - 0.3 * ha * snout + 0.7 * hb * head_up + sgn * 0.25 * ha * snout
    tip = base + 0.9 * hb * head_up - 0.5 * hb * snout
    parts.append(_Polygon(np.stack([base - 0.3 * ha * snout, base + 0.3 * ha * snout, tip]),
                          _dark(fur, 0.75)))
  muzzle = np.stack([head_c + 0.7 * hb * head_up, lm["nose"] + 0.3 * hb * head_up,
                     lm["nose"] - 0.3 * hb * head_up, head_c - 0.8 * hb * head_up])
  parts += [
      _Stroke(np.stack([lm["neck"], head_c]), neck_w, fur_c),
      _Polygon(_ellipse(head_c, snout, ha, hb, 16), fur_c),
      _Polygon(muzzle, _light(fur, 0.2)),
      _Disk(lm["nose"], 0.28 * hb, (25, 25, 25)),
  ]
  for side in (far, near):
    parts += [_Disk(lm[f"{side}_eye"], 0.3 * hb, _side_color(np.full(3, 150.0), side)),
              _Disk(lm[f"{side}_eye"], 0.18 * hb, (255, 255, 255)),
              _Disk(lm[f"{side}_eye"], 0.09 * hb, (15, 15, 15))]
  # Collar at the neck keypoint and a marker at the tail root make both points well defined.
  perp = np.array([-neck_dir[1], neck_dir[0]])
  parts.append(_Stroke(np.stack([lm["neck"] - 0.55 * neck_w * perp,
                                 lm["neck"] + 0.55 * neck_w * perp]), 0.35 * neck_w, _c(accent)))
  parts.append(_Disk(lm["tail_root"], 0.03, _c(accent)))
  parts += legs[near]
  return lm, parts


# --- Background and occluders ---------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int, style: Style = DEFAULT_STYLE
                ) -> np.ndarray:
  """A textured [h, w, 3] uint8 background: a base texture plus optional blobs, sticks, noise."""
  kind = style.backgrounds[int(rng.integers(4)) % len(style.backgrounds)]
  if kind == 0:  # Bilinear gradient between corner colours.
    img = cv2.resize(rng.integers(0, 256, (2, 2, 3), dtype=np.uint8), (w, h),
                     interpolation=cv2.INTER_LINEAR)
  elif kind == 1:  # Smooth colour noise (cubic overshoot saturates in uint8).
    g = int(rng.integers(3, 14))
    img = cv2.resize(rng.integers(0, 256, (g, g, 3), dtype=np.uint8), (w, h),
                     interpolation=cv2.INTER_CUBIC)
  elif kind == 2:  # Stripes between two colours.
    ang, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.02, 0.15), rng.uniform(0, 2 * np.pi)
    k = 2 * np.pi * freq
    proj = (k * math.cos(ang) * np.arange(w, dtype=np.float32)[None, :]
            + (k * math.sin(ang) * np.arange(h, dtype=np.float32) + phase)[:, None])
    wave = np.sin(proj)
    if rng.random() < 0.5:  # Hard-edged stripes.
      level = np.where(wave > 0, 255, 0).astype(np.uint8)
    else:
      level = ((wave + 1) * 127.5).astype(np.uint8)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    # Colour lookup per level: cheaper than mixing two colours per pixel in float.
    lut = (c1 + np.linspace(0, 1, 256)[:, None] * (c2 - c1)).astype(np.uint8)
    img = lut[level]
  else:  # Flat colour.
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3, dtype=np.uint8)

  scale = min(h, w)
  if rng.random() < 0.6:  # Blobs: ellipses of random colour.
    for _ in range(int(rng.integers(2, 10))):
      c = tuple(int(v) for v in rng.integers(0, 256, 3))
      center = (int(rng.integers(0, w) * _ONE), int(rng.integers(0, h) * _ONE))
      axes = tuple(int(v * _ONE) for v in rng.uniform(0.03, 0.25, 2) * scale)
      cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, c, -1, _AA, _SHIFT)
  if rng.random() < 0.5:  # Sticks that look a little like limbs, as distractors.
    for _ in range(int(rng.integers(1, 5))):
      c = tuple(int(v) for v in rng.integers(0, 256, 3))
      p = (rng.uniform(0, 1, 4) * [w, h, w, h] * _ONE).astype(int)
      cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), c,
               int(rng.integers(1, max(2, scale // 25))), _AA, _SHIFT)
  if style.background_gain != 1.0 or style.background_offset != 0.0:
    img = cv2.convertScaleAbs(img, alpha=style.background_gain, beta=style.background_offset)
  return img


def _occluders(rng: np.random.Generator, img: np.ndarray, targets: np.ndarray,
               size: float, style: Style = DEFAULT_STYLE) -> np.ndarray:
  """Paints 0–2 rectangles/ellipses over parts of the figure.

  Args:
    img: [H, W, 3] uint8, painted in place.
    targets: [N, 2] points (the figure's landmarks) that occluders are centred near.
    size: figure size in pixels; occluders are 12–35 % of it.

  Returns:
    [H, W] uint8 mask, non-zero where an occluder was painted.
  """
  h, w = img.shape[:2]
  mask = np.zeros((h, w), np.uint8)
  n = rng.choice(3, p=style.occluders)
  for _ in range(n):
    center = targets[rng.integers(len(targets))] + rng.normal(0, 0.08 * size, 2)
    half = rng.uniform(0.06, 0.175, 2) * size
    ang = rng.uniform(0, 180)
    layer = np.zeros_like(mask)
    cf = tuple(int(v) for v in _fixed(center[None])[0])
    if rng.random() < 0.5:
      box = cv2.boxPoints(((float(center[0]), float(center[1])),
                           (float(2 * half[0]), float(2 * half[1])), float(ang)))
      cv2.fillPoly(layer, _fixed(box)[None], 255, cv2.LINE_8, _SHIFT)
    else:
      cv2.ellipse(layer, cf, tuple(int(v * _ONE) for v in half), float(ang), 0, 360, 255, -1,
                  cv2.LINE_8, _SHIFT)
    c1 = rng.integers(0, 256, 3).astype(np.uint8)
    sel = layer > 0
    if rng.random() < 0.5:
      img[sel] = c1
    else:  # Striped occluder, so it is not always a flat patch.
      c2 = rng.integers(0, 256, 3).astype(np.uint8)
      yy, xx = np.nonzero(sel)
      period = int(rng.integers(3, 10))
      img[yy, xx] = np.where((((xx + yy) // period) % 2 == 0)[:, None], c1, c2)
    mask |= layer
  return mask


# --- Public API -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RenderedSample:
  """One rendered image and its ground truth.

  Attributes:
    image: [H, W, 3] uint8, BGR.
    background: [H, W, 3] uint8, BGR: the image before the figure and occluders were drawn.
    keypoints: landmark name → (x, y, v) with v = 2 visible, 1 under an occluder, 0 outside the
      image (then x = y = 0, as in COCO). Names: BIPED_LANDMARKS or QUADRUPED_LANDMARKS.
    bbox: (x, y, w, h) tight box of the figure's parts, padded and clipped to the image.
  """

  image: np.ndarray
  background: np.ndarray
  keypoints: dict[str, tuple[float, float, int]]
  bbox: tuple[float, float, float, float]


def _placement(rng: np.random.Generator, parts: list[_Part], h: int,
               w: int) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
  """Draws a random similarity transform (rotation ±30°, size 40–90 %, position) into the image.

  Returns:
    (m [2, 2], t [2], s, lo [2], hi [2]): canonical point p maps to m @ p + t; lengths scale by
    s; lo/hi are the corners of the figure's box in pixels.
  """
  ang = math.radians(rng.uniform(-30, 30))
  rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
  lo, hi = _extent([p.moved(rot, np.zeros(2), 1.0) for p in parts])
  size = hi - lo  # [w, h] after rotation, in canonical units.
  s = rng.uniform(0.4, 0.9) / max(size[1] / h, size[0] / w)
  size = size * s
  # Usually the whole figure is inside; sometimes it is partly cut off by the border.
  margin = rng.uniform(0.05, 0.2) * size if rng.random() < 0.15 else np.zeros(2)
  lo_c, hi_c = size / 2 - margin, np.array([w, h]) - 1 - size / 2 + margin
  center = np.where(lo_c < hi_c, rng.uniform(np.minimum(lo_c, hi_c), np.maximum(lo_c, hi_c)),
                    np.array([w, h]) / 2)
  t = center - s * (lo + hi) / 2
  # Extents of rotated parts only scale and shift under the rest of the transform.
  return s * rot, t, s, s * lo + t, s * hi + t


def _extent(parts: list[_Part]) -> tuple[np.ndarray, np.ndarray]:
  los, his = zip(*(p.extent() for p in parts))
  return np.min(los, axis=0), np.max(his, axis=0)


def render_sample(rng: np.random.Generator, body_type: str,
                  image_size: tuple[int, int] = (192, 192),
                  style: Style | str | None = None) -> RenderedSample:
  """Renders one figure of `body_type` ("biped" or "quadruped") on a textured background.

  Args:
    rng: the only source of randomness; equal generator states give equal samples.
    body_type: "biped" or "quadruped".
    image_size: (H, W) in pixels.
    style: the dataset's look: a `Style`, a key of `STYLES`, or None for the default.

  Returns:
    The image, its background and the ground truth; see `RenderedSample`.
  """
  if style is None:
    style = DEFAULT_STYLE
  elif isinstance(style, str):
    if style not in STYLES:
      raise ValueError(f"unknown style {style!r}; known: {sorted(STYLES)}")
    style = STYLES[style]
  if body_type == BIPED:
    build = _biped
  elif body_type == QUADRUPED:
    build = _quadruped
  else:
    raise ValueError(f"unknown body_type {body_type!r}; expected {BIPED!r} or {QUADRUPED!r}")
  h, w = image_size
  background = _background(rng, h, w, style)
  landmarks, parts = build(rng, style)
  m, t, s, lo, hi = _placement(rng, parts, h, w)
  parts = [p.moved(m, t, s) for p in parts]
  names = list(landmarks)
  points = np.stack([landmarks[n] for n in names]) @ m.T + t

  img = background.copy()
  outline = int(rng.integers(1, 3)) if rng.random() < 0.75 else 0
  outline_color = _c(rng.uniform(0, 60, 3)) if rng.random() < 0.8 else _c(_color(rng))
  for p in parts:
    p.draw(img, outline, outline_color)

  size = float(max(hi - lo))
  inside = np.all((points >= 0) & (points <= [w - 1, h - 1]), axis=1)
  mask = _occluders(rng, img, points[inside] if inside.any() else points, size, style)

  if rng.random() < 0.2:  # Mild blur, as from defocus or a small source image.
    img = cv2.GaussianBlur(img, (3, 3), 0)
  if rng.random() < 0.3:  # Sensor noise.
    # One noise value for all three channels: a third of the random numbers, looks the same.
    noise = rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(3, 12))
    img = cv2.add(img, cv2.merge([noise, noise, noise]), dtype=cv2.CV_8U)

  keypoints = {}
  for name, (x, y), ok in zip(names, points, inside):
    if not ok:
      keypoints[name] = (0.0, 0.0, 0)
    else:
      occluded = mask[int(round(y)), int(round(x))] > 0
      keypoints[name] = (float(x), float(y), 1 if occluded else 2)

  pad = 3.0 + outline
  x0, y0 = np.maximum(lo - pad, 0.0)
  x1, y1 = np.minimum(hi + pad, [w - 1, h - 1])
  bbox = (float(x0), float(y0), float(max(x1 - x0, 1.0)), float(max(y1 - y0, 1.0)))
  return RenderedSample(image=img, background=background, keypoints=keypoints, bbox=bbox)
