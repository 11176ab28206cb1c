"""jax.export of the crops → keypoints function (posebh_jax/export.py): saved, reloaded without
the model code, and giving the live function's keypoints (the golden tiny reference model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_golden, shared_path
from configs import posebh as posebh_configs
from posebh_jax import export, inference
from posebh_jax.evaluation import predict as predict_lib


@pytest.fixture(scope="module")
def predictor(tiny_weights):
  config = posebh_configs.get_config("tiny_reference")
  return inference.Predictor.from_checkpoint(config, tiny_weights, batch_size=4)


def _live(predictor, skeleton, through, crops, center, scale):
  a = predictor.skeleton_index(skeleton)
  fn = predict_lib.make_predict_fn(predictor.model, predictor.core.decoding(a), through=through)
  return np.asarray(fn(predictor.params, predictor.batch_stats, predictor.prototypes, crops,
                       center, scale))


def _sample_crops(predictor, skeleton, boxes):
  """Normalised crops of boxes on a COCO sample image, with a's affine."""
  rgb = inference.read_rgb(shared_path("data/samples/coco/000000000785.jpg"))
  dec = predictor.core.decoding(predictor.skeleton_index(skeleton))
  from data_pipelines import transforms
  cs = [transforms.box_to_center_scale(b, 192 / 256, padding=1.25) for b in boxes]
  crops = np.stack([predict_lib.crop_instance(rgb, c, s, dec) for c, s in cs])
  return crops, np.stack([c for c, _ in cs]), np.stack([s for _, s in cs])


def test_coco_head_round_trip_on_the_golden_crops(predictor, tmp_path):
  """UDP + DARK-UDP + flip: reloaded == live exactly, for two batch sizes of one artifact."""
  io = load_golden("tiny_posebh_io.npz")
  crops = io["img"].transpose(0, 2, 3, 1)
  path = export.export_skeleton(predictor, "coco", tmp_path / "coco_head.npz")
  loaded = export.load_exported(path)
  got = np.asarray(loaded(crops, io["test_center"], io["test_scale"]))
  live = _live(predictor, "coco", "head", crops, io["test_center"], io["test_scale"])
  np.testing.assert_array_equal(got, live)
  # And the reference's own forward_test scores (positions: see test_predict's DARK note).
  np.testing.assert_allclose(got[..., 2], io["test_flip_preds"][..., 2], rtol=1e-5)
  one = np.asarray(loaded(crops[1:], io["test_center"][1:], io["test_scale"][1:]))
  np.testing.assert_array_equal(one, live[1:])  # Symbolic batch: a batch of 1 runs too.
  meta = loaded.meta
  assert (meta["skeleton"], meta["num_keypoints"], meta["through"]) == ("coco", 17, "head")
  assert meta["input_shape"] == ["b", 256, 192, 3] and meta["crop"]["affine"] == "udp"
  assert len(meta["keypoint_names"]) == 17 and meta["flip_test"] is True


def test_prototype_route_standard_encoding_round_trip(predictor, tmp_path):
  """AIC through the prototypes (standard affine, shifted flip), real crops, batch 3."""
  crops, center, scale = _sample_crops(
      predictor, "aic", [[200, 40, 180, 370], [10, 20, 100, 200], [300, 100, 150, 150]])
  path = export.export_skeleton(predictor, "aic", tmp_path / "aic_protos.npz",
                                through="prototypes")
  got = np.asarray(export.load_exported(path)(crops, center, scale))
  assert got.shape == (3, 14, 3)
  np.testing.assert_array_equal(got, _live(predictor, "aic", "prototypes", crops, center, scale))


def test_fixed_batch_export_and_bad_files(predictor, tmp_path):
  crops, center, scale = _sample_crops(predictor, "ap10k", [[200, 40, 180, 370]] * 2)
  path = export.export_skeleton(predictor, "ap10k", tmp_path / "ap10k.npz", batch_size=2)
  loaded = export.load_exported(path)
  assert loaded.meta["input_shape"][0] == 2
  np.testing.assert_array_equal(np.asarray(loaded(crops, center, scale)),
                                _live(predictor, "ap10k", "head", crops, center, scale))
  with pytest.raises(Exception, match="shape"):  # Fixed at 2: a batch of 1 is refused.
    loaded(crops[:1], center[:1], scale[:1])
  with pytest.raises(FileNotFoundError, match="nothing.npz"):
    export.load_exported(tmp_path / "nothing.npz")
  other = tmp_path / "other.npz"
  np.savez(other, meta=np.frombuffer(json.dumps({"format": "x"}).encode(), np.uint8))
  with pytest.raises(ValueError, match="other.npz is not an exported"):
    export.load_exported(other)
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="garbage.npz is not an exported"):
    export.load_exported(garbage)
