"""The inference API (posebh_jax/inference.py) on the converted tiny reference checkpoint:
any skeleton on any image through its expert and head or through the prototypes, boxes vs the
whole image, geometry of the back-projection, loading converted weights and workdirs, and the
errors for bad input."""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_path
from configs import posebh as posebh_configs
from data_pipelines import datasets, pipeline
from posebh_jax import experiment, inference
from posebh_jax.evaluation import predict as predict_lib
from posebh_jax.train.checkpoint import CheckpointMismatchError

# Keypoint counts of the tiny reference model's six skeletons, in dataset order.
COUNTS = dict(coco=17, aic=14, mpii=16, ap10k=17, apt36k=17, coco_wholebody=133)
COCO_IMAGE = "data/samples/coco/000000000785.jpg"


@pytest.fixture(scope="module")
def config():
  return posebh_configs.get_config("tiny_reference")


@pytest.fixture(scope="module")
def predictor(config, tiny_weights):
  return inference.Predictor.from_checkpoint(config, tiny_weights, batch_size=4)


@pytest.fixture(scope="module")
def coco_rgb():
  return inference.read_rgb(shared_path(COCO_IMAGE))


# --- Any skeleton, both routes ------------------------------------------------------------------

def test_every_skeleton_on_a_coco_image_through_both_routes(predictor, coco_rgb):
  boxes = [[200.0, 40.0, 180.0, 370.0]]
  out = {}
  for through in ("head", "prototypes"):
    poses = predictor.predict(coco_rgb, boxes, through=through)
    assert [p["skeleton"] for p in poses] == list(COUNTS)  # Default: all, in dataset order.
    for p in poses:
      k = COUNTS[p["skeleton"]]
      assert p["keypoints"].shape == (k, 3) and p["keypoints"].dtype == np.float32
      assert len(p["keypoint_names"]) == k and p["through"] == through
      assert np.isfinite(p["keypoints"]).all()
      # The perturbed reference heads have positive maxima (golden README), so every score > 0.
      assert (p["keypoints"][:, 2] > 0).all()
      out[through, p["skeleton"]] = p["keypoints"]
  for name in COUNTS:  # Two different heatmap sources: head a vs a's prototype heatmaps.
    assert not np.allclose(out["head", name], out["prototypes", name])
  wb = out["head", "coco_wholebody"]
  # The crops are box-centred: most keypoints land near the box (untrained heads still peak
  # inside the crop, which spans the padded box).
  assert np.median(wb[:, 0]) == pytest.approx(290, abs=150)


def test_skeleton_names_dataset_or_skeleton_and_one_string(predictor, coco_rgb):
  one = predictor.predict(coco_rgb, skeletons="ap10k")
  assert [p["skeleton"] for p in one] == ["ap10k"] and one[0]["skeleton_type"] == "ap10k"
  assert predictor.skeleton_index("coco_wholebody") == 5


def test_head_route_runs_the_skeletons_expert_and_head(predictor, coco_rgb, config):
  """AP-10K keypoints on a COCO image: expert 3 and head 3; another expert changes them."""
  box = [[150.0, 30.0, 300.0, 380.0]]
  own = predictor.predict(coco_rgb, box, "ap10k")[0]["keypoints"]
  via_coco_expert = predictor.predict(coco_rgb, box, "ap10k", expert="coco")[0]["keypoints"]
  assert not np.allclose(own, via_coco_expert)
  # Independently: head 3's heatmaps of expert 3 on the same standard-affine crop, decoded.
  a = predictor.skeleton_index("ap10k")
  dec = predictor.core.decoding(a)
  center, scale = _center_scale(config, box[0])
  crop = predict_lib.crop_instance(coco_rgb, center, scale, dec)[None]
  variables = {"params": predictor.params, "batch_stats": predictor.batch_stats}
  heads = predictor.model.apply(variables, jnp.concatenate([crop, crop[:, :, ::-1]]),
                                jnp.full((2,), a, jnp.int32), train=False).heatmaps
  heatmaps = predict_lib.merge_flipped(dec, heads[a][:1], heads[a][1:])
  want = predict_lib.heatmaps_to_keypoints(dec, heatmaps, center[None], scale[None])[0]
  np.testing.assert_allclose(own, np.asarray(want), atol=1e-4)


def test_prototype_route_reads_only_the_skeletons_prototype_slice(predictor, coco_rgb, config):
  box = [[150.0, 30.0, 300.0, 380.0]]
  protos = np.asarray(predictor.prototypes)
  start = predictor.layout.offsets[5]  # WholeBody's 133 prototypes are the last rows.
  assert start + 133 == protos.shape[0]
  others = protos.copy()
  others[:start] = np.random.default_rng(0).standard_normal(others[:start].shape)
  mine = protos.copy()
  mine[start:] = mine[start:][::-1]  # Reversed keypoint order inside the slice.

  def with_protos(p, flip_test=True):
    q = inference.Predictor(config, predictor.params, predictor.batch_stats, jnp.asarray(p),
                            batch_size=4, flip_test=flip_test)
    return q.predict(coco_rgb, box, "coco_wholebody", through="prototypes")[0]["keypoints"]
  np.testing.assert_array_equal(with_protos(others), with_protos(protos))
  # Without the flip test (whose flip pairs would not follow the reversal): reversed outputs.
  np.testing.assert_allclose(with_protos(mine, False), with_protos(protos, False)[::-1],
                             atol=1e-4)


