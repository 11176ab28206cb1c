"""Readers on every real sample file (counts checked against the raw JSON), and bad input."""

import collections
import json
import shutil

import cv2
import numpy as np
import pytest

from conftest import shared_path
from data_pipelines import coco_reader, readers, transforms
from data_pipelines.coco_reader import AnnotationError
from data_pipelines.skeletons import AIC, AP10K, APT36K, COCO, COCO_WHOLEBODY, MPII

HW = (256, 192)
WB_PARTS = ("keypoints", "foot_kpts", "face_kpts", "lefthand_kpts", "righthand_kpts")


def _samples(rel):
  return shared_path(f"data/samples/{rel}")


def _expected_coco(raw, *, wholebody=False):
  """Kept annotation ids (reference order: images, then annotations) and skip counts, counted
  straight from the raw JSON with the spec §4.3 rules that the sample files exercise."""
  kept, skipped = [], collections.Counter()
  for img in raw["images"]:
    for a in [a for a in raw["annotations"] if a["image_id"] == img["id"]]:
      x, y, w, h = a["bbox"]
      if a.get("iscrowd", 0):
        skipped["crowd"] += 1
      elif not (min(img["width"] - 1, max(0, x) + max(0, w - 1)) > max(0, x)
                and min(img["height"] - 1, max(0, y) + max(0, h - 1)) > max(0, y)):
        skipped["zero-area box"] += 1
      elif max(a["keypoints"]) == 0 or (not wholebody and a.get("num_keypoints") == 0):
        skipped["no labelled keypoint"] += 1
      else:
        kept.append(a["id"])
  return kept, skipped


@pytest.mark.parametrize("fmt,rel,skeleton", [
    ("coco", "coco/test_coco.json", COCO),
    ("aic", "aic/test_aic.json", AIC),
    ("ap10k", "ap10k/test_ap10k.json", AP10K),
    ("apt36k", "ap10k/test_ap10k.json", APT36K),
    ("coco_wholebody", "coco/test_coco_wholebody.json", COCO_WHOLEBODY),
])
def test_coco_family_samples_match_the_raw_json(fmt, rel, skeleton):
  path = _samples(rel)
  raw = json.loads(path.read_text())
  recs, report = readers.read_dataset(fmt, str(path), str(path.parent), skeleton, 4,
                                      image_size_hw=HW, decode_images=True)
  kept, skipped = _expected_coco(raw, wholebody=fmt == "coco_wholebody")
  assert [r["ann_id"] for r in recs] == kept and report.kept == len(kept) > 0
  assert report.skipped == skipped
  anns = {a["id"]: a for a in raw["annotations"]}
  images = {i["id"]: i for i in raw["images"]}
  per_image = collections.Counter()
  for r in recs:
    a = anns[r["ann_id"]]
    parts = WB_PARTS if fmt == "coco_wholebody" else ("keypoints",)
    k = np.concatenate([np.reshape(a[p], (-1, 3)) for p in parts])
    assert r["keypoints"].shape == (skeleton.num_keypoints, 3)
    np.testing.assert_array_equal(r["keypoints"][:, :2], k[:, :2].astype(np.float32))
    want_vis = (k[:, 2] > 0) if fmt == "coco_wholebody" else np.minimum(1, k[:, 2])
    np.testing.assert_array_equal(r["keypoints"][:, 2], want_vis)
    assert r["image_id"] == a["image_id"] and r["category_id"] == a["category_id"]
    assert r["image_path"].endswith(images[a["image_id"]]["file_name"])
    assert r["dataset_index"] == 4 and r["bbox_score"] == 1.0
    assert r["bbox_id"] == per_image[a["image_id"]]  # Running index within the image.
    per_image[a["image_id"]] += 1
    clean = transforms.sanitize_bbox(a["bbox"], images[a["image_id"]]["width"],
                                     images[a["image_id"]]["height"])
    np.testing.assert_array_equal(r["bbox"], clean.astype(np.float32))
    c, s = transforms.box_to_center_scale(clean, HW[1] / HW[0])
    np.testing.assert_array_equal(r["center"], c)
    np.testing.assert_array_equal(r["scale"], s)


