"""posebh-infer on the sample images with the converted tiny reference checkpoint: the JSON
schema and keypoint counts, overlays that decode and show the drawn keypoints, skeletons the
image's dataset does not annotate, the boxes file forms, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import REPO, shared_path
from configs import posebh as posebh_configs
from data_pipelines.skeletons import get_skeleton
from posebh_jax import image_inference, inference

CONFIG = f"{REPO / 'configs' / 'posebh.py'}:tiny_reference"
COUNTS = dict(coco=17, aic=14, mpii=16, ap10k=17, apt36k=17, coco_wholebody=133)


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  return subprocess.run([sys.executable, "-m", "posebh_jax.main_infer", f"--config={CONFIG}",
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _check_doc(doc: dict, image_path: str, skeletons: list[str], num_instances: int) -> None:
  """The per-image JSON schema."""
  h, w = cv2.imread(image_path).shape[:2]
  assert (doc["image"], doc["height"], doc["width"]) == (image_path, h, w)
  assert doc["skeletons"] == skeletons and doc["flip_test"] is True
  assert len(doc["instances"]) == num_instances
  for inst in doc["instances"]:
    assert len(inst["box"]) == 4 and 0 < inst["box_score"] <= 1
    assert list(inst["poses"]) == skeletons
    for name, kpts in inst["poses"].items():
      assert len(kpts) == COUNTS[name]  # 17 / 133 / 17 ...
      assert [k["name"] for k in kpts] == list(get_skeleton(name).keypoint_names)
      for k in kpts:
        assert set(k) == {"name", "x", "y", "score"}
        assert all(np.isfinite([k["x"], k["y"], k["score"]]))


def _drawn_keypoints_show(png: np.ndarray, image: np.ndarray, doc: dict) -> int:
  """Checks that the overlay differs from the image at every drawn keypoint inside it; returns
  how many were checked."""
  h, w = image.shape[:2]
  checked = 0
  for inst in doc["instances"]:
    for kpts in inst["poses"].values():
      for k in kpts:
        x, y = round(k["x"]), round(k["y"])
        if k["score"] > 0 and 2 <= x < w - 2 and 2 <= y < h - 2:
          assert not np.array_equal(png[y, x], image[y, x]), (k, png[y, x], image[y, x])
          checked += 1
  return checked


def test_cli_on_samples_with_boxes_and_foreign_skeletons(tiny_weights, tmp_path):
  """COCO images get AP-10K keypoints, AP-10K images COCO and WholeBody keypoints (skeletons
  their datasets do not annotate); an image the boxes file does not list gets no instance."""
  coco_img = str(shared_path("data/samples/coco/000000000785.jpg"))
  ap10k_dir = str(shared_path("data/samples/ap10k"))
  gt = json.loads(shared_path("data/samples/ap10k/test_ap10k.json").read_text())
  ap_box = next(a["bbox"] for a in gt["annotations"] if a["image_id"] == 4)
  boxes = tmp_path / "boxes.json"
  boxes.write_text(json.dumps({"000000000785.jpg": [[280.79, 44.73, 218.7, 346.68, 0.9]],
                               "000000000004.jpg": [ap_box]}))
  out = tmp_path / "out"
  skeletons = ["coco", "coco_wholebody", "ap10k"]
  r = _run(f"--weights={tiny_weights}", f"--images={coco_img},{ap10k_dir}",
           f"--boxes={boxes}", f"--skeletons={','.join(skeletons)}", f"--out={out}",
           "--score_thr=0")  # The untrained tiny model's scores are ~0.15-0.5.
  assert r.returncode == 0, r.stderr[-3000:]
  assert "3 image(s)" in r.stdout
  assert sorted(os.listdir(out)) == sorted(
      f"{s}.{e}" for s in ("000000000785", "000000000004", "000000037516") for e in ("json", "png"))
  checked = 0
  for stem, path, n in (("000000000785", coco_img, 1),
                        ("000000000004", os.path.join(ap10k_dir, "000000000004.jpg"), 1),
                        ("000000037516", os.path.join(ap10k_dir, "000000037516.jpg"), 0)):
    doc = json.loads((out / f"{stem}.json").read_text())
    _check_doc(doc, path, skeletons, n)
    png = cv2.imread(str(out / f"{stem}.png"))
    image = cv2.imread(path)
    assert png is not None and png.shape == image.shape
    if n == 0:
      np.testing.assert_array_equal(png, image)  # Nothing to draw: the image itself.
    else:
      checked += _drawn_keypoints_show(png, image, doc)
  assert checked > 50  # Most of the 2 x 167 keypoints fall inside the images.
  doc = json.loads((out / "000000000785.json").read_text())
  assert doc["instances"][0]["box_score"] == pytest.approx(0.9)


def test_cli_whole_images_through_prototypes(tiny_weights, tmp_path):
  out = tmp_path / "out"
  mpii = str(shared_path("data/samples/mpii/004645041.jpg"))
  r = _run(f"--weights={tiny_weights}", f"--images={mpii}", "--skeletons=mpii,aic",
           "--through=prototypes", f"--out={out}", "--score_thr=0", "--noflip_test")
  assert r.returncode == 0, r.stderr[-3000:]
  doc = json.loads((out / "004645041.json").read_text())
  assert doc["through"] == "prototypes" and doc["flip_test"] is False
  h, w = cv2.imread(mpii).shape[:2]
  assert doc["instances"][0]["box"] == [0.0, 0.0, float(w), float(h)]
  assert [len(v) for v in doc["instances"][0]["poses"].values()] == [16, 14]


def test_cli_skips_boxes_wholly_outside_the_image_naming_them(tiny_weights, tmp_path):
  coco_img = str(shared_path("data/samples/coco/000000000785.jpg"))
  h, w = cv2.imread(coco_img).shape[:2]
  boxes = tmp_path / "boxes.json"
  boxes.write_text(json.dumps({"000000000785.jpg": [
      [280.79, 44.73, 218.7, 346.68, 0.9], [5000, 40, 90, 120], [-300, 10, 200, 100]]}))
  out = tmp_path / "out"
  r = _run(f"--weights={tiny_weights}", f"--images={coco_img}", f"--boxes={boxes}",
           "--skeletons=coco", f"--out={out}", "--score_thr=0")
  assert r.returncode == 0, r.stderr[-3000:]
  for i, box in ((1, "[5000, 40, 90, 120]"), (2, "[-300, 10, 200, 100]")):
    assert (f"{coco_img}: box {i} {box} lies wholly outside the {w}x{h} image: skipped (no "
            "keypoints)") in r.stderr, r.stderr[-3000:]
  doc = json.loads((out / "000000000785.json").read_text())
  assert doc["instances"][0]["box"] == [280.79, 44.73, 218.7, 346.68]
  _check_doc(doc, coco_img, ["coco"], 1)
  for k in doc["instances"][0]["poses"]["coco"]:
    assert -w < k["x"] < 2 * w  # Nothing at x ≈ 5045.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes.json", "out"]
  assert sorted(p.name for p in out.iterdir()) == ["000000000785.json", "000000000785.png"]


@pytest.mark.parametrize("args,message", [
    (["--skeletons=coco,crowdpose"], "unknown skeleton 'crowdpose'"),
    (["--boxes={bad_json}"], "bad.json: not valid JSON"),
    (["--boxes={empty_box}"], "record '000000000785.jpg' box 1: box width and height must be "
                              "positive"),
    (["--images=/nonexistent/x.jpg"], "no such image or folder: /nonexistent/x.jpg"),
])
def test_cli_bad_input_fails_before_loading_the_model(tmp_path, args, message):
  (tmp_path / "bad.json").write_text('{"000000000785.jpg": [[1, 2, 3, 4]')
  (tmp_path / "empty.json").write_text(json.dumps(
      {"000000000785.jpg": [[1, 2, 3, 4], [10, 10, 0, 50]]}))
  args = [a.format(bad_json=tmp_path / "bad.json", empty_box=tmp_path / "empty.json")
          for a in args]
  if not any(a.startswith("--images") for a in args):
    args.append(f"--images={shared_path('data/samples/coco/000000000785.jpg')}")
  # No converted weights exist at this path: the input errors must come first.
  r = _run(f"--weights={tmp_path / 'no_weights'}", f"--out={tmp_path / 'out'}", *args)
  assert r.returncode != 0
  assert message in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "out").exists()


# --- In-process pieces -------------------------------------------------------------------------

def test_coco_detection_file_as_boxes():
  det = str(shared_path("data/samples/coco/test_coco_det_AP_H_56.json"))
  table = image_inference.load_boxes(det, score_thr=0.5)
  raw = json.loads(open(det).read())
  want = sum(1 for d in raw if d["image_id"] == 785 and d["score"] >= 0.5)
  assert len(image_inference.boxes_for(table, "/x/000000000785.jpg")) == want > 0
  assert image_inference.boxes_for(table, "/x/000000000786.jpg") == []
  assert all(len(b) == 5 and b[4] >= 0.5 for b in table[785])


@pytest.mark.parametrize("content,message", [
    ('[{"image_id": 1}]', "record 0: a detection needs 'image_id' and 'bbox'"),
    ('[{"image_id": "x", "bbox": [1, 2, 3, 4]}]', "record 0: image_id 'x' is not an integer"),
    ('[{"image_id": 1, "bbox": [1, 2, 3, 4]}, {"image_id": 2, "bbox": [1, 2, 3]}]',
     "record 1: bbox must be [x, y, w, h]"),
    ('[{"image_id": 1, "bbox": [1, 2, 3, 4], "score": "high"}]', "record 0: score must be a"),
    ('[{"image_id": 1, "bbox": [1, 2, 0, 4]}]', "record 0: box width and height must be"),
    ('{"a.jpg": {"x": 1}}', "record 'a.jpg': expected a list of boxes"),
    ('"boxes"', "expected an object"),
    ('\xff\xfe', "not valid JSON"),
])
def test_malformed_boxes_files_name_file_and_record(tmp_path, content, message):
  path = tmp_path / "boxes.json"
  path.write_bytes(content.encode("latin-1"))
  with pytest.raises(image_inference.BoxesFileError, match="boxes file .*boxes.json") as e:
    image_inference.load_boxes(str(path))
  assert message in str(e.value)
  with pytest.raises(FileNotFoundError, match="no such boxes file"):
    image_inference.load_boxes(str(tmp_path / "none.json"))


def test_image_discovery(tmp_path):
  for name in ("b.jpg", "a.PNG", "notes.txt"):
    (tmp_path / name).write_bytes(b"x")
  assert image_inference.discover_images(str(tmp_path)) == [str(tmp_path / "a.PNG"),
                                                       str(tmp_path / "b.jpg")]
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.png").write_bytes(b"x")
  with pytest.raises(image_inference.ImagesError, match="would both write b.json"):
    image_inference.discover_images(f"{tmp_path},{tmp_path / 'sub' / 'b.png'}")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no images .* in folder"):
    image_inference.discover_images(str(tmp_path / "empty"))


def test_corrupt_image_is_skipped_named_and_the_rest_written(tiny_weights, tmp_path):
  predictor = inference.Predictor.from_checkpoint(posebh_configs.get_config("tiny_reference"),
                                                  tiny_weights, batch_size=2)
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
  good = str(shared_path("data/samples/aic/054d9ce9201beffc76e5ff2169d2af2f027002ca.jpg"))
  result = image_inference.infer_images(predictor, [str(corrupt), good], None, ["aic"], "head",
                                   str(tmp_path / "out"), overlay_max_side=300)
  assert len(result["failed"]) == 1 and "corrupt.jpg" in result["failed"][0]
  stem = tmp_path / "out" / "054d9ce9201beffc76e5ff2169d2af2f027002ca"
  assert result["written"] == [str(stem) + ".json"]
  assert not (tmp_path / "out" / "corrupt.json").exists()
  h, w = cv2.imread(good).shape[:2]
  png = cv2.imread(str(stem) + ".png")  # Shrunk overlay; the JSON stays in image pixels.
  assert max(png.shape[:2]) == 300 and abs(png.shape[1] / png.shape[0] - w / h) < 0.01
  assert json.loads((tmp_path / "out" / f"{stem.name}.json").read_text())["width"] == w


def test_overlay_draws_each_skeleton_in_its_colours():
  from posebh_jax import visualize
  image = np.full((120, 160, 3), 7, np.uint8)
  coco = get_skeleton("coco")
  kpts = np.zeros((17, 3), np.float32)
  kpts[:, 0] = np.linspace(10, 150, 17)
  kpts[:, 1] = 60
  kpts[:, 2] = 0.9
  kpts[3, 2] = 0.1  # Below the threshold: not drawn.
  out = visualize.draw_poses(image, [dict(skeleton="coco", keypoints=kpts)], score_thr=0.3,
                             radius=3, draw_boxes=False)
  assert out.dtype == np.uint8 and out.shape == image.shape
  np.testing.assert_array_equal(image, 7)  # The input is not modified.
  assert len(coco.keypoint_colors) == 17
  for k in (0, 5, 16):  # Keypoints are drawn last, in the skeleton's keypoint colours.
    x, y = round(kpts[k, 0]), 60
    assert tuple(out[y, x]) == tuple(coco.keypoint_colors[k])
    np.testing.assert_array_equal(out[y - 6, x], image[y - 6, x])  # Beyond the dot: untouched.
  assert tuple(out[56, round(kpts[3, 0])]) == (7, 7, 7)  # No dot at the dropped keypoint.
  assert tuple(out[56, round(kpts[4, 0])]) != (7, 7, 7)  # Its neighbour has one.
  red = visualize.draw_poses(image, [dict(skeleton="coco", keypoints=kpts)],
                             skeleton_colors={"coco": (255, 0, 0)}, radius=3, draw_boxes=False)
  assert tuple(red[60, round(kpts[5, 0])]) == (255, 0, 0)
  with pytest.raises(ValueError, match="has 17 keypoints"):
    visualize.draw_poses(image, [dict(skeleton="coco", keypoints=kpts[:5])])
