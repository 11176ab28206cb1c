"""TFDS ArrayRecord builds of every sample dataset, read back through grain without TensorFlow."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest

from conftest import REPO, shared_path
from data_pipelines import pipeline, readers, tfds_builders
from data_pipelines.image_files import ImageDecodeError, decode_record_image, read_bytes
from data_pipelines.skeletons import COCO, REAL_SKELETONS, SkeletonLayout

HW = (256, 192)
SplitFiles = tfds_builders.SplitFiles

# format → (image dir, {split: (annotations, detections)}) under data/samples.
SAMPLES = {
    "coco": ("coco", {"train": ("coco/test_coco.json", None),
                      "val_det": ("coco/test_coco.json", "coco/test_coco_det_AP_H_56.json")}),
    "coco_wholebody": ("coco", {"val": ("coco/test_coco_wholebody.json", None),
                                "val_det": ("coco/test_coco_wholebody.json",
                                            "coco/test_coco_det_AP_H_56.json")}),
    "aic": ("aic", {"train": ("aic/test_aic.json", None)}),
    "mpii": ("mpii", {"train": ("mpii/test_mpii.json", None)}),
    "ap10k": ("ap10k", {"train": ("ap10k/test_ap10k.json", None)}),
    "apt36k": ("ap10k", {"val": ("ap10k/test_ap10k.json", None)}),
}


def _split_files(splits):
  return {s: SplitFiles(str(shared_path(f"data/samples/{a}")),
                        None if d is None else str(shared_path(f"data/samples/{d}")))
          for s, (a, d) in splits.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Every sample dataset built into one TFDS data_dir; → (data_dir, {format: reports})."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  reports = {}
  for fmt, (image_dir, splits) in SAMPLES.items():
    _, reports[fmt] = tfds_builders.build(
        fmt, data_dir, _split_files(splits), str(shared_path(f"data/samples/{image_dir}")),
        image_size_hw=HW)
  return data_dir, reports


def _direct(fmt, split, dataset_index, **kw):
  image_dir, splits = SAMPLES[fmt]
  files = _split_files(splits)[split]
  return readers.read_dataset(
      fmt, files.ann, str(shared_path(f"data/samples/{image_dir}")), REAL_SKELETONS[fmt],
      dataset_index, image_size_hw=HW, det_path=files.det, **kw)


def _assert_same_records(got, want):
  assert len(got) == len(want) > 0
  for g, w in zip(got, want):
    assert set(g) == set(w) | {"image_bytes"}
    for key, value in w.items():
      if isinstance(value, np.ndarray):
        assert g[key].dtype == value.dtype and g[key].shape == value.shape, key
        np.testing.assert_array_equal(g[key], value, err_msg=key)
      else:
        assert g[key] == value and type(g[key]) is type(value), key


@pytest.mark.parametrize("fmt,split", [(f, s) for f, (_, splits) in SAMPLES.items()
                                       for s in splits])
def test_grain_read_back_equals_the_direct_reader(built, fmt, split):
  data_dir, reports = built
  want, report = _direct(fmt, split, dataset_index=7)
  source = tfds_builders.TfdsRecords(data_dir, fmt, split, dataset_index=7, image_size_hw=HW,
                                     padding=1.25)
  got = list(grain.MapDataset.source(source))
  _assert_same_records(got, want)
  assert reports[fmt][split] == report  # Kept / skipped by reason, as stored at the build.
  # The stored bytes are the file's; decoding them equals reading the file.
  for r in got[:3]:
    assert r["image_bytes"] == read_bytes(r["image_path"])
    np.testing.assert_array_equal(decode_record_image(r), pipeline.load_image(r))


def test_reference_dataset_index_is_stored(built):
  data_dir, _ = built
  for fmt, d in tfds_builders.REFERENCE_DATASET_INDEX.items():
    split = next(iter(SAMPLES[fmt][1]))
    assert tfds_builders.TfdsRecords(data_dir, fmt, split)[0]["dataset_index"] == d


def test_seeded_center_jitter_matches_the_direct_reader(built):
  data_dir, _ = built
  want, _ = _direct("aic", "train", 1, center_jitter_seed=11)
  plain, _ = _direct("aic", "train", 1)
  got = list(grain.MapDataset.source(tfds_builders.TfdsRecords(
      data_dir, "aic", "train", dataset_index=1, center_jitter_seed=11)))
  _assert_same_records(got, want)
  assert any(not np.array_equal(g["center"], p["center"]) for g, p in zip(got, plain))
  with pytest.raises(ValueError, match="no centre jitter for MPII or detection boxes"):
    tfds_builders.TfdsRecords(data_dir, "coco", "val_det", center_jitter_seed=0)


def test_records_feed_the_eval_transform(built):
  """A TFDS record goes through the grain eval transform like a reader record."""
  data_dir, _ = built
  cfg = pipeline.TopDownConfig(layout=SkeletonLayout((COCO,)), encodings=("udp",),
                               image_size_hw=HW, heatmap_size_hw=(64, 48))
  source = tfds_builders.TfdsRecords(data_dir, "coco", "val_det", dataset_index=0)
  ds = grain.MapDataset.source(source).map(pipeline.TopDownEvalTransform(cfg))
  direct, _ = _direct("coco", "val_det", 0)
  want = pipeline.TopDownEvalTransform(cfg).map(direct[5])
  got = ds[5]
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_reading_guards(built, tmp_path):
  data_dir, _ = built
  with pytest.raises(FileNotFoundError, match=r"no built 'aic' dataset under .*build_tfds"):
    tfds_builders.TfdsRecords(str(tmp_path), "aic", "train")
  with pytest.raises(ValueError, match=r"built with image_size_hw=\[256, 192\], asked for"):
    tfds_builders.TfdsRecords(data_dir, "aic", "train", image_size_hw=(384, 288))
  # Any other name is a new dataset's build: it needs a known format and its keypoint count.
  with pytest.raises(readers.UnknownFormatError, match="known: "):
    tfds_builders.TfdsRecords(data_dir, "coco17", "train", format="coco17", num_keypoints=17)
  with pytest.raises(ValueError, match="'coco17': give its number of keypoints"):
    tfds_builders.TfdsRecords(data_dir, "coco17", "train")
  with pytest.raises(ValueError, match="build 'aic' is the reference 'aic' format with 14"):
    tfds_builders.TfdsRecords(data_dir, "aic", "train", num_keypoints=17)
  source = tfds_builders.TfdsRecords(data_dir, "aic", "train")
  with pytest.raises(IndexError):
    source[len(source)]
  # grain's worker processes receive the source pickled.
  _assert_same_records([pickle.loads(pickle.dumps(source))[-1]],
                       [{k: v for k, v in source[-1].items() if k != "image_bytes"}])
  bad = dict(source[0], image_bytes=b"garbage")
  with pytest.raises(ImageDecodeError, match=r"cannot decode .*image_id 1, ann_id 4"):
    decode_record_image(bad)


def test_build_counts_bad_images_and_fails_on_bad_annotations(tmp_path):
  images = tmp_path / "images"
  shutil.copytree(shared_path("data/samples/aic"), images)
  raw = json.loads((images / "test_aic.json").read_text())
  first = raw["images"][0]["file_name"]
  (images / first).write_bytes(b"\xff\xd8 truncated")
  n_first = sum(a["image_id"] == raw["images"][0]["id"] for a in raw["annotations"])
  _, reports = tfds_builders.build(
      "aic", str(tmp_path / "tfds"), {"train": SplitFiles(str(images / "test_aic.json"))},
      str(images), decode_images=True)
  assert reports["train"].skipped == {"corrupt image": n_first}
  assert len(tfds_builders.TfdsRecords(str(tmp_path / "tfds"), "aic", "train")) == (
      len(raw["annotations"]) - n_first)
  raw["annotations"][0]["keypoints"] = raw["annotations"][0]["keypoints"][:-3]
  (images / "broken.json").write_text(json.dumps(raw))
  with pytest.raises(ValueError, match=r"broken.json: annotation id 4: .*39 values"):
    tfds_builders.build("aic", str(tmp_path / "tfds2"),
                        {"train": SplitFiles(str(images / "broken.json"))}, str(images))


def test_cli_builds_and_prints_the_reports(tmp_path):
  samples = shared_path("data/samples/mpii")
  cmd = [sys.executable, "-m", "data_pipelines.build_tfds", "--dataset=mpii",
         f"--ann={samples / 'test_mpii.json'}", f"--images={samples}",
         f"--data_dir={tmp_path}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "train: " in out.stdout and "kept 5 instances; skipped 0 (none)" in out.stdout
  assert len(tfds_builders.TfdsRecords(str(tmp_path), "mpii", "train")) == 5
  bad = subprocess.run(cmd[:3] + [f"--det={samples / 'x.json'}"] + cmd[3:], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=120)
  assert bad.returncode != 0 and "--det needs --val_ann" in bad.stderr