def test_wholebody_order_and_visibility():
  path = _samples("coco/test_coco_wholebody.json")
  raw = json.loads(path.read_text())
  recs, _ = readers.read_dataset("coco_wholebody", str(path), str(path.parent), COCO_WHOLEBODY,
                                 5, image_size_hw=HW)
  a = next(a for a in raw["annotations"] if a["id"] == recs[0]["ann_id"])
  starts = np.cumsum([0, 17, 6, 68, 21])
  for part, start, n in zip(WB_PARTS, starts, (17, 6, 68, 21, 21)):
    np.testing.assert_array_equal(recs[0]["keypoints"][start:start + n, :2],
                                  np.reshape(a[part], (-1, 3))[:, :2].astype(np.float32))
  # The sample's face/hand flags include fractional confidences: v > 0 makes them visible.
  assert COCO_WHOLEBODY.keypoint_names[17] == "left_big_toe"
  assert COCO_WHOLEBODY.keypoint_names[91] == "left_hand_root"
  fractional = [(r, np.concatenate([np.reshape(anns[p], (-1, 3)) for p in WB_PARTS]))
                for r in recs for anns in [next(x for x in raw["annotations"]
                                                 if x["id"] == r["ann_id"])]]
  n_frac = 0
  for r, k in fractional:
    frac = (k[:, 2] > 0) & (k[:, 2] < 1)
    n_frac += frac.sum()
    assert np.all(r["keypoints"][frac, 2] == 1.0)
  assert n_frac > 0


def test_wholebody_checks_only_the_body_for_all_zero(tmp_path):
  path = _samples("coco/test_coco_wholebody.json")
  raw = json.loads(path.read_text())
  a0, a1 = raw["annotations"][0], raw["annotations"][1]
  a0["keypoints"] = [0] * 51  # Body empty, face/hands labelled → skipped.
  a1["num_keypoints"] = 0  # Body labelled, count says 0 → WholeBody keeps it, COCO would not.
  p = tmp_path / "wb.json"
  p.write_text(json.dumps(raw))
  recs, report = readers.read_dataset("coco_wholebody", str(p), str(path.parent),
                                      COCO_WHOLEBODY, 5, image_size_hw=HW)
  ids = [r["ann_id"] for r in recs]
  assert a0["id"] not in ids and a1["id"] in ids
  assert report.skipped["no labelled keypoint"] == 3  # The sample's 2 + a0.
  for a in raw["annotations"]:
    a["foot_kpts"] = a["face_kpts"] = a["lefthand_kpts"] = a["righthand_kpts"] = []
  p.write_text(json.dumps(raw))
  recs, _ = readers.read_dataset("coco", str(p), str(path.parent), COCO, 0, image_size_hw=HW)
  assert a1["id"] not in [r["ann_id"] for r in recs]


def test_mpii_sample_center_scale_and_joints():
  path = _samples("mpii/test_mpii.json")
  raw = json.loads(path.read_text())
  recs, report = readers.read_dataset("mpii", str(path), str(path.parent), MPII, 2,
                                      image_size_hw=HW, decode_images=True)
  assert report.kept == len(raw) == len(recs) and not report.skipped
  names = []
  for i, (r, a) in enumerate(zip(recs, raw)):
    s = a["scale"]
    np.testing.assert_allclose(r["center"], [a["center"][0] - 1, a["center"][1] + 15 * s - 1],
                               rtol=1e-6)
    np.testing.assert_allclose(r["scale"], [1.25 * s, 1.25 * s], rtol=1e-6)
    np.testing.assert_allclose(r["keypoints"][:, :2], np.asarray(a["joints"]) - 1, rtol=1e-6)
    np.testing.assert_array_equal(r["keypoints"][:, 2], a["joints_vis"])
    assert r["bbox_id"] == r["ann_id"] == i and r["dataset_index"] == 2
    # Derived box: side 200·s centred on the final centre.
    np.testing.assert_allclose(r["bbox"][2:], [200 * s, 200 * s], rtol=1e-6)
    np.testing.assert_allclose(r["bbox"][:2] + r["bbox"][2:] / 2, r["center"], rtol=1e-6)
    if a["image"] not in names:
      names.append(a["image"])
    assert r["image_id"] == names.index(a["image"])
    assert r["image_path"].endswith(a["image"])


