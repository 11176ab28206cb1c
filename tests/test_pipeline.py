"""grain pipeline: transform outputs, mixing, per-host shards, iterator restore, global batches.

The real-sample tests check the whole training chain against spec §4.4 step by step (a literal
reference-order chain built from the golden-tested `transforms` pieces), with the per-dataset
settings of spec §4.1 (UDP for COCO and MPII, no half-body for MPII) and K = 14/16/17/133.
"""

import collections
import json
import logging
import re

import cv2
import jax
import numpy as np
import pytest
from absl import flags

from conftest import shared_path
from data_pipelines import coco_reader, device_targets, heatmap_codec, pipeline, readers, transforms
from data_pipelines.skeletons import (SYNTH_AIC, SYNTH_AP10K, SYNTH_COCO, SkeletonLayout,
                                      get_skeleton)
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


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_restores_the_same_batches(sources, num_workers):
  if num_workers and not flags.FLAGS.is_parsed():
    # grain's workers read absl flags; the application parses them (pipeline.make_iterator).
    with pytest.raises(RuntimeError, match="not parsed"):
      pipeline.make_iterator(pipeline.mixed_train_dataset(sources, [1.0, 1.0, 1.0], _cfg(),
                                                          batch_size=4, seed=5), num_workers=2)
    flags.FLAGS.mark_as_parsed()
  ds = pipeline.mixed_train_dataset(sources, [1.0, 1.0, 1.0], _cfg(), batch_size=4, seed=5)
  it = pipeline.make_iterator(ds, num_workers=num_workers)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # As the checkpoint stores it (JSON).
  expected = [next(it) for _ in range(2)]
  it.close()
  it2 = pipeline.make_iterator(ds, num_workers=num_workers)
  it2.set_state(state)
  got = [next(it2) for _ in range(2)]
  it2.close()
  for want, have, direct in zip(expected, got, (ds[3], ds[4])):
    for k in want:
      np.testing.assert_array_equal(have[k], want[k])
      np.testing.assert_array_equal(have[k], direct[k])  # Batch i is a pure function of i.


def test_global_batch_is_sharded_over_the_data_axis():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = pipeline.to_global_batch(dict(x=np.arange(16, dtype=np.float32).reshape(16, 1)), mesh)
  assert batch["x"].shape == (16, 1)
  assert batch["x"].sharding.spec[0] == "data"
  assert len(batch["x"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch["x"])[:, 0], np.arange(16))


def test_host_rows_of_the_global_batch_do_not_depend_on_the_host_count(sources):
  # Hosts that each materialise their rows of every global batch together feed exactly the
  # batches one host makes: same samples, order and augmentation (per global sample index).
  kw = dict(batch_size=6, seed=3)
  whole = pipeline.mixed_train_dataset(sources, None, _cfg(), **kw)
  for split in ([[0, 1, 2], [3, 4, 5]], [[0, 1], [2, 3], [4, 5]], [[0, 2, 4], [1, 3, 5]]):
    hosts = [pipeline.mixed_train_dataset(sources, None, _cfg(), rows=r, **kw) for r in split]
    for i in (0, 1, 4):
      want = whole[i]
      for k in want:
        have = np.empty_like(want[k])
        for rows, ds in zip(split, hosts):
          have[rows] = ds[i][k]
        np.testing.assert_array_equal(have, want[k], err_msg=f"batch {i} {k} split {split}")


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1)])
def test_one_batch_sharding_places_every_row_once(shape):
  # Placement and compute share `pipeline.batch_sharding` (data x fsdp): a data=1, fsdp=8 mesh
  # keeps all 16 rows and gives each device its own 2.
  from posebh_jax.train import sharding
  import ml_collections
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=shape[0], fsdp=shape[1])))
  assert pipeline.host_batch_rows(16, mesh) == list(range(16))
  batch = pipeline.to_global_batch(dict(x=np.arange(16, dtype=np.float32).reshape(16, 1)), mesh)
  assert batch["x"].shape == (16, 1) and batch["x"].sharding == pipeline.batch_sharding(mesh)
  assert sorted(tuple(np.asarray(s.data)[:, 0]) for s in batch["x"].addressable_shards) == [
      (2 * i, 2 * i + 1) for i in range(8)]


