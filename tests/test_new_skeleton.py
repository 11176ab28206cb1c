"""A skeleton the package has never seen, declared only in a config: checks, build, training mixed
with the synthetic datasets, OKS evaluation on its own sigmas, and posebh-infer.

The end-to-end test writes the README's "Add a dataset" example config as the user would, renders
a small 14-keypoint COCO-format dataset with the synthetic renderer, and runs the README's
commands as subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import cv2
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from configs import common
from configs import synthetic as synthetic_configs
from data_pipelines import annotation_info, datasets, skeletons, tfds_builders
from data_pipelines.synthetic import render
from posebh_jax import config_checks, experiment
from posebh_jax.evaluation import coco_metrics

# The test's own skeleton: 14 keypoints that the biped renderer draws, in an order of our own.
NAMES = ("head_top", "neck", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
         "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
         "left_ankle", "right_ankle")
SKELETON = dict(
    name="stick14", keypoint_names=list(NAMES),
    flip_pairs=[[2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13]],
    sigmas=[0.08, 0.06, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087,
            0.089, 0.089],
    upper_body_ids=list(range(8)), limbs=[["head_top", "neck"], [1, 2], [1, 3]])


def write_dataset(root, names=NAMES, num_train=16, num_val=8, size=(96, 96), seed=5) -> dict:
  """Renders biped figures and writes `<root>/{train,val}.json` + `images/` (COCO format)."""
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  out = {}
  for split, n in (("train", num_train), ("val", num_val)):
    images, anns = [], []
    for i in range(n):
      s = render.render_sample(np.random.default_rng([seed, len(split), i]), "biped", size)
      file_name = f"{split}_{i:06d}.jpg"
      assert cv2.imwrite(os.path.join(root, "images", file_name), s.image)
      kpts = [v for name in names for v in s.keypoints[name]]
      x, y, w, h = s.bbox
      images.append(dict(id=i + 1, file_name=file_name, width=size[1], height=size[0]))
      anns.append(dict(id=i + 1, image_id=i + 1, category_id=1, bbox=[x, y, w, h],
                       area=w * h, iscrowd=0, keypoints=kpts,
                       num_keypoints=sum(1 for v in kpts[2::3] if v > 0)))
    doc = dict(images=images, annotations=anns,
               categories=[dict(id=1, name="person", keypoints=list(names))])
    out[split] = os.path.join(root, f"{split}.json")
    with open(out[split], "w") as f:
      json.dump(doc, f)
  return out


def _config(tmp_path, skeleton=SKELETON) -> ml_collections.ConfigDict:
  files = write_dataset(str(tmp_path / "stick14"))
  config = synthetic_configs.get_config("tiny")
  config.data.dataset_names += ("stick14",)
  config.data.datasets.stick14 = common.dataset_entry(
      skeleton=skeleton, format="coco", train_ann=files["train"], val_ann=files["val"],
      image_dir=str(tmp_path / "stick14" / "images"))
  return config


def test_the_skeleton_is_not_in_the_package():
  assert "stick14" not in skeletons.SKELETONS
  # AIC annotates the same 14 joints, in another order and with other sigmas.
  assert all(s.keypoint_names != NAMES and s.sigmas != tuple(SKELETON["sigmas"])
             for s in skeletons.SKELETONS.values())


def test_resolve_names_mappings_configdicts_and_files(tmp_path):
  assert skeletons.resolve_skeleton("coco") is skeletons.COCO
  from_dict = skeletons.resolve_skeleton(SKELETON)
  assert from_dict.num_keypoints == 14 and from_dict.flip_pairs[0] == (2, 3)
  assert from_dict.upper_body_ids == tuple(range(8)) and from_dict.limbs[1] == (1, 2)
  assert skeletons.resolve_skeleton(ml_collections.ConfigDict(SKELETON)) == from_dict
  path = tmp_path / "stick14.json"
  path.write_text(json.dumps(skeletons.skeleton_to_dict(from_dict)))
  assert skeletons.resolve_skeleton(str(path)) == from_dict
  # A mapping without a name takes the dataset's.
  unnamed = {k: v for k, v in SKELETON.items() if k != "name"}
  assert skeletons.resolve_skeleton(unnamed, default_name="birds").name == "birds"
  with pytest.raises(ValueError, match="unknown skeleton 'stick15'.*mapping.*json"):
    skeletons.resolve_skeleton("stick15")
  with pytest.raises(ValueError, match=r"skeleton file .*missing\.json: cannot read"):
    skeletons.resolve_skeleton(str(tmp_path / "missing.json"))


def test_config_layout_files_and_records(tmp_path):
  config = _config(tmp_path)
  config_checks.check_config(config)
  layout = datasets.build_layout(config)
  assert layout.num_keypoints == (17, 14, 17, 14)
  assert layout.skeletons[3].name == "stick14"
  # The synthetic entries are generated; stick14 reads its own files ("unknown synthetic
  # dataset" before).
  files = experiment.resolve_dataset_files(config, str(tmp_path / "work"))
  assert files[3].train_ann == str(tmp_path / "stick14" / "train.json")
  assert "synthetic_data" in files[0].train_ann
  recs, _ = datasets.load_records(config, layout, files, "train")
  assert [len(r) for r in recs] == [24, 24, 24, 16]
  assert recs[3][0]["keypoints"].shape == (14, 3)


def test_evaluation_only_entry(tmp_path):
  config = _config(tmp_path)
  config.data.datasets.stick14.train_ann = ""
  config_checks.check_config(config)
  assert datasets.train_weights(config) == [1.0, 1.0, 2.5, 0.0]
  layout = datasets.build_layout(config)
  files = experiment.resolve_dataset_files(config, str(tmp_path / "work"))
  train, reports = datasets.load_records(config, layout, files, "train")
  assert len(train[3]) == 0 and "no train annotations" in str(reports[3])
  val, _ = datasets.load_records(config, layout, files, "val")
  assert len(val[3]) == 8


@pytest.mark.parametrize("change, message", [
    (dict(flip_pairs=[[2, 14]]), r"data\.datasets\.stick14\.skeleton: .*flip pair \(2, 14\) "
                                 r"out of range for 14"),
    (dict(sigmas=[0.05] * 13), r"data\.datasets\.stick14\.skeleton: .*sigmas has 13 entries, "
                               r"expected 14"),
    (dict(upper_body_ids=[0, 20]), r"data\.datasets\.stick14\.skeleton: .*upper_body_ids"),
    (dict(limbs=[["neck", "tail"]]), r"stick14.*unknown keypoint 'tail'"),
])
def test_bad_skeletons_fail_at_config_time(tmp_path, change, message):
  config = _config(tmp_path, {**SKELETON, **change})
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check_config(config)


def test_annotation_keypoint_count_is_checked(tmp_path):
  config = _config(tmp_path)
  files = write_dataset(str(tmp_path / "seventeen"), names=("nose",) * 3 + NAMES, num_train=2,
                        num_val=1)
  assert annotation_info.keypoint_count(files["train"]) == 17
  config.data.datasets.stick14.val_ann = files["val"]
  with pytest.raises(config_checks.ConfigError,
                     match=r"data\.datasets\.stick14\.val_ann: .*val\.json holds 17 keypoints "
                           r"per instance but skeleton 'stick14' has 14"):
    config_checks.check_config(config)


def test_keypoint_count_of_large_files_from_their_ends(tmp_path, monkeypatch):
  files = write_dataset(str(tmp_path / "d"), num_train=40, num_val=1)
  doc = json.load(open(files["train"]))
  path = tmp_path / "big.json"
  monkeypatch.setattr(annotation_info, "_PARSE_LIMIT", 1000)  # Force the scan of the ends.
  monkeypatch.setattr(annotation_info, "_SCAN_BYTES", 2000)
  # Categories (with the names) at the end, as COCO's files: counted from the tail.
  path.write_text(json.dumps(doc))
  assert path.stat().st_size > 4 * 2000
  assert annotation_info.keypoint_count(str(path)) == 14
  # No names anywhere: the first annotation's values / 3, from the head.
  cats = [dict(id=1, name="person")]
  path.write_text(json.dumps(dict(annotations=doc["annotations"], images=doc["images"],
                                  categories=cats)))
  assert annotation_info.keypoint_count(str(path)) == 14
  # Names at the front.
  cats = [dict(id=1, name="person", keypoints=list(NAMES[:5]))]
  path.write_text(json.dumps(dict(categories=cats, images=doc["images"],
                                  annotations=doc["annotations"])))
  assert annotation_info.keypoint_count(str(path)) == 5


def _readme_example() -> tuple[str, list[str]]:
  """The README's "Add a dataset" config file and its shell commands."""
  text = (REPO / "README.md").read_text()
  section = text[text.index("## Add a dataset"):]
  section = section[:section.index("\n## ", 5)]
  config = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  lines = bash.replace("\\\n", " ").strip().split("\n")  # Join continued lines.
  return config, [" ".join(line.split()) for line in lines if line.strip()]


