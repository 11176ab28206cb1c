"""grain pipeline: transform outputs, mixing, per-host shards, iterator restore, global batches."""

import collections

import jax
import numpy as np
import pytest

from data_pipelines import coco_reader, pipeline, transforms
from data_pipelines.skeletons import SYNTH_AIC, SYNTH_AP10K, SYNTH_COCO, SkeletonLayout
from data_pipelines.synthetic import generate

LAYOUT = SkeletonLayout((SYNTH_COCO, SYNTH_AIC, SYNTH_AP10K))
HW, HM = (64, 48), (16, 12)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth")
  files = generate.generate_synthetic_datasets(str(out), num_train=8, num_val=2, seed=1,
                                               image_size=(96, 96))
  recs = []
  for d, skel in enumerate(LAYOUT.skeletons):
    r, _ = coco_reader.read_coco_keypoints(files[skel.name]["train"],
                                           files[skel.name]["image_dir"], skel, d,
                                           image_size_hw=HW)
    recs.append(r)
  return recs


def _cfg(**kw):
  base = dict(layout=LAYOUT, encodings=("udp", "msra", "msra"), image_size_hw=HW,
              heatmap_size_hw=HM)
  base.update(kw)
  return pipeline.TopDownConfig(**base)


def test_train_example_shapes_masks_and_padding(sources):
  t = pipeline.TopDownTrainTransform(_cfg())
  for d in range(3):
    ex = t.random_map(sources[d][0], np.random.default_rng(0))
    k = LAYOUT.num_keypoints[d]
    assert ex["image"].shape == (64, 48, 3) and ex["image"].dtype == np.float32
    assert ex["target"].shape == (17, 16, 12) and ex["target_weight"].shape == (17,)
    assert ex["dataset_index"] == d
    np.testing.assert_array_equal(ex["skeleton_mask"], LAYOUT.skeleton_mask()[d])
    assert np.all(ex["target"][k:] == 0) and np.all(ex["target_weight"][k:] == 0)
    assert ex["target_weight"][:k].sum() > 0


@pytest.mark.parametrize("d", [0, 1])  # UDP and MSRA encodings.
def test_target_peaks_sit_on_the_cropped_keypoints(sources, d):
  cfg = _cfg(flip=False, half_body_prob=0.0, scale_factor=0.0, rot_factor=0.0)
  rec = sources[d][1]
  ex = pipeline.TopDownTrainTransform(cfg).random_map(rec, np.random.default_rng(0))
  use_udp = cfg.use_udp(d)
  trans = transforms.crop_matrix(rec["center"], rec["scale"], 0.0, cfg.image_size_wh, use_udp)
  kp = transforms.affine_points(rec["keypoints"][:, :2], trans)
  stride = (47 / 11, 63 / 15) if use_udp else (4.0, 4.0)
  checked = 0
  for k in np.flatnonzero(ex["target_weight"] > 0):
    hm = ex["target"][k]
    if hm.max() < 0.5:
      continue
    y, x = np.unravel_index(np.argmax(hm), hm.shape)
    assert abs(x * stride[0] - kp[k, 0]) <= stride[0] and abs(y * stride[1] - kp[k, 1]) <= stride[1]
    checked += 1
  assert checked >= 5


def test_mixing_follows_weights_and_batches_are_static(sources):
  ds = pipeline.mixed_train_dataset(sources, [1.0, 1.0, 2.0], _cfg(), batch_size=8, seed=0)
  counts = collections.Counter()
  for i in range(10):
    b = ds[i]
    assert b["image"].shape == (8, 64, 48, 3) and b["target"].shape == (8, 17, 16, 12)
    counts.update(b["dataset_index"].tolist())
  assert counts[2] == pytest.approx(40, abs=4) and counts[0] == pytest.approx(20, abs=4)


def test_per_host_shards_are_disjoint(sources):
  one = [sources[0]]
  seen = []
  for p in range(2):
    ds = pipeline.mixed_train_dataset(one, [1.0], _cfg(), batch_size=1, seed=0,
                                      process_index=p, process_count=2)
    ids = set()
    for i in range(4):  # One epoch of this host's 4 records.
      ids.add(int(ds[i]["image"].sum() * 1000))
    seen.append(ids)
  assert len(seen[0]) == 4 and len(seen[1]) == 4 and not seen[0] & seen[1]


def test_iterator_state_restores_the_same_batches(sources):
  ds = pipeline.mixed_train_dataset(sources, [1.0, 1.0, 1.0], _cfg(), batch_size=4, seed=5)
  it = pipeline.make_iterator(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  it2 = pipeline.make_iterator(ds)
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_global_batch_is_sharded_over_the_data_axis():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = pipeline.to_global_batch(dict(x=np.arange(16, dtype=np.float32).reshape(16, 1)), mesh)
  assert batch["x"].shape == (16, 1)
  assert batch["x"].sharding.spec[0] == "data"
  assert len(batch["x"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch["x"])[:, 0], np.arange(16))


def test_corrupt_or_missing_image_names_file_and_record(sources, tmp_path):
  bad = dict(sources[0][0])
  bad["image_path"] = str(tmp_path / "broken.jpg")
  (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(pipeline.ImageError, match=r"broken.jpg .*ann_id"):
    pipeline.TopDownTrainTransform(_cfg()).random_map(bad, np.random.default_rng(0))
  bad["image_path"] = str(tmp_path / "gone.jpg")
  with pytest.raises(pipeline.ImageError, match="gone.jpg"):
    pipeline.TopDownEvalTransform(_cfg()).map(bad)
