"""Top-down prediction (posebh_jax/evaluation/predict.py): the flip test and decoding against the
numpy reference path and the reference's own test-time outputs, the prototype route, and the
batched host driver (cropping, padding, one compile, one image read per image, mesh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_golden, shared_path
from configs import posebh as posebh_configs
from data_pipelines import coco_reader, datasets, heatmap_codec, pipeline
from posebh_jax import experiment
from posebh_jax.convert.pth_reader import load_pth
from posebh_jax.convert.torch_to_flax import convert_state_dict
from posebh_jax.evaluation import predict
from posebh_jax.objective.prototypes import prototype_heatmap
from posebh_jax.train import sharding as sharding_lib

COCO, AIC, MPII, AP10K, WHOLEBODY = 0, 1, 2, 3, 5


@pytest.fixture(scope="module")
def setup():
  """The tiny_reference config's model, layout and top-down settings (no weights)."""
  config = posebh_configs.get_config("tiny_reference")
  layout = datasets.build_layout(config)
  return config, experiment.build_model(config, layout), datasets.topdown_config(config, layout)


@pytest.fixture(scope="module")
def tiny_weights(setup):
  """The golden tiny PoseBH checkpoint as model variables and prototypes."""
  _, model, _ = setup
  sd = load_pth(shared_path("golden/tiny_posebh.pth"))["state_dict"]
  params, batch_stats, extras = convert_state_dict(sd, model)
  return params, batch_stats, jnp.asarray(extras["kpt_prototypes"])


def _peaks(rng, n, k, h, w) -> np.ndarray:
  """Gaussian bumps (sigma 2) at sub-pixel positions plus small noise: well-conditioned maps."""
  yy, xx = np.mgrid[0:h, 0:w]
  cx = rng.uniform(2, w - 3, (n, k, 1, 1))
  cy = rng.uniform(2, h - 3, (n, k, 1, 1))
  amp = rng.uniform(0.3, 1.0, (n, k, 1, 1))
  maps = amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0)
  return (maps + 0.01 * rng.random((n, k, h, w))).astype(np.float32)


# --- Settings per skeleton -------------------------------------------------------------------

def test_settings_follow_the_config_encoding(setup):
  _, _, td = setup
  coco, aic = predict.skeleton_decoding(td, COCO), predict.skeleton_decoding(td, AIC)
  assert coco.use_udp and not coco.shift_heatmap  # COCO, MPII: UDP + DARK-UDP, no shift.
  assert predict.skeleton_decoding(td, MPII).use_udp
  assert not aic.use_udp and aic.shift_heatmap  # The others: standard + default + shift.
  assert aic.flip_pairs == td.layout.skeletons[AIC].flip_pairs
  wb = predict.skeleton_decoding(td, WHOLEBODY)
  assert (wb.keypoint_offset, wb.num_keypoints) == (17 + 14 + 16 + 17 + 17, 133)
  with pytest.raises(ValueError, match="out of range"):
    predict.skeleton_decoding(td, 6)


# --- Flip test and decoding on random heatmaps ------------------------------------------------

@pytest.mark.parametrize("a", [COCO, AIC, WHOLEBODY])
def test_merge_flipped_matches_numpy_reference(setup, a):
  _, _, td = setup
  dec = predict.skeleton_decoding(td, a)
  rng = np.random.default_rng(a)
  h = rng.random((2, dec.num_keypoints, 8, 6)).astype(np.float32)
  hf = rng.random((2, dec.num_keypoints, 8, 6)).astype(np.float32)
  want = heatmap_codec.flip_back(hf, dec.flip_pairs)
  if a != COCO:  # Standard encoding: shift right by one pixel (spec §5.2 step 4).
    want = heatmap_codec.shift_heatmap_right(want)
  want = (h + want) * 0.5
  got = jax.jit(lambda x, y: predict.merge_flipped(dec, x, y))(h, hf)
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("a", [COCO, AIC])
def test_decoding_matches_numpy_reference(setup, a):
  _, _, td = setup
  dec = predict.skeleton_decoding(td, a)
  rng = np.random.default_rng(10 + a)
  hm = _peaks(rng, 3, dec.num_keypoints, 64, 48)
  center = rng.uniform(100, 400, (3, 2)).astype(np.float32)
  scale = rng.uniform(0.5, 2.0, (3, 2)).astype(np.float32)
  got = np.asarray(jax.jit(lambda *x: predict.heatmaps_to_keypoints(dec, *x))(hm, center, scale))
  coords, maxvals = heatmap_codec.keypoints_from_heatmaps(hm, center, scale, use_udp=dec.use_udp,
                                                   post_process="default", kernel=11)
  assert got.shape == (3, dec.num_keypoints, 3)
  np.testing.assert_allclose(got[..., :2], coords, atol=2e-3)
  np.testing.assert_array_equal(got[..., 2], maxvals[..., 0])