def test_detection_boxes():
  gt = _samples("coco/test_coco.json")
  det = _samples("coco/test_coco_det_AP_H_56.json")
  dets = json.loads(det.read_text())
  images = {i["id"] for i in json.loads(gt.read_text())["images"]}
  recs, report = readers.read_dataset("coco", str(gt), str(gt.parent), COCO, 0,
                                      image_size_hw=HW, det_path=str(det))
  want = [d for d in dets if d["category_id"] == 1 and d["image_id"] in images]
  assert len(recs) == report.kept == len(want) == 118 and not report.skipped
  running = collections.Counter()
  for r, d in zip(recs, want):
    assert r["image_id"] == d["image_id"] and r["bbox_score"] == np.float32(d["score"])
    assert r["ann_id"] == -1 and r["bbox_id"] == running[d["image_id"]]
    running[d["image_id"]] += 1
    # The reference's crops: center/scale from the raw detector box, no jitter.
    c, s = transforms.box_to_center_scale(np.asarray(d["bbox"]), 0.75)
    np.testing.assert_array_equal(r["center"], c)
    np.testing.assert_array_equal(r["scale"], s)
    np.testing.assert_array_equal(r["bbox"], np.float32(d["bbox"]))
    assert r["keypoints"].shape == (17, 3) and not r["keypoints"].any()
  thr = float(np.median([d["score"] for d in want]))
  recs, report = readers.read_dataset("coco", str(gt), str(gt.parent), COCO, 0,
                                      image_size_hw=HW, det_path=str(det), det_bbox_thr=thr)
  n_low = sum(d["score"] < thr for d in want)
  assert report.kept == len(recs) == len(want) - n_low
  assert report.skipped == {"score below det_bbox_thr": n_low}
  assert min(r["bbox_score"] for r in recs) >= np.float32(thr)  # Rounding is monotonic.


def test_detections_other_categories_unknown_images_and_bad_boxes_are_counted(tmp_path):
  gt = _samples("coco/test_coco.json")
  img = json.loads(gt.read_text())["images"][0]
  base = dict(image_id=img["id"], category_id=1, bbox=[10, 10, 50, 80], score=0.9)
  dets = [base, {**base, "category_id": 2}, {**base, "image_id": -5},
          {**base, "bbox": [10, 10, 0, 80]}, {**base, "bbox": [img["width"] + 5, 10, 50, 80]},
          {**base, "bbox": [10, float("nan"), 50, 80]}]
  p = tmp_path / "det.json"
  p.write_text(json.dumps(dets))
  recs, report = readers.read_dataset("coco", str(gt), str(gt.parent), COCO, 0,
                                      image_size_hw=HW, det_path=str(p))
  assert len(recs) == 1
  assert report.skipped == {"category_id not 1": 1, "image not in annotation file": 1,
                            "zero-area box": 1, "box outside image": 1, "malformed box": 1}
  p.write_text(json.dumps([{**base, "score": None}]))
  with pytest.raises(AnnotationError, match=r"det.json: detection 0: score None"):
    readers.read_dataset("coco", str(gt), str(gt.parent), COCO, 0, image_size_hw=HW,
                         det_path=str(p))
  p.write_text(json.dumps([{"image_id": 1}]))
  with pytest.raises(AnnotationError, match=r"det.json: detection 0: needs fields"):
    readers.read_dataset("coco", str(gt), str(gt.parent), COCO, 0, image_size_hw=HW,
                         det_path=str(p))