# --- Boxes --------------------------------------------------------------------------------------

def _center_scale(config, box):
  w, h = config.data.image_size[1], config.data.image_size[0]
  from data_pipelines import transforms
  return transforms.box_to_center_scale(box, w / h, padding=config.data.bbox_padding)


def test_no_boxes_is_the_whole_image(predictor, coco_rgb):
  h, w = coco_rgb.shape[:2]
  whole = predictor.predict(coco_rgb, None, ["coco", "aic"])
  boxed = predictor.predict(coco_rgb, [[0, 0, w, h]], ["coco", "aic"])
  assert len(whole) == 2
  for a, b in zip(whole, boxed):
    np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
    np.testing.assert_array_equal(a["box"], [0, 0, w, h])


def test_many_boxes_batch_and_pad_like_one_at_a_time(predictor, coco_rgb):
  """5 boxes with batch_size 4: two forward passes, the second padded; box-major output. One
  box alone runs at batch 1 (another compilation): equal up to float32 rounding."""
  boxes = [[10, 20, 100, 200], [200, 40, 180, 370, 0.7], [300, 100, 50, 50], [0, 0, 640, 425],
           [500, 300, 120, 100]]
  poses = predictor.predict(coco_rgb, boxes, ["coco", "mpii"])
  assert [(p["instance"], p["skeleton"]) for p in poses] == [
      (i, s) for i in range(5) for s in ("coco", "mpii")]
  assert poses[2]["box_score"] == pytest.approx(0.7) and poses[0]["box_score"] == 1.0
  for i, box in enumerate(boxes):
    alone = predictor.predict(coco_rgb, [box], ["coco", "mpii"])
    for j in range(2):
      np.testing.assert_allclose(poses[2 * i + j]["keypoints"], alone[j]["keypoints"],
                                 atol=1e-4)


def test_few_boxes_run_at_a_power_of_two_batch(config, predictor):
  q = inference.Predictor(config, predictor.params, predictor.batch_stats, predictor.prototypes,
                          batch_size=8)
  assert [q.core_for(n).batch_size for n in (1, 2, 3, 4, 5, 8, 9, 30)] == [1, 2, 4, 4, 8, 8, 8, 8]
  assert q.core_for(3) is q.core_for(4) and q.core_for(8) is q.core
  assert q.core_for(3).flip_test is True


@pytest.mark.parametrize("skeleton", ["coco", "aic"])  # UDP and standard back-projection.
def test_keypoints_follow_the_image_when_it_is_shifted(predictor, coco_rgb, skeleton):
  """Padding the image by (dx, dy) and shifting the box by the same amount gives the same crop
  (warpAffine fills with zeros outside, like the padding), so the keypoints move by (dx, dy)."""
  dx, dy = 37, 21
  padded = np.zeros((coco_rgb.shape[0] + dy, coco_rgb.shape[1] + dx, 3), np.uint8)
  padded[dy:, dx:] = coco_rgb
  box = [220.0, 60.0, 150.0, 300.0]
  base = predictor.predict(coco_rgb, [box], skeleton)[0]["keypoints"]
  moved = predictor.predict(padded, [[box[0] + dx, box[1] + dy] + box[2:]], skeleton)
  moved = moved[0]["keypoints"]
  np.testing.assert_allclose(moved[:, 0] - dx, base[:, 0], atol=0.05)
  np.testing.assert_allclose(moved[:, 1] - dy, base[:, 1], atol=0.05)
  np.testing.assert_allclose(moved[:, 2], base[:, 2], atol=1e-5)


def test_no_boxes_at_all_gives_no_instances(predictor, coco_rgb):
  assert predictor.predict(coco_rgb, [], ["coco"]) == []


# --- Loading ------------------------------------------------------------------------------------