# --- The whole crops → keypoints function on the golden tiny model ------------------------------

@pytest.mark.parametrize("flip", [True, False])
def test_flip_test_reproduces_the_reference_forward_test(setup, tiny_weights, flip):
  """Golden `forward_test` of tiny_posebh.pth: COCO head, UDP, DARK-UDP, flip without shift."""
  _, model, td = setup
  params, batch_stats, _ = tiny_weights
  io = load_golden("tiny_posebh_io.npz")
  pre = "test_flip" if flip else "test_noflip"
  dec = predict.skeleton_decoding(td, COCO)
  crops = io["img"].transpose(0, 2, 3, 1)
  heatmaps = jax.jit(lambda p, b, c: predict.predicted_heatmaps(
      model, dec, p, b, None, c, flip_test=flip))(params, batch_stats, crops)
  np.testing.assert_allclose(heatmaps, io[f"{pre}_output_heatmap"], rtol=0, atol=1e-6)

  fn = predict.make_predict_fn(model, dec, flip_test=flip)
  kp = np.asarray(fn(params, batch_stats, None, crops, io["test_center"], io["test_scale"]))
  want = io[f"{pre}_preds"]
  np.testing.assert_allclose(kp[..., 2], want[..., 2], rtol=1e-5)
  # This random network's log-heatmaps are nearly flat at the peaks (second differences ~1e-4), so
  # the DARK-UDP Newton step amplifies float32 noise: the refined points may move by up to a
  # heatmap pixel between float32 implementations (decode_heatmaps_jax already differs from the
  # numpy reference on these very heatmaps). The heatmaps above are the tight check.
  pixel = io["test_scale"] * 200.0 / (np.array(dec.heatmap_size_wh) - 1.0)
  assert np.all(np.abs(kp[..., :2] - want[..., :2]) < pixel[:, None, :])


def _numpy_flip_test(model, dec, params, batch_stats, crops, flip, through, prototypes=None):
  """The reference path: two separate forwards, numpy flip_back/shift/average."""
  def heat(images):
    out = model.apply({"params": params, "batch_stats": batch_stats}, jnp.asarray(images),
                      jnp.full((len(images),), dec.index, jnp.int32), train=False)
    if through == "head":
      return np.asarray(out.heatmaps[dec.index])
    full = np.asarray(prototype_heatmap(out.embedding, prototypes))  # All 214 keypoints.
    return full[:, dec.keypoint_offset:dec.keypoint_offset + dec.num_keypoints]
  h = heat(crops)
  if not flip:
    return h
  hf = heatmap_codec.flip_back(heat(np.ascontiguousarray(crops[:, :, ::-1])), dec.flip_pairs)
  if dec.shift_heatmap:
    hf = heatmap_codec.shift_heatmap_right(hf)
  return (h + hf) * 0.5


@pytest.mark.parametrize("a,through", [(AIC, "head"), (AP10K, "head"), (AP10K, "prototypes"),
                                       (COCO, "prototypes")])
