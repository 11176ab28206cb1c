import dataclasses

import ml_collections
import numpy as np
import pytest

from data_pipelines import skeletons
from data_pipelines.skeletons import SkeletonInfo, SkeletonLayout


def test_synthetic_flip_pairs_match_names():
  for skel in skeletons.SYNTHETIC_SKELETONS.values():
    for i, j in skel.flip_pairs:
      a, b = skel.keypoint_names[i], skel.keypoint_names[j]
      assert a.replace("left", "X").replace("right", "left").replace("X", "right") == b
    perm = skel.flip_permutation
    np.testing.assert_array_equal(perm[perm], np.arange(skel.num_keypoints))


def test_coco_like_flip_pairs_are_mmpose_order():
  assert skeletons.SYNTH_COCO.flip_pairs == (
      (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
  assert skeletons.SYNTH_AIC.flip_pairs == ((0, 3), (1, 4), (2, 5), (6, 9), (7, 10), (8, 11))


def test_layout_offsets_masks_and_global_ids():
  layout = SkeletonLayout((skeletons.SYNTH_COCO, skeletons.SYNTH_AIC, skeletons.SYNTH_AP10K))
  assert layout.num_keypoints == (17, 14, 17)
  assert layout.offsets == (0, 17, 31)
  assert layout.total_keypoints == 48 and layout.max_keypoints == 17
  mask = layout.skeleton_mask()
  assert mask.shape == (3, 17) and mask[1].sum() == 14 and mask[1, 14:].sum() == 0
  g = layout.global_index()
  np.testing.assert_array_equal(g[1, :14], np.arange(17, 31))
  np.testing.assert_array_equal(g[2], np.arange(31, 48))


# --- Real skeletons against the spec's §4.2 tables (values typed in from the spec) --------------

REAL = ("coco", "aic", "mpii", "ap10k", "apt36k", "coco_wholebody")

_AP10K_FLIP = [[0, 1], [5, 8], [6, 9], [7, 10], [11, 14], [12, 15], [13, 16]]
SPEC_FLIP_PAIRS = {
    "coco": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [15, 16]],
    "aic": [[0, 3], [1, 4], [2, 5], [6, 9], [7, 10], [8, 11]],
    "mpii": [[0, 5], [1, 4], [2, 3], [10, 15], [11, 14], [12, 13]],
    "ap10k": _AP10K_FLIP,
    "apt36k": _AP10K_FLIP,
    "coco_wholebody": [
        [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [15, 16], [17, 20], [18, 21],
        [19, 22],
        [23, 39], [24, 38], [25, 37], [26, 36], [27, 35], [28, 34], [29, 33], [30, 32],
        [40, 49], [41, 48], [42, 47], [43, 46], [44, 45], [54, 58], [55, 57],
        [59, 68], [60, 67], [61, 66], [62, 65], [63, 70], [64, 69], [71, 77], [72, 76], [73, 75],
        [78, 82], [79, 81], [83, 87], [84, 86], [88, 90],
        [91, 112], [92, 113], [93, 114], [94, 115], [95, 116], [96, 117], [97, 118], [98, 119],
        [99, 120], [100, 121], [101, 122], [102, 123], [103, 124], [104, 125], [105, 126],
        [106, 127], [107, 128], [108, 129], [109, 130], [110, 131], [111, 132]],
}

_AP10K_UPPER = [0, 1, 2, 3, 5, 6, 7, 8, 9]
SPEC_UPPER_IDS = {
    "coco": list(range(11)), "aic": [0, 1, 2, 3, 4, 5, 12, 13],
    "mpii": [7, 8, 9, 10, 11, 12, 13, 14, 15], "ap10k": _AP10K_UPPER, "apt36k": _AP10K_UPPER,
    "coco_wholebody": list(range(11)),
}
_AP10K_LOWER = [4, 10, 11, 12, 13, 14, 15, 16]
SPEC_LOWER_IDS = {
    "coco": [11, 12, 13, 14, 15, 16], "aic": [6, 7, 8, 9, 10, 11], "mpii": [0, 1, 2, 3, 4, 5, 6],
    "ap10k": _AP10K_LOWER, "apt36k": _AP10K_LOWER,
    # The spec's typed-'lower' list is 11..22 (body + feet); face and hands are untyped and count
    # as lower body in the half-body transform (spec §4.2, §6.16), so the effective set is 11..132.
    "coco_wholebody": list(range(11, 133)),
}

# (K, {id: sigma}, {id: joint weight}, sum of sigmas, sum of joint weights); the sums are over the
# spec's full columns and catch a mistyped value anywhere in a table.
SPEC_VALUES = {
    "coco": (17, {0: 0.026, 3: 0.035, 9: 0.062, 12: 0.107, 16: 0.089}, {7: 1.2, 10: 1.5, 11: 1.0},
             1.138, 19.8),
    "aic": (14, {0: 0.01388152, 6: 0.03909642, 11: 0.02415081, 13: 0.01236173},
            {1: 1.2, 2: 1.5, 12: 1.0}, 0.30056174, 16.8),
    "mpii": (16, {0: 0.089, 1: 0.083, 6: 0.026, 12: 0.179, 15: 0.062}, {0: 1.5, 4: 1.2, 7: 1.0},
             1.288, 18.8),
    "ap10k": (17, {0: 0.025, 2: 0.026, 4: 0.035, 8: 0.079, 16: 0.089},
              {6: 1.0, 7: 1.2, 8: 1.2, 9: 1.5, 16: 1.5}, 1.138, 19.8),
    "coco_wholebody": (133, {17: 0.068, 22: 0.094, 23: 0.042, 39: 0.045, 40: 0.013, 70: 0.034,
                             90: 0.008, 91: 0.029, 95: 0.047, 111: 0.031, 112: 0.029, 132: 0.031},
                       {0: 1.0, 9: 1.0, 132: 1.0}, 3.861, 133.0),
}
SPEC_VALUES["apt36k"] = SPEC_VALUES["ap10k"]


def test_real_skeletons_are_registered_in_dataset_order():
  assert tuple(skeletons.REAL_SKELETONS) == REAL
  for name in REAL:
    assert skeletons.get_skeleton(name).name == name
  assert {n: skeletons.SKELETONS[n].body_type for n in REAL} == {
      "coco": "biped", "aic": "biped", "mpii": "biped", "ap10k": "quadruped",
      "apt36k": "quadruped", "coco_wholebody": "biped"}
  # The synthetic ones stay registered next to them.
  assert set(skeletons.SYNTHETIC_SKELETONS) <= set(skeletons.SKELETONS)


@pytest.mark.parametrize("name", REAL)
def test_flip_pairs_equal_spec(name):
  assert [list(p) for p in skeletons.get_skeleton(name).flip_pairs] == SPEC_FLIP_PAIRS[name]


@pytest.mark.parametrize("name", sorted(skeletons.SKELETONS))
def test_flip_is_an_involution_with_symmetric_partners(name):
  skel = skeletons.get_skeleton(name)
  k = skel.num_keypoints
  assert len(set(skel.keypoint_names)) == k
  perm = skel.flip_permutation
  np.testing.assert_array_equal(perm[perm], np.arange(k))
  partner = dict(zip(skel.keypoint_names, skel.swap))
  for kp, p in partner.items():
    if p:
      assert p != kp and partner[p] == kp
  # Keypoints without a partner stay in place; each index appears in at most one pair.
  flat = [i for pair in skel.flip_pairs for i in pair]
  assert len(flat) == len(set(flat))
  unpaired = [i for i in range(k) if not skel.swap[i]]
  np.testing.assert_array_equal(perm[unpaired], unpaired)


@pytest.mark.parametrize("name", REAL)
def test_sizes_sigmas_and_joint_weights_equal_spec(name):
  skel = skeletons.get_skeleton(name)
  k, sigmas, weights, sigma_sum, weight_sum = SPEC_VALUES[name]
  assert skel.num_keypoints == k
  assert len(skel.sigmas) == len(skel.joint_weights) == len(skel.upper_body) == k
  for i, s in sigmas.items():
    assert skel.sigmas[i] == s, (name, i)
  for i, w in weights.items():
    assert skel.joint_weights[i] == w, (name, i)
  assert sum(skel.sigmas) == pytest.approx(sigma_sum, abs=1e-9)
  assert sum(skel.joint_weights) == pytest.approx(weight_sum, abs=1e-9)
  np.testing.assert_array_equal(skel.joint_weights_array,
                                np.asarray(skel.joint_weights, np.float32))


@pytest.mark.parametrize("name", REAL)
def test_upper_and_lower_body_ids_equal_spec(name):
  skel = skeletons.get_skeleton(name)
  assert list(skel.upper_body_ids) == SPEC_UPPER_IDS[name]
  assert list(skel.lower_body_ids) == SPEC_LOWER_IDS[name]


def test_spec_names_and_quirks():
  assert skeletons.get_skeleton("aic").keypoint_names[12:] == ("head_top", "neck")
  assert skeletons.get_skeleton("mpii").keypoint_names[6:10] == (
      "pelvis", "thorax", "upper_neck", "head_top")
  ap10k = skeletons.get_skeleton("ap10k")
  assert ap10k.keypoint_names[:5] == ("L_Eye", "R_Eye", "Nose", "Neck", "Root of tail")
  # Upstream quirk kept on purpose (spec §4.2 note): L_F_Paw is upper, R_F_Paw lower.
  assert ap10k.upper_body[7] and not ap10k.upper_body[10]
  assert dataclasses.replace(skeletons.get_skeleton("apt36k"), name="ap10k") == ap10k


def test_wholebody_extends_coco():
  coco, wb = skeletons.get_skeleton("coco"), skeletons.get_skeleton("coco_wholebody")
  assert wb.keypoint_names[:17] == coco.keypoint_names
  assert wb.sigmas[:17] == coco.sigmas
  assert wb.swap[:17] == coco.swap
  assert wb.keypoint_names[17:23] == ("left_big_toe", "left_small_toe", "left_heel",
                                      "right_big_toe", "right_small_toe", "right_heel")
  assert wb.keypoint_names[23:91] == tuple(f"face-{i}" for i in range(68))
  assert wb.keypoint_names[91:96] == ("left_hand_root", "left_thumb1", "left_thumb2",
                                      "left_thumb3", "left_thumb4")
  assert wb.keypoint_names[108] == "left_pinky_finger1"
  assert wb.keypoint_names[112:] == tuple(n.replace("left_", "right_")
                                          for n in wb.keypoint_names[91:112])
  assert wb.sigmas[112:] == wb.sigmas[91:112]
  # Face landmarks on the mirror axis (spec: 31, 50-53, 56, 74, 80, 85, 89).
  assert [i for i in range(23, 91) if not wb.swap[i]] == [31, 50, 51, 52, 53, 56, 74, 80, 85, 89]


@pytest.mark.parametrize("name", sorted(skeletons.SKELETONS))
def test_limbs_and_colors_are_consistent(name):
  skel = skeletons.get_skeleton(name)
  k = skel.num_keypoints
  assert all(0 <= a < k and 0 <= b < k and a != b for a, b in skel.limbs)
  assert len(set(skel.limbs)) == len(skel.limbs)
  assert len(skel.keypoint_colors) in (0, k)
  assert len(skel.limb_colors) in (0, len(skel.limbs))


def test_real_limbs_are_mmpose_skeletons():
  counts = {n: len(skeletons.get_skeleton(n).limbs) for n in REAL}
  assert counts == {"coco": 19, "aic": 14, "mpii": 15, "ap10k": 17, "apt36k": 17,
                    "coco_wholebody": 65}
  wb = skeletons.get_skeleton("coco_wholebody")
  assert wb.limbs[:19] == skeletons.get_skeleton("coco").limbs
  assert not any(23 <= i < 91 for limb in wb.limbs for i in limb)  # mmpose draws no face links
  for name in REAL:
    skel = skeletons.get_skeleton(name)
    assert len(skel.keypoint_colors) == skel.num_keypoints
    assert len(skel.limb_colors) == len(skel.limbs)


def test_joint_weights_default_to_ones():
  skel = skeletons.SYNTH_COCO
  assert skel.joint_weights == ()
  np.testing.assert_array_equal(skel.joint_weights_array, np.ones(17, np.float32))


def test_layout_of_the_six_reference_datasets():
  layout = SkeletonLayout(tuple(skeletons.get_skeleton(n) for n in REAL))
  assert layout.num_keypoints == (17, 14, 16, 17, 17, 133)
  assert layout.offsets == (0, 17, 31, 47, 64, 81)
  assert layout.total_keypoints == 214 and layout.max_keypoints == 133
  g = layout.global_index()
  assert g[5, 132] == 213 and g[2, 15] == 46 and g[1, 14:].sum() == 0


# --- Skeletons from config entries ----------------------------------------------------------------

def test_new_skeleton_from_config_entry():
  skel = SkeletonInfo.from_dict(dict(
      name="three", keypoint_names=("left_a", "right_a", "mid"), swap=("right_a", "left_a", ""),
      sigmas=(0.1, 0.1, 0.2), upper_body=(True, True, False)))
  assert skel.flip_pairs == ((0, 1),)
  assert skel.lower_body_ids == (2,)


def test_config_entry_with_flip_pairs_rebuilds_a_real_skeleton():
  coco = skeletons.get_skeleton("coco")
  cfg = ml_collections.ConfigDict(dict(
      name="coco", keypoint_names=list(coco.keypoint_names), flip_pairs=SPEC_FLIP_PAIRS["coco"],
      sigmas=list(coco.sigmas), upper_body_ids=SPEC_UPPER_IDS["coco"],
      limbs=[[coco.keypoint_names[a], coco.keypoint_names[b]] for a, b in coco.limbs],
      joint_weights=list(coco.joint_weights),
      keypoint_colors=[list(c) for c in coco.keypoint_colors],
      limb_colors=[list(c) for c in coco.limb_colors]))
  assert SkeletonInfo.from_dict(cfg) == coco


def test_config_entry_for_a_new_dataset_works_in_a_layout():
  skel = SkeletonInfo.from_dict(dict(
      name="paw", keypoint_names=("nose", "l_paw", "r_paw", "tail"), flip_pairs=[[2, 1]],
      sigmas=(0.03, 0.05, 0.05, 0.08), upper_body_ids=[0, 1, 2], body_type="quadruped",
      limbs=[[0, 1], ["nose", "r_paw"], ["nose", "tail"]]))
  assert skel.swap == ("", "r_paw", "l_paw", "")
  assert skel.flip_pairs == ((1, 2),)
  assert skel.limbs == ((0, 1), (0, 2), (0, 3))
  np.testing.assert_array_equal(skel.joint_weights_array, np.ones(4, np.float32))
  layout = SkeletonLayout((skeletons.get_skeleton("coco"), skel))
  assert layout.offsets == (0, 17) and layout.total_keypoints == 21


_DROP = object()


@pytest.mark.parametrize("bad", [
    dict(swap=("right_a", "nope", "")),
    dict(swap=("right_a", "mid", "left_a")),  # not symmetric
    dict(sigmas=(0.1,)),
    dict(sigmas=(0.1, 0.0, 0.2)),
    dict(upper_body=(True,)),
    dict(keypoint_names=("a", "a", "b"), swap=("", "", "")),
    dict(joint_weights=(1.0, 1.0)),
    dict(keypoint_colors=((0, 0, 0),)),
    dict(keypoint_colors=((0, 0, 0), (0, 0, 0), (0, 0, 256))),
    dict(limbs=((0, 3),)),
    dict(limbs=(("left_a", "elbow"),)),
    dict(limbs=((0, 1),), limb_colors=((1, 2, 3), (4, 5, 6))),
    dict(swap=_DROP, flip_pairs=[[0, 3]]),  # out of range
    dict(swap=_DROP, flip_pairs=[[0, 1], [1, 2]]),  # index twice
    dict(swap=_DROP, flip_pairs=[[2, 2]]),
    dict(swap=_DROP, flip_pairs=[[0, 1, 2]]),
    dict(flip_pairs=[[0, 1]]),  # both swap and flip_pairs
    dict(upper_body_ids=[0]),  # both upper_body and upper_body_ids
    dict(upper_body=_DROP, upper_body_ids=[0, 5]),
    dict(upper_body=_DROP),
    dict(sigmas=_DROP),
    dict(flip_pair=[[0, 1]]),  # misspelt key
])
def test_invalid_skeletons_fail_loudly(bad):
  base = dict(name="x", keypoint_names=("left_a", "right_a", "mid"),
              swap=("right_a", "left_a", ""), sigmas=(0.1, 0.1, 0.2),
              upper_body=(True, True, False))
  base.update(bad)
  base = {k: v for k, v in base.items() if v is not _DROP}
  with pytest.raises(ValueError, match="skeleton 'x'"):
    SkeletonInfo.from_dict(base)


def test_config_entry_without_name_fails_loudly():
  with pytest.raises(ValueError, match="without 'name'"):
    SkeletonInfo.from_dict(dict(keypoint_names=("a",), sigmas=(0.1,), upper_body=(True,)))


def test_unknown_skeleton_names_the_known_ones():
  with pytest.raises(KeyError, match="synth_coco"):
    skeletons.get_skeleton("nope")


def test_synthetic_skeletons_draw_in_their_own_colours():
  """Overlays of several synthetic skeletons on one image tell them apart (each its palette)."""
  from data_pipelines.skeletons import SYNTHETIC_SKELETONS
  from posebh_jax import visualize
  palettes = {name: set(s.keypoint_colors) | set(s.limb_colors)
              for name, s in SYNTHETIC_SKELETONS.items()}
  for s in SYNTHETIC_SKELETONS.values():
    assert len(s.keypoint_colors) == s.num_keypoints and len(s.limb_colors) == len(s.limbs)
  names = sorted(palettes)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert not palettes[a] & palettes[b], (a, b)
  # Drawn: the same points as synth_coco and as synth_aic give different pixels.
  image = np.zeros((64, 64, 3), np.uint8)
  drawn = {}
  for name in ("synth_coco", "synth_aic"):
    k = SYNTHETIC_SKELETONS[name].num_keypoints
    kpts = np.stack([np.linspace(8, 56, k), np.linspace(8, 56, k), np.ones(k)], axis=1)
    drawn[name] = visualize.draw_poses(image, [dict(skeleton=name, keypoints=kpts)],
                                       draw_boxes=False)
  colours = {n: {tuple(c) for c in d.reshape(-1, 3) if c.any()} for n, d in drawn.items()}
  assert colours["synth_coco"] and colours["synth_aic"]
  assert not {(0, 255, 0), (255, 128, 0)} & colours["synth_aic"]
  assert {(255, 0, 255), (0, 255, 255)} & colours["synth_aic"]
