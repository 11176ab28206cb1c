"""The APT-36K split port: the authors' per-category rule over images' video ids, the
file-name fixes, `is_crowd` → `iscrowd`, and the CLI writing the three files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from data_pipelines import apt36k_split


def _raw():
  frames = {("dog", 1): 5, ("dog", 2): 3, ("dog", 3): 2, ("cat", 10): 1, ("cat", 11): 1,
            ("cat", 12): 1}
  images, anns = [], []
  for (cat, vid), n in frames.items():
    for f in range(n):
      i = len(images) + 1
      folder = "clip46√" if vid == 12 else f"video{vid}"
      images.append(dict(id=i, video_id=vid, file_name=f"D:\\apt36k\\{cat}\\{folder}\\{f}.jpg"))
      anns.append(dict(id=i, image_id=i, video_id=vid, is_crowd=0, category_id=1))
  return dict(images=images, annotations=anns, info={"v": 1}, license=[],
              categories=[dict(id=2, name="cat"), dict(id=1, name="dog")])


def test_split_rule_as_the_authors():
  ids = apt36k_split.split_video_ids(_raw()["images"])
  # dog: ids per image [1]*5 + [2]*3 + [3]*2, n = 10 → cut at int(11·0.7) = 7, int(11·0.8) = 8.
  # cat: [10, 11, 12], n = 3 → cut at 2 and 3.
  assert ids == {"train": {1, 2, 10, 11}, "val": {2, 12}, "test": {3}}
  out = apt36k_split.split_apt36k(_raw())
  vids = {s: sorted({i["video_id"] for i in d["images"]}) for s, d in out.items()}
  assert vids == {"train": [1, 2, 10, 11], "val": [12], "test": [3]}  # 2 straddles: train.
  assert [len(d["annotations"]) for d in out.values()] == [10, 1, 2]
  ann = out["train"]["annotations"][0]
  assert ann["iscrowd"] == 0 and "is_crowd" not in ann
  assert out["train"]["images"][0]["file_name"] == "dog/video1/0.jpg"
  assert out["val"]["images"][0]["file_name"] == "cat/clip46б╠/0.jpg"  # The authors' fix.
  assert [c["id"] for c in out["test"]["categories"]] == [1, 2]


def test_bad_paths_are_named():
  raw = _raw()
  raw["images"][3]["file_name"] = "x.jpg"
  with pytest.raises(ValueError, match="image 4: needs 'video_id' and a file_name"):
    apt36k_split.split_apt36k(raw)


def test_cli_writes_the_config_file_names(tmp_path):
  raw = tmp_path / "apt36k_annotations.json"
  raw.write_text(json.dumps(_raw()), encoding="utf-8")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-m", "data_pipelines.apt36k_split", f"--raw={raw}",
                      f"--out_dir={tmp_path / 'out'}"], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(tmp_path / "out")) == sorted(apt36k_split.OUTPUT_NAMES.values())
  val = json.loads((tmp_path / "out" / "val_annotations_1.json").read_text(encoding="utf-8"))
  assert [i["video_id"] for i in val["images"]] == [12]
  from configs import posebh
  cfg = posebh.get_config("b")
  assert cfg.data.datasets.apt36k.train_ann.endswith(apt36k_split.OUTPUT_NAMES["train"])
  assert cfg.data.datasets.apt36k.val_ann.endswith(apt36k_split.OUTPUT_NAMES["val"])