def _run(args: list[str], cwd) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  tools = {"posebh-train": ["-m", "posebh_jax.main_train"],
           "posebh-infer": ["-m", "posebh_jax.main_infer"],
           "python": []}
  argv = [sys.executable] + tools[args[0]] + args[1:]
  r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
  return r


def test_readme_example_build_train_evaluate_infer(tmp_path):
  config_text, commands = _readme_example()
  assert [c.split()[0] for c in commands] == ["python", "posebh-train", "posebh-infer"]
  assert "STICK14" in config_text and "stick14" not in skeletons.SKELETONS
  (tmp_path / "my_configs").mkdir()
  (tmp_path / "my_configs" / "stick14.py").write_text(config_text)
  write_dataset(str(tmp_path / "my_data" / "stick14"))
  # The README's skeleton is this test's (names, pairs, sigmas), so the data fits it.
  readme_skeleton = {}
  exec(compile(config_text.split("def get_config")[0], "stick14.py", "exec"), readme_skeleton)
  assert readme_skeleton["STICK14"]["keypoint_names"] == list(NAMES)

  # Build: the new skeleton's own build with 14 keypoints; synthetic data is not built.
  r = _run(commands[0].split(), tmp_path)
  assert "stick14: built" in r.stdout + r.stderr
  built = tfds_builders.TfdsRecords(str(tmp_path / "runs/tfds"), "stick14", "train",
                                    format="coco", num_keypoints=14)
  assert len(built) == 16 and built[0]["keypoints"].shape == (14, 3)
  assert not (tmp_path / "runs/tfds/posebh_keypoints/synth_coco").exists()

  # Train (4 steps, mixed with the synthetic datasets) and the final evaluation.
  _run(commands[1].split(), tmp_path)
  work = tmp_path / "runs" / "stick14"
  metrics = json.loads((work / "eval" / "metrics_4.json").read_text())
  stick = metrics["per_dataset"]["stick14"]
  assert stick["metric"] == "coco_oks" and stick["num_instances"] == 8
  assert 0.0 <= stick["AP"] <= 1.0
  assert metrics["per_dataset"]["synth_coco"]["metric"] == "pck_box"
  # The AP is COCOeval's on the skeleton's own sigmas: recomputed from the written results.
  results = json.loads((work / "eval" / "results_4" / "stick14_keypoints.json").read_text())
  assert len(results[0]["keypoints"]) == 14 * 3
  sigmas = np.asarray(SKELETON["sigmas"])
  redo = coco_metrics.coco_keypoint_eval(str(tmp_path / "my_data/stick14/val.json"), results,
                                         sigmas)
  assert redo["AP"] == pytest.approx(stick["AP"])

  # posebh-infer: 14 named keypoints and an overlay.
  _run(commands[2].split(), tmp_path)
  doc = json.loads((tmp_path / "runs/stick14_poses/val_000000.json").read_text())
  (inst,) = doc["instances"]
  assert [k["name"] for k in inst["poses"]["stick14"]] == list(NAMES)
  overlay = cv2.imread(str(tmp_path / "runs/stick14_poses/val_000000.png"))
  assert overlay is not None and overlay.shape[:2] == (96, 96)