def test_center_jitter_is_seeded_bounded_and_off_by_default():
  path = _samples("aic/test_aic.json")
  args = ("aic", str(path), str(path.parent), AIC, 1)
  plain, _ = readers.read_dataset(*args, image_size_hw=HW)
  a, _ = readers.read_dataset(*args, image_size_hw=HW, center_jitter_seed=3)
  b, _ = readers.read_dataset(*args, image_size_hw=HW, center_jitter_seed=3)
  c, _ = readers.read_dataset(*args, image_size_hw=HW, center_jitter_seed=4)
  moved = [not np.array_equal(p["center"], q["center"]) for p, q in zip(plain, a)]
  assert any(moved) and not all(moved)
  for p, q, q2 in zip(plain, a, b):
    np.testing.assert_array_equal(q["center"], q2["center"])
    np.testing.assert_array_equal(q["scale"], p["scale"])
    assert np.all(np.abs(q["center"] - p["center"]) <= 0.2 * p["bbox"][2:] + 1e-3)
  assert any(not np.array_equal(q["center"], r["center"]) for q, r in zip(a, c))
  # Probability 0.3 (spec §4.3 step 4), over many records.
  rec = dict(plain[0])
  frac = np.mean([not np.array_equal(coco_reader.jitter_center(rec, 0, i)["center"],
                                     rec["center"]) for i in range(2000)])
  assert abs(frac - 0.3) < 0.04
  with pytest.raises(ValueError, match="no detection boxes and no centre jitter"):
    readers.read_dataset("mpii", str(path), str(path.parent), MPII, 2, image_size_hw=HW,
                         center_jitter_seed=0)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear path each.
# ----------------------------------------------------------------------------------------------


def _coco_file(tmp_path, anns, *, make_image=True):
  if make_image:
    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((40, 50, 3), 128, np.uint8))
  data = dict(images=[dict(id=1, file_name="a.jpg", width=50, height=40)], annotations=anns,
              categories=[dict(id=1, name="person")])
  p = tmp_path / "ann.json"
  p.write_text(json.dumps(data))
  return str(p)


def _ann(i, **kw):
  kpts = []
  for j in range(17):
    kpts += [10.0 + j, 12.0, 2]
  a = dict(id=i, image_id=1, category_id=1, bbox=[5, 5, 30, 20], area=600, iscrowd=0,
           num_keypoints=17, keypoints=kpts)
  a.update(kw)
  return a


def _read(path, tmp_path, fmt="coco", skeleton=COCO, **kw):
  return readers.read_dataset(fmt, path, str(tmp_path), skeleton, 0, image_size_hw=HW, **kw)


def _mpii_file(tmp_path, entries):
  p = tmp_path / "mpii.json"
  p.write_text(json.dumps(entries))
  return str(p)


def _mpii_entry(**kw):
  e = dict(image="a.jpg", center=[25.0, 20.0], scale=0.1, joints=[[10.0 + j, 12.0]
                                                                   for j in range(16)],
           joints_vis=[1] * 16)
  e.update(kw)
  return e


@pytest.mark.parametrize("fmt,skeleton", [("coco", COCO), ("mpii", MPII)])
def test_bad_input_malformed_json(tmp_path, fmt, skeleton):
  p = tmp_path / "bad.json"
  p.write_text('{"images": [')
  with pytest.raises(AnnotationError, match=r"bad.json: malformed JSON"):
    _read(str(p), tmp_path, fmt, skeleton)


@pytest.mark.parametrize("fmt,skeleton", [("coco", COCO), ("mpii", MPII)])
def test_bad_input_non_utf8_json_names_the_file(tmp_path, fmt, skeleton):
  p = tmp_path / "latin1.json"
  p.write_bytes(b'[{"image": "caf\xe9.jpg"}]')  # Latin-1, not UTF-8: raw byte 0xe9.
  with pytest.raises(AnnotationError) as info:
    _read(str(p), tmp_path, fmt, skeleton)
  assert str(info.value) == (f"{p}: not UTF-8 (byte 0xe9 at offset 15); JSON annotation files "
                             "must be UTF-8")


def test_bad_input_mpii_image_null_names_the_entry(tmp_path):
  path = _mpii_file(tmp_path, [_mpii_entry(), _mpii_entry(image=None)])
  with pytest.raises(AnnotationError) as info:
    _read(path, tmp_path, "mpii", MPII)
  assert str(info.value) == f"{path}: entry 1: 'image' must be an image file name, got None"


