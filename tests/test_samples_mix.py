"""The five real sample datasets as one experiment (configs/samples.py): build all of a config's
datasets into TFDS ArrayRecord with one command, read them back like the files, and train and
evaluate on the mix from the builds."""

import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import common, samples
from conftest import REPO, shared_path
from data_pipelines import build_tfds, datasets, pipeline, readers, tfds_builders
from posebh_jax import experiment

NAMES = ("coco", "aic", "mpii", "ap10k", "coco_wholebody")
# Instances kept from each sample file (the readers' tests count them from the raw JSON).
KEPT = {"coco": 12, "aic": 9, "mpii": 5, "ap10k": 2, "coco_wholebody": 12}
DET = "coco/test_coco_det_AP_H_56.json"


def _config(tfds_dir: str = "") -> ml_collections.ConfigDict:
  cfg = samples.get_config()
  cfg.data.root = str(shared_path("data/samples"))
  cfg.data.tfds_dir = tfds_dir
  return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """configs/samples.py built into one TFDS dir, COCO with its detection split too."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  cfg = _config()
  cfg.data.datasets.coco.val_det = DET
  reports = build_tfds.build_config(cfg, data_dir, log=lambda *_: None)
  return data_dir, reports


def test_config_has_the_five_sample_datasets():
  cfg = samples.get_config("tfds")
  assert cfg.data.dataset_names == NAMES
  assert cfg.data.tfds_dir and cfg.data.root == "../shared/data/samples"
  layout = datasets.build_layout(cfg)
  assert layout.num_keypoints == (17, 14, 16, 17, 133) and layout.max_keypoints == 133
  assert datasets.tfds_formats(cfg) == list(NAMES)
  td = datasets.topdown_config(cfg, layout)
  assert td.encodings == ("udp", "msra", "udp", "msra", "msra")
  assert td.half_body == (True, True, False, True, True)  # MPII: none (spec §4.1).
  with pytest.raises(ValueError, match="unknown or bad options"):
    samples.get_config("tfsd")


def test_config_builds_every_split_of_every_dataset():
  cfg = _config()
  cfg.data.datasets.coco.val_det = DET
  cfg.data.datasets.aic.val_image_dir = "aic_val"  # A separate validation image directory.
  root = cfg.data.root
  builds = {b.name: b for b in build_tfds.config_builds(cfg)}
  assert list(builds) == list(NAMES)
  coco = builds["coco"]
  assert coco.format == "coco" and coco.image_dir == os.path.join(root, "coco")
  assert coco.splits == {
      "train": tfds_builders.SplitFiles(os.path.join(root, "coco/test_coco.json")),
      "val": tfds_builders.SplitFiles(os.path.join(root, "coco/test_coco.json"),
                                      image_dir=os.path.join(root, "coco")),
      "val_det": tfds_builders.SplitFiles(os.path.join(root, "coco/test_coco.json"),
                                          os.path.join(root, DET),
                                          image_dir=os.path.join(root, "coco"))}
  assert builds["aic"].splits["val"].image_dir == os.path.join(root, "aic_val")
  assert builds["aic"].splits["train"].image_dir is None  # The build's image_dir.
  for name in ("aic", "mpii", "ap10k", "coco_wholebody"):
    assert set(builds[name].splits) == {"train", "val"}, name


def test_real_config_builds_follow_the_readme_layout():
  from configs import posebh
  cfg = posebh.get_config("b")
  cfg.data.root = "/data"
  builds = {b.name: b for b in build_tfds.config_builds(cfg)}  # Plans only: opens no file.
  assert list(builds) == ["coco", "aic", "mpii", "ap10k", "apt36k", "coco_wholebody", "ochuman"]
  # OCHuman (evaluation only, through COCO's head): its own build, validation split only.
  assert set(builds["ochuman"].splits) == {"val"} and builds["ochuman"].num_keypoints == 17
  assert builds["ochuman"].splits["val"].ann == (
      "/data/ochuman/annotations/ochuman_coco_format_val_range_0.00_1.00.json")
  for name in ("coco", "coco_wholebody"):
    b = builds[name]
    assert set(b.splits) == {"train", "val", "val_det"} and b.image_dir == "/data/coco/train2017"
    assert b.splits["val"].image_dir == b.splits["val_det"].image_dir == "/data/coco/val2017"
    assert b.splits["val_det"].det == ("/data/coco/person_detection_results/"
                                       "COCO_val2017_detections_AP_H_56_person.json")
  assert builds["aic"].splits["val"].image_dir == "/data/aic/images"
  assert builds["apt36k"].splits["train"].ann == "/data/ap36k/annotations/train_annotations_1.json"


def test_built_records_equal_the_files(built):
  data_dir, reports = built
  for name in NAMES:
    assert {s: r.kept for s, r in reports[name].items()} == (
        {"train": KEPT[name], "val": KEPT[name]} | ({"val_det": 118} if name == "coco" else {}))
  # The experiment's records (train with the seeded centre jitter, val) are the same whether
  # read from the builds or from the files, and so are the pipeline's batches. The jitter drawn
  # when reading is the reference's (spec §6.15); by default the transform draws it instead.
  from_files, from_tfds = _config(), _config(data_dir)
  for c in (from_files, from_tfds):
    c.reference_compat.center_jitter_at_build = True
  layout = datasets.build_layout(from_files)
  for split in ("train", "val"):
    files = experiment.resolve_dataset_files(from_files, "")
    direct, _ = datasets.load_records(from_files, layout, files, split)
    stored, stored_reports = datasets.load_records(from_tfds, layout, files, split)
    assert [r.kept for r in stored_reports] == [KEPT[n] for n in NAMES]
    for d, (a, b) in enumerate(zip(direct, stored)):
      assert len(a) == len(b) == KEPT[NAMES[d]]
      for ra, rb in zip(a, b):
        assert rb["dataset_index"] == ra["dataset_index"] == d
        for key in ("center", "scale", "keypoints", "bbox"):
          np.testing.assert_array_equal(rb[key], ra[key], err_msg=f"{NAMES[d]} {split} {key}")
    if split == "train":
      assert any(not np.array_equal(r["center"], _bbox_center(r)) for r in direct[0])  # Jitter.
      td = datasets.topdown_config(from_files, layout)
      weights = [1.0] * len(NAMES)
      batches = [pipeline.mixed_train_dataset(recs, weights, td, batch_size=8, seed=0)[0]
                 for recs in (direct, stored)]
      for key in batches[0]:
        np.testing.assert_array_equal(batches[0][key], batches[1][key], err_msg=key)


def _bbox_center(record):
  x, y, w, h = record["bbox"]
  return np.array([x + w * 0.5, y + h * 0.5], np.float32)


def test_bad_dataset_formats_are_named(tmp_path):
  cfg = _config(str(tmp_path))
  cfg.data.datasets.aic.format = "aic_v2"
  with pytest.raises(readers.UnknownFormatError, match=r"data\.datasets\.aic\.format.*'aic_v2'"):
    build_tfds.config_builds(cfg)
  layout = datasets.build_layout(cfg)
  files = experiment.resolve_dataset_files(cfg, "")
  cfg.data.tfds_dir = ""
  with pytest.raises(readers.UnknownFormatError, match=r"data\.datasets\.aic\.format"):
    datasets.load_records(cfg, layout, files, "train")

  # A dataset named like a reference format is that format's build: another format is refused
  # at config time, naming it; from the files the same config is fine.
  cfg = _config(str(tmp_path))
  cfg.data.datasets.aic.format = "coco"
  with pytest.raises(ValueError, match="data.datasets.aic: .*format 'coco'.*reference format "
                     "'aic'"):
    build_tfds.config_builds(cfg)
  with pytest.raises(ValueError, match="data.datasets.aic: "):
    datasets.load_records(cfg, layout, files, "train")
  cfg.data.tfds_dir = ""  # From the files the same config is fine (two COCO-format files).
  recs, _ = datasets.load_records(cfg, layout, files, "train")
  assert len(recs[1]) == KEPT["aic"] and recs[1][0]["keypoints"].shape == (14, 3)

  # Builds are keyed by dataset name: two COCO-format datasets under other names get one build
  # each, with their own keypoint counts.
  cfg = _config(str(tmp_path))
  with cfg.unlocked():
    cfg.data.dataset_names = ("people", "more_people")
    cfg.data.datasets.people = cfg.data.datasets.coco
    cfg.data.datasets.more_people = cfg.data.datasets.aic.copy_and_resolve_references()
    cfg.data.datasets.more_people.format = "coco"
  builds = build_tfds.config_builds(cfg)
  assert [(b.name, b.format, b.num_keypoints) for b in builds] == [
      ("people", "coco", 17), ("more_people", "coco", 14)]

  # A skeleton the format's builds cannot hold.
  cfg = _config(str(tmp_path))
  cfg.data.datasets.coco_wholebody.skeleton = "coco"
  with pytest.raises(ValueError, match="coco_wholebody: skeleton 'coco' has 17 keypoints.*133"):
    build_tfds.config_builds(cfg)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "data_pipelines.build_tfds", *args],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_cli_builds_every_dataset_of_a_config(tmp_path):
  root = str(shared_path("data/samples"))
  data_dir = str(tmp_path / "tfds")
  args = ["--config=configs/samples.py", f"--config.data.root={root}", f"--data_dir={data_dir}"]
  out = _cli(*args, f"--config.data.datasets.coco.val_det={DET}")
  assert out.returncode == 0, out.stderr[-3000:]
  for name in NAMES:
    assert f"{name}: built {data_dir}/posebh_keypoints/{name}/1.1.0" in out.stdout
  assert "val_det: " in out.stdout and "kept 118 instances" in out.stdout
  for name in NAMES:
    assert len(tfds_builders.TfdsRecords(data_dir, name, "train")) == KEPT[name]
  assert len(tfds_builders.TfdsRecords(data_dir, "coco", "val_det")) == 118

  # Rerunning reuses the builds; one built for another crop size is refused, not reused.
  again = _cli(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  other = _cli(*args, "--config.data.image_size=(128, 96)")
  assert other.returncode != 0
  assert "image_size_hw=[64, 48] (asked [128, 96])" in other.stderr
  assert "delete it to rebuild" in other.stderr

  # Bad input: an unknown format in a config entry names the dataset; nothing is built.
  bad = _cli(*args[:2], f"--data_dir={tmp_path / 'bad'}",
             "--config.data.datasets.mpii.format=mpi")
  assert bad.returncode != 0
  assert "data.datasets.mpii.format: unknown annotation format 'mpi'" in bad.stderr
  assert not (tmp_path / "bad").exists()
  # --config and the single-dataset flags do not mix; without either there is nothing to do.
  mixed = _cli(*args, "--dataset=coco")
  assert mixed.returncode != 0 and "drop ['--dataset']" in mixed.stderr
  neither = _cli(f"--data_dir={data_dir}")
  assert neither.returncode != 0
  assert "give --config=..., or ['--dataset', '--images']" in neither.stderr


@pytest.mark.slow
def test_sample_mix_trains_and_evaluates_from_tfds(built, tmp_path, monkeypatch):
  from posebh_jax.train import loop
  data_dir, _ = built
  cfg = _config(data_dir)
  cfg.train.num_steps = 3
  common.set_stage2(cfg, -1)  # One compiled step: the stages are covered by the synthetic tests.
  seen = []
  to_global = pipeline.to_global_batch

  def spy(local_batch, mesh):
    # A training batch (compact by default: joints; the evaluation's crops pass here too).
    if "target" in local_batch or "joints" in local_batch:
      seen.append(np.asarray(local_batch["dataset_index"]))
    return to_global(local_batch, mesh)

  monkeypatch.setattr(pipeline, "to_global_batch", spy)
  workdir = str(tmp_path / "run")
  out = loop.train_and_evaluate(cfg, workdir)

  assert out["step"] == 3 and len(seen) == 3
  assert set(np.concatenate(seen).tolist()) == set(range(len(NAMES)))  # Every dataset trained.
  lines = [json.loads(line) for line in open(os.path.join(workdir, "train_metrics.jsonl"))]
  assert [m["step"] for m in lines] == [1, 2, 3]
  for m in lines:
    losses = {k: v for k, v in m.items() if k.startswith("loss/")}
    assert {f"loss/heatmap_{d}" for d in range(len(NAMES))} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values()), losses
  metrics = json.load(open(os.path.join(workdir, "eval", "metrics_3.json")))
  assert metrics["step"] == 3
  assert {n: metrics["per_dataset"][n]["num_instances"] for n in NAMES} == KEPT