def test_predict_matches_numpy_path(setup, tiny_weights, a, through):
  """Standard-encoding heads (shifted flip test) and the prototype route vs the numpy path."""
  _, model, td = setup
  params, batch_stats, prototypes = tiny_weights
  dec = predict.skeleton_decoding(td, a)
  rng = np.random.default_rng(a)
  crops = rng.standard_normal((2, 256, 192, 3)).astype(np.float32)
  center = np.array([[200.0, 150.0], [320.0, 240.0]], np.float32)
  scale = np.array([[1.0, 1.3333334], [0.6, 0.8]], np.float32)
  want_hm = _numpy_flip_test(model, dec, params, batch_stats, crops, True, through, prototypes)
  got_hm = jax.jit(lambda p, b, pr, c: predict.predicted_heatmaps(
      model, dec, p, b, pr, c, through=through))(params, batch_stats, prototypes, crops)
  np.testing.assert_allclose(got_hm, want_hm, rtol=0, atol=2e-6)

  fn = predict.make_predict_fn(model, dec, through=through)
  kp = np.asarray(fn(params, batch_stats, prototypes, crops, center, scale))
  coords, maxvals = heatmap_codec.keypoints_from_heatmaps(want_hm, center, scale, use_udp=dec.use_udp,
                                                   post_process="default")
  np.testing.assert_allclose(kp[..., 2], maxvals[..., 0], atol=2e-6)
  if dec.use_udp:  # DARK-UDP on untrained maps: within a heatmap pixel (see the golden test).
    pixel = scale * 200.0 / (np.array(dec.heatmap_size_wh) - 1.0)
    close = np.all(np.abs(kp[..., :2] - coords) < pixel[:, None, :], axis=-1)
  else:
    close = np.all(np.abs(kp[..., :2] - coords) <= 1e-3, axis=-1)
  # Untrained prototype maps are flat: two peaks can lie within the heatmaps' 2e-6 agreement,
  # and the two argmaxes then pick different ones. Elsewhere the keypoint must be at a maximum.
  for n, k in zip(*np.nonzero(~close)):
    _assert_at_a_maximum(kp[n, k, :2], want_hm[n, k], center[n], scale[n], dec.use_udp)


def test_prototype_route_needs_prototypes(setup, tiny_weights):
  _, model, td = setup
  params, batch_stats, _ = tiny_weights
  fn = predict.make_predict_fn(model, predict.skeleton_decoding(td, COCO), through="prototypes")
  crops, box = np.zeros((1, 256, 192, 3), np.float32), np.ones((1, 2), np.float32)
  with pytest.raises(ValueError, match="needs a model with a prototype head and prototypes"):
    fn(params, batch_stats, None, crops, box, box)
  with pytest.raises(ValueError, match="through='proto'"):
    predict.make_predict_fn(model, predict.skeleton_decoding(td, COCO), through="proto")


# --- The host driver -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco_records(setup):
  config, _, td = setup
  root = shared_path("data/samples/coco")
  records, _ = coco_reader.read_coco_keypoints(
      str(root / "test_coco.json"), str(root), td.layout.skeletons[COCO], COCO,
      image_size_hw=tuple(config.data.image_size))
  assert len(records) > 5
  # What a detector-box record adds (spec §5.4): a score per box and the box's category.
  for i, r in enumerate(records):
    r["bbox_score"] = 0.5 + 0.01 * i
  return records


@pytest.mark.parametrize("a", [COCO, AIC])
def test_driver_crops_like_the_eval_transform(setup, coco_records, a):
  _, model, td = setup
  predictor = predict.TopDownPredictor(model, td, batch_size=4)
  transform = pipeline.TopDownEvalTransform(td, use_udp=td.use_udp(a))
  batches = list(predictor.record_batches(coco_records, a))
  assert [len(b[0]) for b in batches[:-1]] == [4] * (len(batches) - 1)
  crops = np.concatenate([b[0] for b in batches])
  want = np.stack([transform.map(r)["image"] for r in coco_records])
  np.testing.assert_array_equal(crops, want)
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]),
                                np.stack([r["center"] for r in coco_records]))