def test_bad_input_mpii_implausible_scales_are_counted_skips(tmp_path):
  cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((40, 50, 3), np.uint8))
  path = _mpii_file(tmp_path, [_mpii_entry(), _mpii_entry(scale=1e-9), _mpii_entry(scale=1e9)])
  recs, report = _read(path, tmp_path, "mpii", MPII)
  assert [r["ann_id"] for r in recs] == [0]
  assert report.skipped == {"implausible scale": 2}
  recs, report = _read(path, tmp_path, "mpii", MPII, check_images=False)  # Absolute bounds.
  assert [r["ann_id"] for r in recs] == [0] and report.skipped == {"implausible scale": 2}


def test_bad_input_missing_file(tmp_path):
  for fmt, skeleton in (("coco_wholebody", COCO_WHOLEBODY), ("mpii", MPII)):
    with pytest.raises(AnnotationError, match=r"annotation file not found: .*nope.json"):
      _read(str(tmp_path / "nope.json"), tmp_path, fmt, skeleton)
  gt = _coco_file(tmp_path, [_ann(1)])
  with pytest.raises(AnnotationError, match=r"not found: .*nodet.json"):
    _read(gt, tmp_path, det_path=str(tmp_path / "nodet.json"))


def test_bad_input_wrong_file_shape(tmp_path):
  with pytest.raises(AnnotationError, match="not an MPII annotation file"):
    _read(_coco_file(tmp_path, []), tmp_path, "mpii", MPII)
  with pytest.raises(AnnotationError, match=r"needs 'images' and 'annotations'"):
    _read(_mpii_file(tmp_path, [_mpii_entry()]), tmp_path)


