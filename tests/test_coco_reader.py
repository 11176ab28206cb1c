"""The COCO-format reader: real records from synthetic files, and every kind of bad input."""

import json
import os

import cv2
import numpy as np
import pytest

from data_pipelines import coco_reader
from data_pipelines.skeletons import SYNTH_AIC, SYNTH_COCO
from data_pipelines.synthetic import generate

HW = (64, 48)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth")
  return generate.generate_synthetic_datasets(
      str(out), num_train=6, num_val=2, seed=3, image_size=(96, 96),
      skeletons=("synth_coco", "synth_aic"))


def test_reads_synthetic_records(synth):
  recs, report = coco_reader.read_coco_keypoints(
      synth["synth_aic"]["train"], synth["synth_aic"]["image_dir"], SYNTH_AIC, 1,
      image_size_hw=HW)
  assert report.kept == len(recs) == 6 and sum(report.skipped.values()) == 0
  r = recs[0]
  assert r["keypoints"].shape == (14, 3) and r["dataset_index"] == 1
  assert set(np.unique(r["keypoints"][:, 2])) <= {0.0, 1.0}
  assert os.path.isfile(r["image_path"])
  # Box → center/scale with the input aspect ratio (w/h = 0.75) and padding 1.25 (spec §4.3).
  x, y, w, h = r["bbox"]
  np.testing.assert_allclose(r["center"], [x + w / 2, y + h / 2], rtol=1e-5)
  sw, sh = r["scale"] * 200 / 1.25
  np.testing.assert_allclose(sw / sh, 0.75, rtol=1e-5)
  assert sw >= w - 1e-3 and sh >= h - 1e-3
  np.testing.assert_allclose(r["full_keypoints"]["synth_aic"], r["keypoints"])
  assert r["full_keypoints"]["synth_coco"].shape == (17, 3)


def _write(tmp_path, data, name="ann.json"):
  p = tmp_path / name
  p.write_text(data if isinstance(data, str) else json.dumps(data))
  return str(p)


def _coco(tmp_path, anns, k=17):
  img = np.full((40, 50, 3), 128, np.uint8)
  cv2.imwrite(str(tmp_path / "a.jpg"), img)
  return dict(images=[dict(id=1, file_name="a.jpg", width=50, height=40)], annotations=anns,
              categories=[dict(id=1, name="person")])


def _ann(i, k=17, **kw):
  kpts = []
  for j in range(k):
    kpts += [10.0 + j, 12.0, 2]
  a = dict(id=i, image_id=1, category_id=1, bbox=[5, 5, 30, 20], area=600, iscrowd=0,
           num_keypoints=k, keypoints=kpts)
  a.update(kw)
  return a


def _read(path, tmp_path, **kw):
  return coco_reader.read_coco_keypoints(path, str(tmp_path), SYNTH_COCO, 0, image_size_hw=HW,
                                         **kw)


def test_malformed_json_names_the_file(tmp_path):
  path = _write(tmp_path, "{not json")
  with pytest.raises(coco_reader.AnnotationError, match="ann.json: malformed JSON"):
    _read(path, tmp_path)


def test_missing_file_and_missing_sections(tmp_path):
  with pytest.raises(coco_reader.AnnotationError, match="not found"):
    _read(str(tmp_path / "nope.json"), tmp_path)
  with pytest.raises(coco_reader.AnnotationError, match="needs 'images' and 'annotations'"):
    _read(_write(tmp_path, {"images": []}), tmp_path)


def test_wrong_keypoint_count_names_file_and_record(tmp_path):
  path = _write(tmp_path, _coco(tmp_path, [_ann(1), _ann(7, k=14)]))
  with pytest.raises(coco_reader.AnnotationError, match=r"ann.json: annotation id 7: .*42 values, expected 51"):
    _read(path, tmp_path)


def test_unknown_image_id_names_the_record(tmp_path):
  path = _write(tmp_path, _coco(tmp_path, [_ann(3, image_id=99)]))
  with pytest.raises(coco_reader.AnnotationError, match="annotation id 3: image_id 99"):
    _read(path, tmp_path)


def test_unusable_instances_are_skipped_and_counted(tmp_path):
  nan = _ann(2)
  nan["keypoints"][0] = float("nan")
  anns = [
      _ann(1),
      nan,
      _ann(3, bbox=[5, 5, 0, 0], area=0),  # Empty box.
      _ann(4, bbox=[100, 100, 10, 10], area=None),  # Entirely outside the image.
      _ann(5, iscrowd=1),
      _ann(6, keypoints=[0] * 51, num_keypoints=0),
      _ann(8, bbox=[1, 2, "x", 4]),
  ]
  del anns[3]["area"]
  path = _write(tmp_path, _coco(tmp_path, anns))
  recs, report = _read(path, tmp_path)
  assert [r["ann_id"] for r in recs] == [1]
  assert report.skipped == {"non-finite keypoints": 1, "zero-area box": 1,
                            "box outside image": 1, "crowd": 1,
                            "no labelled keypoint": 1, "malformed box": 1}
  assert "kept 1 instances; skipped 6" in str(report)


def test_missing_image_file_is_skipped_and_counted(tmp_path):
  data = _coco(tmp_path, [_ann(1)])
  data["images"][0]["file_name"] = "missing.jpg"
  recs, report = _read(_write(tmp_path, data), tmp_path)
  assert recs == [] and report.skipped == {"missing image file": 1}
