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


def test_new_skeleton_from_config_entry():
  skel = SkeletonInfo.from_dict(dict(
      name="three", keypoint_names=("left_a", "right_a", "mid"), swap=("right_a", "left_a", ""),
      sigmas=(0.1, 0.1, 0.2), upper_body=(True, True, False)))
  assert skel.flip_pairs == ((0, 1),)
  assert skel.lower_body_ids == (2,)


@pytest.mark.parametrize("bad", [
    dict(swap=("right_a", "nope", "")),
    dict(sigmas=(0.1,)),
    dict(keypoint_names=("a", "a", "b"), swap=("", "", "")),
])
def test_invalid_skeletons_fail_loudly(bad):
  base = dict(name="x", keypoint_names=("left_a", "right_a", "mid"),
              swap=("right_a", "left_a", ""), sigmas=(0.1, 0.1, 0.2),
              upper_body=(True, True, False))
  base.update(bad)
  with pytest.raises(ValueError, match="skeleton 'x'"):
    SkeletonInfo.from_dict(base)


def test_unknown_skeleton_names_the_known_ones():
  with pytest.raises(KeyError, match="synth_coco"):
    skeletons.get_skeleton("nope")