def test_bad_input_missing_and_corrupt_images(tmp_path):
  path = _coco_file(tmp_path, [_ann(1)])
  (tmp_path / "a.jpg").unlink()
  recs, report = _read(path, tmp_path)
  assert not recs and report.skipped == {"missing image file": 1}
  (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
  recs, report = _read(path, tmp_path)
  assert len(recs) == 1  # Without decoding, an existing file counts as usable.
  recs, report = _read(path, tmp_path, decode_images=True)
  assert not recs and report.skipped == {"corrupt image": 1}
  mpii = _mpii_file(tmp_path, [_mpii_entry(), _mpii_entry(image="b.jpg")])
  recs, report = _read(mpii, tmp_path, "mpii", MPII)  # The header read already catches it.
  assert not recs and report.skipped == {"corrupt image": 1, "missing image file": 1}
  recs, report = _read(mpii, tmp_path, "mpii", MPII, check_images=False)
  assert len(recs) == 2


def test_bad_input_zero_area_and_out_of_image_boxes(tmp_path):
  anns = [_ann(1), _ann(2, bbox=[5, 5, 0.5, 20]), _ann(3, area=0),
          _ann(4, bbox=[60, 5, 10, 10]), _ann(5, bbox=[-30, -30, 20, 20]),
          _ann(6, bbox=[5, 5, 30])]
  recs, report = _read(_coco_file(tmp_path, anns), tmp_path)
  assert [r["ann_id"] for r in recs] == [1]
  assert report.skipped == {"zero-area box": 2, "box outside image": 2, "malformed box": 1}


def test_bad_input_nan_and_out_of_range_keypoints(tmp_path):
  def with_kpt(i, j, x, y, v):
    a = _ann(i)
    a["keypoints"][3 * j:3 * j + 3] = [x, y, v]
    return a
  anns = [_ann(1), with_kpt(2, 0, float("nan"), 1, 2), with_kpt(3, 4, 10, 10, 3),
          with_kpt(4, 4, 10, 10, -1), with_kpt(5, 2, 51, 10, 2), with_kpt(6, 2, 10, -2, 1),
          with_kpt(7, 2, 70, -9, 0)]  # An unlabelled point may lie anywhere.
  recs, report = _read(_coco_file(tmp_path, anns), tmp_path)
  assert [r["ann_id"] for r in recs] == [1, 7]
  assert report.skipped == {"non-finite keypoints": 1, "invalid visibility": 2,
                            "keypoint outside image": 2}
  joints = [[10.0, 12.0]] * 16
  entries = [_mpii_entry(), _mpii_entry(joints=[[float("nan"), 1.0]] + joints[1:]),
             _mpii_entry(joints_vis=[2] + [1] * 15),
             _mpii_entry(joints=[[60.0, 12.0]] + joints[1:]),
             _mpii_entry(joints=[[60.0, 12.0]] + joints[1:], joints_vis=[0] + [1] * 15),
             _mpii_entry(scale=-1.0)]
  recs, report = _read(_mpii_file(tmp_path, entries), tmp_path, "mpii", MPII)
  assert [r["ann_id"] for r in recs] == [0, 4]
  assert report.skipped == {"non-finite keypoints": 1, "invalid visibility": 1,
                            "keypoint outside image": 1, "malformed center/scale": 1}


def test_bad_input_wrong_keypoint_count_names_file_and_record(tmp_path):
  path = _coco_file(tmp_path, [_ann(1), _ann(7, keypoints=[1, 2, 1] * 14)])
  with pytest.raises(AnnotationError, match=r"ann.json: annotation id 7: .*42 values, expected 51"):
    _read(path, tmp_path)
  wb = _ann(9, foot_kpts=[0] * 18, face_kpts=[0] * 204, lefthand_kpts=[0] * 63)
  with pytest.raises(AnnotationError, match=r"annotation id 9: missing or non-list 'righthand"):
    _read(_coco_file(tmp_path, [wb]), tmp_path, "coco_wholebody", COCO_WHOLEBODY)
  with pytest.raises(AnnotationError, match=r"133-keypoint skeleton, got 'coco'"):
    _read(_coco_file(tmp_path, [wb]), tmp_path, "coco_wholebody", COCO)
  mpii = _mpii_file(tmp_path, [_mpii_entry(), _mpii_entry(image="x.jpg", joints=[[1, 2]] * 14)])
  with pytest.raises(AnnotationError, match=r"mpii.json: entry 1 \(image x.jpg\): joints \(14, 2\)"):
    _read(mpii, tmp_path, "mpii", MPII)
  with pytest.raises(AnnotationError, match=r"mpii.json: entry 0: needs fields"):
    _read(_mpii_file(tmp_path, [{"image": "a.jpg"}]), tmp_path, "mpii", MPII)


def test_bad_input_unknown_format_lists_the_known_ones(tmp_path):
  with pytest.raises(readers.UnknownFormatError,
                     match=r"unknown annotation format 'cocoo'; known: \['coco', 'aic'.*'mpii', "
                           r"'interhand2d'\]"):
    _read(_coco_file(tmp_path, [_ann(1)]), tmp_path, "cocoo")
  with pytest.raises(ValueError, match="no detection boxes"):
    _read(_mpii_file(tmp_path, [_mpii_entry()]), tmp_path, "mpii", MPII, det_path="d.json")


def test_bad_input_duplicate_or_incomplete_images(tmp_path):
  path = _coco_file(tmp_path, [_ann(1)])
  data = json.loads(open(path).read())
  data["images"].append(dict(data["images"][0]))
  open(path, "w").write(json.dumps(data))
  with pytest.raises(AnnotationError, match="image id 1 appears twice"):
    _read(path, tmp_path)
  del data["images"][1]
  del data["images"][0]["width"]
  open(path, "w").write(json.dumps(data))
  with pytest.raises(AnnotationError, match="image record needs 'id', 'file_name', 'width'"):
    _read(path, tmp_path)


def test_samples_survive_a_copy_without_images(tmp_path):
  """Every sample image missing → every instance is a counted skip, none silently dropped."""
  src = _samples("aic/test_aic.json")
  shutil.copy(src, tmp_path / "aic.json")
  recs, report = _read(str(tmp_path / "aic.json"), tmp_path, "aic", AIC)
  raw = json.loads(src.read_text())
  assert not recs and report.skipped == {"missing image file": len(raw["annotations"])}