def test_workdir_checkpoint_restores_the_saved_variables(config, predictor, coco_rgb, tmp_path):
  """A workdir checkpoint whose train state holds the converted variables (the rest zeros:
  building it from the abstract state avoids compiling the train-state init) restores to
  exactly those variables and predicts what the converted weights predict."""
  from posebh_jax.train import checkpoint as checkpoint_lib
  from posebh_jax.train import loop
  from posebh_jax.train import sharding as sharding_lib
  layout = datasets.build_layout(config)
  model = experiment.build_model(config, layout)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  _, abstract, _, _ = loop.abstract_train_state(config, model, layout, mesh)

  def fill(a):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.device_put(jax.random.key(0), a.sharding)
    return jax.device_put(np.zeros(a.shape, a.dtype), a.sharding)
  put = lambda tree, like: jax.tree_util.tree_map(
      lambda x, a: jax.device_put(np.asarray(x), a.sharding), tree, like)
  state = jax.tree_util.tree_map(fill, abstract).replace(
      params=put(predictor.params, abstract.params),
      batch_stats=put(predictor.batch_stats, abstract.batch_stats),
      prototypes=put(predictor.prototypes, abstract.prototypes))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(7, state, None, experiment.checkpoint_meta(config, layout))
  ckpt.close()
  loaded = inference.Predictor.from_checkpoint(config, str(tmp_path), batch_size=4)
  for got, want in ((loaded.params, predictor.params),
                    (loaded.batch_stats, predictor.batch_stats),
                    (loaded.prototypes, predictor.prototypes)):
    jax.tree_util.tree_map(lambda g, w: np.testing.assert_array_equal(np.asarray(g),
                                                                      np.asarray(w)), got, want)
  np.testing.assert_array_equal(loaded.predict(coco_rgb, None, "coco")[0]["keypoints"],
                                predictor.predict(coco_rgb, None, "coco")[0]["keypoints"])
  with pytest.raises(FileNotFoundError, match="step 3"):
    inference.Predictor.from_checkpoint(config, str(tmp_path), step=3)
  with pytest.raises(CheckpointMismatchError, match="another model"):
    inference.Predictor.from_checkpoint(posebh_configs.get_config("tiny"), str(tmp_path))


def test_loading_refuses_missing_and_foreign_weights(tiny_weights, tmp_path):
  config = posebh_configs.get_config("tiny_reference")
  with pytest.raises(FileNotFoundError, match="neither converted weights"):
    inference.Predictor.from_checkpoint(config, str(tmp_path))
  with pytest.raises(ValueError, match="step selects a workdir"):
    inference.Predictor.from_checkpoint(config, tiny_weights, step=1)
  other = posebh_configs.get_config("tiny")  # Another model: sizes differ.
  with pytest.raises(CheckpointMismatchError):
    inference.Predictor.from_checkpoint(other, tiny_weights)


# --- Bad input ----------------------------------------------------------------------------------

def test_bad_images_are_named(predictor, tmp_path):
  missing = tmp_path / "nowhere.jpg"
  with pytest.raises(pipeline.ImageError, match="nowhere.jpg"):
    predictor.predict(str(missing))
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  with pytest.raises(pipeline.ImageError, match="corrupt.jpg"):
    predictor.predict(corrupt)
  with pytest.raises(ValueError, match="RGB uint8"):
    predictor.predict(np.zeros((32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="RGB uint8"):
    predictor.predict(np.zeros((32, 32, 4), np.uint8))


def test_unknown_skeleton_lists_the_known_ones(predictor, coco_rgb):
  with pytest.raises(inference.UnknownSkeletonError, match=r"'crowdpose'.*coco_wholebody"):
    predictor.predict(coco_rgb, None, ["coco", "crowdpose"])


@pytest.mark.parametrize("box,match", [
    ([10, 10, 0, 50], "box 1: box width and height must be positive"),
    ([10, 10, 50, -1], "box 1: box width and height must be positive"),
    ([10, 10, 50], "box 1: expected 4 or 5 finite numbers"),
    ([10, 10, 50, float("nan")], "box 1: expected 4 or 5 finite numbers"),
    (["a", 1, 2, 3], "box 1: expected"),
    ([[1, 2], [3]], "box 1: expected"),
])
def test_bad_boxes_are_named(predictor, coco_rgb, box, match):
  with pytest.raises(ValueError, match=match):
    predictor.predict(coco_rgb, [[0, 0, 10, 10], box], ["coco"])


def test_grayscale_arrays_are_accepted(predictor, coco_rgb):
  gray = cv2.cvtColor(coco_rgb, cv2.COLOR_RGB2GRAY)
  poses = predictor.predict(gray, None, ["coco"])
  assert poses[0]["keypoints"].shape == (17, 3)


def test_untrained_model_has_the_checkpoints_structure(config, predictor, coco_rgb):
  fresh = inference.Predictor.from_init(config, seed=1, batch_size=4)
  shapes = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), t)
  for got, want in ((fresh.params, predictor.params), (fresh.batch_stats, predictor.batch_stats),
                    (fresh.prototypes, predictor.prototypes)):
    assert shapes(got) == shapes(want)
  poses = fresh.predict(coco_rgb, None, "aic", through="prototypes")
  assert poses[0]["keypoints"].shape == (14, 3)


def test_on_a_mesh_of_8_devices_matches_one_device(config, tiny_weights, predictor, coco_rgb):
  from posebh_jax.train import sharding as sharding_lib
  if len(jax.devices()) < 8:
    pytest.fail("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:8])
  sharded = inference.Predictor.from_checkpoint(config, tiny_weights, batch_size=8, mesh=mesh)
  boxes = [[10, 20, 100, 200], [200, 40, 180, 370], [300, 100, 50, 50]]
  assert sharded.core_for(3) is sharded.core  # A mesh always runs the full, divisible batch.
  got = sharded.predict(coco_rgb, boxes, "aic")
  want = predictor.predict(coco_rgb, boxes, "aic")
  for g, w in zip(got, want):
    np.testing.assert_allclose(g["keypoints"], w["keypoints"], atol=1e-4)