def test_driver_predictions(setup, tiny_weights, coco_records, monkeypatch):
  _, model, td = setup
  params, batch_stats, _ = tiny_weights
  reads = []
  real_load = pipeline.load_image
  monkeypatch.setattr(pipeline, "load_image", lambda r: reads.append(r["image_path"]) or
                      real_load(r))
  predictor = predict.TopDownPredictor(model, td, batch_size=4, flip_test=True)
  preds = predictor.predict_records(params, batch_stats, None, coco_records, AIC)
  assert len(preds) == len(coco_records)  # The padded tail is dropped.
  # Each image is decoded once for its consecutive records.
  runs = sum(1 for i, r in enumerate(coco_records)
             if i == 0 or r["image_path"] != coco_records[i - 1]["image_path"])
  assert len(reads) == runs < len(coco_records)
  # One compilation for full and padded batches alike.
  assert predictor.predict_fn(AIC)._cache_size() == 1

  # Same numbers as the jitted function on the eval transform's crops, one instance at a time.
  transform = pipeline.TopDownEvalTransform(td, use_udp=False)
  fn = predict.make_predict_fn(model, predict.skeleton_decoding(td, AIC))
  for i in (0, len(coco_records) - 1):
    r = coco_records[i]
    one = np.asarray(fn(params, batch_stats, None, transform.map(r)["image"][None],
                        r["center"][None], r["scale"][None]))[0]
    np.testing.assert_allclose(preds[i]["keypoints"], one, atol=1e-3)

  p = preds[3]
  r = coco_records[3]
  assert p["keypoints"].shape == (14, 3) and p["keypoints"].dtype == np.float32
  assert (p["image_id"], p["ann_id"], p["bbox_id"], p["category_id"]) == (
      r["image_id"], r["ann_id"], r.get("bbox_id", 3), 1)  # The record's, else its position.
  assert p["bbox_score"] == pytest.approx(0.53)
  assert p["area"] == pytest.approx(float(np.prod(r["scale"])) * 200.0**2)
  np.testing.assert_array_equal(p["center"], r["center"])
  # Keypoints land near their box (a weak but real check of the back-projection).
  x, y, w, h = r["bbox"]
  inside = ((p["keypoints"][:, 0] > x - w) & (p["keypoints"][:, 0] < x + 2 * w) &
            (p["keypoints"][:, 1] > y - h) & (p["keypoints"][:, 1] < y + 2 * h))
  assert inside.all()


def test_driver_on_a_mesh_matches_one_device(setup, tiny_weights, coco_records):
  _, model, td = setup
  params, batch_stats, _ = tiny_weights
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rep = sharding_lib.replicated(mesh)
  placed = jax.device_put((params, batch_stats), rep)
  records = coco_records[:5]
  sharded = predict.TopDownPredictor(model, td, batch_size=8, mesh=mesh).predict_records(
      *placed, None, records, AP10K)
  single = predict.TopDownPredictor(model, td, batch_size=8).predict_records(
      params, batch_stats, None, records, AP10K)
  for s, o in zip(sharded, single):
    np.testing.assert_allclose(s["keypoints"], o["keypoints"], atol=1e-3)
  with pytest.raises(ValueError, match="not divisible by 8 devices"):
    predict.TopDownPredictor(model, td, batch_size=6, mesh=mesh)


def test_driver_names_a_missing_image(setup, tiny_weights, coco_records, tmp_path):
  _, model, td = setup
  params, batch_stats, _ = tiny_weights
  bad = dict(coco_records[0], image_path=str(tmp_path / "gone.jpg"))
  with pytest.raises(pipeline.ImageError, match="gone.jpg.*image_id"):
    predict.TopDownPredictor(model, td, batch_size=2).predict_records(
        params, batch_stats, None, [bad], COCO)


def _assert_at_a_maximum(xy, heatmap, center, scale, use_udp, tol=1e-5):
  """`xy` (image px) back-projects into a heatmap pixel whose 3×3 neighbourhood (the DARK/
  quarter-offset refinement moves less than a pixel) holds a value within `tol` of the max."""
  h, w = heatmap.shape
  size = np.array([w - 1.0, h - 1.0]) if use_udp else np.array([float(w), float(h)])
  hm_xy = (np.asarray(xy, np.float64) - center + scale * 100.0) / (scale * 200.0) * size
  x, y = np.clip(np.round(hm_xy).astype(int), 0, [w - 1, h - 1])
  patch = heatmap[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
  assert patch.max() >= heatmap.max() - tol, (xy, hm_xy, patch.max(), heatmap.max())