def test_multi_process_mesh_must_use_every_device():
  # 2 hosts x 2 devices with mesh.data=2: host 1 would feed no device (and an obscure failure
  # follow); refused in one line that says what to set.
  import types
  import ml_collections
  from posebh_jax.train import sharding
  devices = [types.SimpleNamespace(id=i, process_index=i // 2) for i in range(4)]
  with pytest.raises(ValueError, match=r"mesh.data=2 x mesh.fsdp=1 = 2 devices, but a "
                     r"multi-process mesh must use all 4 devices of its 2 processes"):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1)), devices)


def test_corrupt_or_missing_image_names_file_and_record(sources, tmp_path, caplog):
  bad = dict(sources[0][0])
  bad["image_path"] = str(tmp_path / "broken.jpg")
  (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
  # Training: a counted skip (a blank, zero-weight stand-in flagged `skipped`), logged by name.
  with caplog.at_level(logging.WARNING, logger="posebh"):
    ex = pipeline.TopDownTrainTransform(_cfg()).random_map(bad, np.random.default_rng(0))
  assert ex["skipped"] == 1 and not ex["target_weight"].any() and not ex["image"].any()
  assert re.search(r"skipping a training sample: cannot decode image .*broken.jpg .*ann_id",
                   caplog.text)
  good = pipeline.TopDownTrainTransform(_cfg()).random_map(sources[0][0], np.random.default_rng(0))
  assert good["skipped"] == 0 and set(good) == set(ex)
  # Evaluation: a clear error naming the file.
  bad["image_path"] = str(tmp_path / "gone.jpg")
  with pytest.raises(pipeline.ImageError, match="gone.jpg"):
    pipeline.TopDownEvalTransform(_cfg()).map(bad)


def test_image_bytes_records_decode_like_paths_and_name_the_record(sources, tmp_path):
  rec = sources[0][0]
  with open(rec["image_path"], "rb") as f:
    data = f.read()
  as_bytes = {k: v for k, v in rec.items() if k != "image_path"}
  as_bytes["image_bytes"] = data
  np.testing.assert_array_equal(pipeline.load_image(as_bytes), pipeline.load_image(rec))
  # A 0-d object array, as a data source may hand the bytes over, decodes the same.
  as_array = dict(as_bytes, image_bytes=np.array(data, dtype=object))
  np.testing.assert_array_equal(pipeline.load_image(as_array), pipeline.load_image(rec))
  t = pipeline.TopDownTrainTransform(_cfg())
  a = t.random_map(as_bytes, np.random.default_rng(3))
  b = t.random_map(rec, np.random.default_rng(3))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  for bad in (data[: len(data) // 8] + b"\0" * 16, b"not an image", b""):
    with pytest.raises(pipeline.ImageError, match=rf"cannot decode .*ann_id {rec['ann_id']}"):
      pipeline.load_image(dict(as_bytes, image_bytes=bad, image_path="shard-3/img.jpg"))
  with pytest.raises(pipeline.ImageError, match="without image_path or image_bytes"):
    pipeline.load_image({"dataset_index": 0, "ann_id": 7})


def test_config_validates_per_dataset_settings():
  cfg = _cfg(half_body=(True, False, True))
  assert [cfg.use_half_body(d) for d in range(3)] == [True, False, True]
  assert all(_cfg().use_half_body(d) for d in range(3))  # Default: every dataset.
  assert not _cfg(half_body_prob=0.0).use_half_body(0)
  with pytest.raises(ValueError, match="half_body has 2 entries for 3 datasets"):
    _cfg(half_body=(True, False))
  with pytest.raises(ValueError, match="encodings has 2 entries"):
    _cfg(encodings=("udp", "msra"))
  with pytest.raises(ValueError, match="unknown encodings"):
    _cfg(encodings=("udp", "msra", "dark"))


# ----------------------------------------------------------------------------------------------
# Mixing and per-host shards (records only: no images needed)
# ----------------------------------------------------------------------------------------------


def _id_sources(sizes):
  return [[{"dataset_index": d, "ann_id": 1000 * d + i} for i in range(n)]
          for d, n in enumerate(sizes)]


@pytest.mark.parametrize("process_count", [2, 3])
def test_host_shards_are_disjoint_and_cover_each_epoch(process_count):
  n = 12
  srcs = _id_sources([n])
  per_host = n // process_count
  epochs = []
  for epoch in range(2):
    shares = []
    for p in range(process_count):
      ds = pipeline.mixed_records(srcs, [1.0], seed=4, process_index=p,
                                  process_count=process_count)
      shares.append([ds[i]["ann_id"] for i in range(epoch * per_host, (epoch + 1) * per_host)])
    flat = [a for share in shares for a in share]
    assert sorted(flat) == list(range(n))  # Disjoint and together the whole source.
    epochs.append(shares)
  assert epochs[0][0] != epochs[1][0]  # Reshuffled every epoch, like DistributedSampler.


def test_mixing_proportions_follow_weights_or_sizes():
  srcs = _id_sources([5, 7, 11])
  ds = pipeline.mixed_records(srcs, [1.0, 2.0, 3.5], seed=0)
  draws = [ds[i] for i in range(650)]
  counts = collections.Counter(r["dataset_index"] for r in draws)
  for d, want in enumerate((100, 200, 350)):
    assert counts[d] == pytest.approx(want, rel=0.02)
  # Each source is shuffled and repeated: its first len(source) draws are a permutation.
  first = [r["ann_id"] for r in draws if r["dataset_index"] == 1][:7]
  assert sorted(first) == list(range(1000, 1007)) and first != sorted(first)
  by_size = pipeline.mixed_records(srcs, None, seed=0)
  counts = collections.Counter(by_size[i]["dataset_index"] for i in range(230))
  for d, want in enumerate((50, 70, 110)):
    assert counts[d] == pytest.approx(want, rel=0.05)
  with pytest.raises(ValueError, match="dataset 1 has no records"):
    pipeline.mixed_records(_id_sources([3, 0]), [1.0, 1.0], seed=0)


# ----------------------------------------------------------------------------------------------
# The full chain on the real sample images (spec §4.1 per-dataset settings, §4.4 order)
# ----------------------------------------------------------------------------------------------

# (format, annotations, image dir, encoding, half-body) per spec §4.1.
REAL = (
    ("coco", "coco/test_coco.json", "coco", "udp", True),
    ("aic", "aic/test_aic.json", "aic", "msra", True),
    ("mpii", "mpii/test_mpii.json", "mpii", "udp", False),
    ("ap10k", "ap10k/test_ap10k.json", "ap10k", "msra", True),
    ("coco_wholebody", "coco/test_coco_wholebody.json", "coco", "msra", True),
)
REAL_LAYOUT = SkeletonLayout(tuple(get_skeleton(r[0]) for r in REAL))
IMAGE_HW, HEATMAP_HW = (256, 192), (64, 48)


@pytest.fixture(scope="module")
def real_sources():
  root = shared_path("data/samples")
  out = []
  for d, (fmt, ann, images, _, _) in enumerate(REAL):
    recs, _ = readers.read_dataset(fmt, str(root / ann), str(root / images), get_skeleton(fmt), d,
                                   image_size_hw=IMAGE_HW)
    assert recs, fmt
    out.append(recs)
  return out


def _real_cfg(**kw):
  base = dict(layout=REAL_LAYOUT, encodings=tuple(r[3] for r in REAL), image_size_hw=IMAGE_HW,
              heatmap_size_hw=HEATMAP_HW, half_body=tuple(r[4] for r in REAL))
  base.update(kw)
  return pipeline.TopDownConfig(**base)


def _reference_example(record, image_rgb, rng):
  """Spec §4.4 in the reference's order, from the spec's own per-dataset table (by name)."""
  d = int(record["dataset_index"])
  name, _, _, encoding, _ = REAL[d]
  skel = REAL_LAYOUT.skeletons[d]
  joints = record["keypoints"][:, :2].astype(np.float32)
  vis = record["keypoints"][:, 2].astype(np.float32)
  center = record["center"].astype(np.float32)
  scale = record["scale"].astype(np.float32)
  img = image_rgb
  if rng.random() <= 0.5:  # 2. TopDownRandomFlip, literally.
    img = img[:, ::-1]
    width = img.shape[1]
    for a, b in skel.flip_pairs:
      joints[[a, b]] = joints[[b, a]]
      vis[[a, b]] = vis[[b, a]]
    joints[:, 0] = width - 1 - joints[:, 0]
    joints = joints * vis[:, None]
    center[0] = width - center[0] - 1
  if name != "mpii":  # 3. TopDownHalfBodyTransform: not in MPII's pipeline.
    hb = transforms.half_body_center_scale(joints, vis, skel.upper_body_ids, 192 / 256, rng)
    if hb is not None:
      center, scale = hb
  scale, rot = transforms.random_scale_rotation(scale, rng)  # 4. (40, 0.5, 0.6).
  udp = encoding == "udp"
  crop, joints, _ = transforms.top_down_affine(img, joints, vis, center, scale, rot, (192, 256),
                                               udp)  # 5.
  image = ((crop.astype(np.float32) / np.float32(255) - transforms.IMAGENET_MEAN)
           / transforms.IMAGENET_STD)  # 6.
  encode = heatmap_codec.udp_target if udp else heatmap_codec.msra_target
  target, weight = encode(joints, vis, (192, 256), (48, 64), sigma=2.0)  # 7.
  target, weight = heatmap_codec.pad_keypoints(target, weight, 133)
  return dict(image=image, target=target, target_weight=weight, dataset_index=d)


def _rgb_images(records):
  cache = {}
  for r in records:
    if r["image_path"] not in cache:
      cache[r["image_path"]] = cv2.cvtColor(cv2.imread(r["image_path"]), cv2.COLOR_BGR2RGB)
  return cache


def test_train_chain_matches_the_spec_on_real_samples(real_sources):
  images = _rgb_images([r for recs in real_sources for r in recs])
  ours = pipeline.TopDownTrainTransform(_real_cfg())
  all_half_body = pipeline.TopDownTrainTransform(_real_cfg(half_body=()))
  mpii_differs = 0
  for recs in real_sources:
    for i, rec in enumerate(recs):
      for seed in range(3):
        want = _reference_example(rec, images[rec["image_path"]], np.random.default_rng(seed))
        got = ours.random_map(rec, np.random.default_rng(seed))
        for k in ("image", "target", "target_weight"):
          np.testing.assert_array_equal(got[k], want[k], err_msg=f"{rec['image_path']} {k}")
        assert got["dataset_index"] == want["dataset_index"]
        d = want["dataset_index"]
        np.testing.assert_array_equal(got["skeleton_mask"], REAL_LAYOUT.skeleton_mask()[d])
        if REAL[d][0] == "mpii":  # Without the per-dataset flag MPII gets half-body boxes.
          other = all_half_body.random_map(rec, np.random.default_rng(seed))
          mpii_differs += not np.array_equal(other["image"], want["image"])
  assert mpii_differs > 0


def test_device_targets_match_the_host_targets_on_real_samples(real_sources):
  recs = [r for rs in real_sources for r in rs[:3]]
  host = pipeline.TopDownTrainTransform(_real_cfg())
  dev = pipeline.TopDownTrainTransform(_real_cfg(host_targets=False))
  want = [host.random_map(r, np.random.default_rng(i)) for i, r in enumerate(recs)]
  got = [dev.random_map(r, np.random.default_rng(i)) for i, r in enumerate(recs)]
  assert "target" not in got[0] and got[0]["joints"].shape == (133, 2)
  assert got[0]["image"].dtype == np.uint8  # The compact batch: normalised on the device.
  stack = lambda xs, k: np.stack([x[k] for x in xs])
  np.testing.assert_array_equal(np.asarray(pipeline.normalize_on_device(stack(got, "image"))),
                                stack(want, "image"))
  spec = device_targets.TargetSpec.from_topdown(_real_cfg())
  target, weight = device_targets.jitted_dataset_targets(spec)(
      stack(got, "joints"), stack(got, "joint_vis"), stack(got, "dataset_index"))
  np.testing.assert_array_equal(np.asarray(weight), stack(want, "target_weight"))
  np.testing.assert_allclose(np.asarray(target), stack(want, "target"), rtol=0, atol=1e-5)


def test_mixed_batches_pad_every_skeleton_to_133(real_sources):
  assert REAL_LAYOUT.num_keypoints == (17, 14, 16, 17, 133)
  ds = pipeline.mixed_train_dataset(real_sources, None, _real_cfg(), batch_size=10, seed=2)
  masks = REAL_LAYOUT.skeleton_mask()
  seen = set()
  for i in range(2):
    b = ds[i]
    assert b["image"].shape == (10, 256, 192, 3) and b["target"].shape == (10, 133, 64, 48)
    assert b["target_weight"].shape == (10, 133) and b["skeleton_mask"].shape == (10, 133)
    assert b["dataset_index"].dtype == np.int32
    for j, d in enumerate(b["dataset_index"]):
      k = REAL_LAYOUT.num_keypoints[d]
      np.testing.assert_array_equal(b["skeleton_mask"][j], masks[d])
      assert np.all(b["target"][j, k:] == 0) and np.all(b["target_weight"][j, k:] == 0)
      assert b["target_weight"][j, :k].sum() > 0
      seen.add(int(d))
  assert 4 in seen and len(seen) >= 3  # WholeBody (the largest source) and others mixed in.
