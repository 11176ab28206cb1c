"""Tests of the synthetic multi-skeleton dataset generator (data_pipelines/synthetic)."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from data_pipelines.skeletons import SYNTHETIC_SKELETONS
from data_pipelines.synthetic import generate, render

NAMES = ("synth_coco", "synth_aic", "synth_ap10k")
SIZE = (128, 160)  # (H, W): non-square so that x/y mix-ups show.


def _files(root: str) -> dict[str, bytes]:
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      if f != generate.MANIFEST:  # The manifest holds the generation time.
        with open(p, "rb") as fh:
          out[os.path.relpath(p, root)] = fh.read()
  return out


def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _kpts(ann: dict) -> np.ndarray:
  return np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, dict[str, dict[str, str]]]:
  out = str(tmp_path_factory.mktemp("synth"))
  paths = generate.generate_synthetic_datasets(out, num_train=12, num_val=4, seed=3,
                                               image_size=SIZE)
  return out, paths


def test_layout_and_counts(dataset):
  out, paths = dataset
  assert set(paths) == set(NAMES)
  for name in NAMES:
    p = paths[name]
    assert p["image_dir"] == os.path.join(out, name, "images")
    for split, n in (("train", 12), ("val", 4)):
      assert p[split] == os.path.join(out, name, "annotations", f"{split}.json")
      data = _load(p[split])
      assert len(data["images"]) == n and len(data["annotations"]) == n
      names = sorted(f for f in os.listdir(p["image_dir"]) if f.startswith(split))
      assert names == [f"{split}_{i:06d}.jpg" for i in range(n)]
      assert [im["file_name"] for im in data["images"]] == names
  manifest = _load(os.path.join(out, generate.MANIFEST))
  assert manifest["params"]["num_train"] == 12 and manifest["params"]["image_size"] == list(SIZE)


def test_coco_format_loads_with_pycocotools(dataset):
  _, paths = dataset
  for name in NAMES:
    skel = SYNTHETIC_SKELETONS[name]
    coco = COCO(paths[name]["train"])
    (cat,) = coco.loadCats(coco.getCatIds())
    assert cat["keypoints"] == list(skel.keypoint_names)
    assert cat["skeleton"] == [[a + 1, b + 1] for a, b in skel.limbs]
    assert cat["name"] == ("animal" if skel.body_type == "quadruped" else "person")
    for img_id in coco.getImgIds():
      img = coco.loadImgs(img_id)[0]
      assert (img["height"], img["width"]) == SIZE
      pixels = cv2.imread(os.path.join(paths[name]["image_dir"], img["file_name"]))
      assert pixels.shape == (*SIZE, 3)
      (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
      assert ann["category_id"] == 1 and ann["iscrowd"] == 0
      assert len(ann["keypoints"]) == 3 * skel.num_keypoints
      assert ann["num_keypoints"] == int((_kpts(ann)[:, 2] > 0).sum()) > 0
      x, y, w, h = ann["bbox"]
      assert w > 0 and h > 0 and ann["area"] == pytest.approx(w * h, abs=0.05)


def test_full_keypoints_cover_same_body_skeletons(dataset):
  _, paths = dataset
  for name in NAMES:
    body = SYNTHETIC_SKELETONS[name].body_type
    same = {s.name for s in SYNTHETIC_SKELETONS.values() if s.body_type == body}
    for ann in _load(paths[name]["train"])["annotations"]:
      assert set(ann["full_keypoints"]) == same
      assert ann["full_keypoints"][name] == ann["keypoints"]
      for other, vals in ann["full_keypoints"].items():
        assert len(vals) == 3 * SYNTHETIC_SKELETONS[other].num_keypoints


def test_shared_keypoint_names_agree_across_skeletons(dataset):
  _, paths = dataset
  coco, aic = SYNTHETIC_SKELETONS["synth_coco"], SYNTHETIC_SKELETONS["synth_aic"]
  shared = set(coco.keypoint_names) & set(aic.keypoint_names)
  assert {"left_shoulder", "right_ankle"} <= shared
  for name in ("synth_coco", "synth_aic"):
    for ann in _load(paths[name]["train"])["annotations"]:
      a = np.asarray(ann["full_keypoints"]["synth_coco"]).reshape(-1, 3)
      b = np.asarray(ann["full_keypoints"]["synth_aic"]).reshape(-1, 3)
      for n in shared:
        np.testing.assert_array_equal(a[coco.keypoint_names.index(n)],
                                      b[aic.keypoint_names.index(n)])


def test_synth_coco_and_synth_aic_have_different_figures(dataset):
  _, paths = dataset
  a = _load(paths["synth_coco"]["train"])["annotations"][0]["full_keypoints"]["synth_aic"]
  b = _load(paths["synth_aic"]["train"])["annotations"][0]["keypoints"]
  assert a != b


def test_keypoints_inside_image_and_box(dataset):
  _, paths = dataset
  h, w = SIZE
  for name in NAMES:
    for ann in _load(paths[name]["train"])["annotations"]:
      k = _kpts(ann)
      lab = k[:, 2] > 0
      assert set(np.unique(k[:, 2])) <= {0, 1, 2}
      assert np.all(k[lab, 0] >= 0) and np.all(k[lab, 0] <= w - 1)
      assert np.all(k[lab, 1] >= 0) and np.all(k[lab, 1] <= h - 1)
      assert np.all(k[~lab, :2] == 0)  # COCO convention for unlabelled points.
      x, y, bw, bh = ann["bbox"]
      assert x >= 0 and y >= 0 and x + bw <= w - 1 + 0.01 and y + bh <= h - 1 + 0.01
      assert np.all(k[lab, 0] >= x) and np.all(k[lab, 0] <= x + bw)
      assert np.all(k[lab, 1] >= y) and np.all(k[lab, 1] <= y + bh)


def test_occluded_keypoints_occur_but_most_are_visible(dataset):
  _, paths = dataset
  v = np.concatenate([_kpts(a)[:, 2] for n in NAMES
                      for a in _load(paths[n]["train"])["annotations"]])
  assert (v == 1).sum() > 0
  assert (v == 2).mean() > 0.7


def test_images_match_renderer(dataset):
  """The file for (dataset d, split s, index i) is the render of rng [seed, d, s, i]."""
  _, paths = dataset
  for d, name in enumerate(NAMES):
    ann = _load(paths[name]["val"])["annotations"][2]
    sample = render.render_sample(np.random.default_rng([3, d, 1, 2]),
                                  SYNTHETIC_SKELETONS[name].body_type, SIZE)
    decoded = cv2.imread(os.path.join(paths[name]["image_dir"], "val_000002.jpg"))
    other = render.render_sample(np.random.default_rng([3, d, 1, 3]),
                                 SYNTHETIC_SKELETONS[name].body_type, SIZE)
    psnr = lambda img: 10 * np.log10(255 ** 2 / np.mean((decoded - img.astype(np.float64)) ** 2))
    # JPEG q90 of noisy textures stays above ~25 dB; an unrelated image is far below.
    assert psnr(sample.image) > 22 and psnr(sample.image) > psnr(other.image) + 8
    names = SYNTHETIC_SKELETONS[name].keypoint_names
    np.testing.assert_allclose(_kpts(ann)[:, :2], [sample.keypoints[n][:2] for n in names],
                               atol=0.006)


def test_determinism_and_seed_dependence(tmp_path):
  kw = dict(num_train=3, num_val=2, image_size=(96, 96))
  for sub, seed in (("a", 7), ("b", 7), ("c", 8)):
    generate.generate_synthetic_datasets(tmp_path / sub, seed=seed, **kw)
  a, b, c = (_files(tmp_path / sub) for sub in "abc")
  assert len(a) == 3 * (2 + 5)  # Two JSON files and five images per dataset.
  assert a == b  # Byte-identical JSON and JPEG files.
  for key in a:
    assert a[key] != c[key], key
  # Decoded pixels are identical too (not only the encoded bytes).
  img = "synth_ap10k/images/train_000001.jpg"
  pa = cv2.imdecode(np.frombuffer(a[img], np.uint8), cv2.IMREAD_COLOR)
  pb = cv2.imdecode(np.frombuffer(b[img], np.uint8), cv2.IMREAD_COLOR)
  np.testing.assert_array_equal(pa, pb)


def test_subset_and_workers_give_identical_output(tmp_path):
  kw = dict(num_train=4, num_val=1, seed=1, image_size=(96, 96))
  generate.generate_synthetic_datasets(tmp_path / "all", **kw)
  generate.generate_synthetic_datasets(tmp_path / "one", skeletons=("synth_ap10k",),
                                       num_workers=2, **kw)
  full, one = _files(tmp_path / "all"), _files(tmp_path / "one")
  assert set(one) == {k for k in full if k.startswith("synth_ap10k")}
  assert all(one[k] == full[k] for k in one)


def test_idempotent_and_regenerates_on_change(tmp_path):
  kw = dict(num_train=4, num_val=2, seed=0, image_size=(96, 96), skeletons=("synth_aic",))
  paths = generate.generate_synthetic_datasets(tmp_path, **kw)
  everything = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
  mtimes = {p: os.stat(p).st_mtime_ns for p in everything}
  assert generate.generate_synthetic_datasets(tmp_path, **kw) == paths
  assert {p: os.stat(p).st_mtime_ns for p in everything} == mtimes

  # Different parameters: regenerated, and images of the larger earlier run are removed.
  kw["num_train"] = 2
  generate.generate_synthetic_datasets(tmp_path, **kw)
  assert sorted(os.listdir(paths["synth_aic"]["image_dir"])) == [
      "train_000000.jpg", "train_000001.jpg", "val_000000.jpg", "val_000001.jpg"]
  assert len(_load(paths["synth_aic"]["train"])["images"]) == 2
  assert _load(tmp_path / generate.MANIFEST)["params"]["num_train"] == 2

  # A missing manifest (an interrupted run) also triggers regeneration.
  os.remove(tmp_path / generate.MANIFEST)
  generate.generate_synthetic_datasets(tmp_path, **kw)
  assert os.path.exists(tmp_path / generate.MANIFEST)


def test_rejects_unknown_dataset(tmp_path):
  with pytest.raises(ValueError, match="unknown synthetic dataset"):
    generate.generate_synthetic_datasets(tmp_path, skeletons=("coco",))


def _samples(body_type: str, n: int, size=(128, 128)):
  return [render.render_sample(np.random.default_rng([11, i]), body_type, size) for i in range(n)]


def _patch(img: np.ndarray, x: float, y: float) -> np.ndarray:
  xi, yi = int(round(x)), int(round(y))
  return img[max(yi - 1, 0):yi + 2, max(xi - 1, 0):xi + 2].astype(np.float64)


@pytest.mark.parametrize("body_type", ["biped", "quadruped"])
def test_figure_differs_from_background_at_keypoints(body_type):
  on, off = [], []
  for s in _samples(body_type, 20):
    x, y, w, h = s.bbox
    for kx, ky, v in s.keypoints.values():
      if v == 2:
        on.append(np.abs(_patch(s.image, kx, ky) - _patch(s.background, kx, ky)).mean())
    # Far from the figure the image differs from its background only by noise and blur.
    corners = [(1, 1), (s.image.shape[1] - 2, 1), (1, s.image.shape[0] - 2),
               (s.image.shape[1] - 2, s.image.shape[0] - 2)]
    for cx, cy in corners:
      if not (x - 3 <= cx <= x + w + 3 and y - 3 <= cy <= y + h + 3):
        off.append(np.abs(_patch(s.image, cx, cy) - _patch(s.background, cx, cy)).mean())
  assert len(on) > 100 and len(off) > 10
  assert np.median(on) > 30 and np.median(on) > 4 * np.median(off) + 5
  assert np.mean(np.asarray(on) > 10) > 0.9


def test_left_limbs_are_darker_than_right():
  """The side cue: left limbs are a darker shade than right limbs of the same colour."""
  wins = total = 0
  for s in _samples("biped", 30):
    for joint in ("elbow", "knee"):
      (lx, ly, lv), (rx, ry, rv) = s.keypoints[f"left_{joint}"], s.keypoints[f"right_{joint}"]
      if lv == 2 and rv == 2 and np.hypot(lx - rx, ly - ry) > 8:
        total += 1
        wins += _patch(s.image, lx, ly).mean() < _patch(s.image, rx, ry).mean()
  assert total > 20 and wins / total > 0.8


def test_quadruped_left_paws_are_lighter_than_right():
  """The quadruped's local side cue: light paws on the left legs, dark ones on the right."""
  wins = total = 0
  for s in _samples("quadruped", 30):
    for end in ("front", "back"):
      (lx, ly, lv), (rx, ry, rv) = (s.keypoints[f"left_{end}_paw"],
                                    s.keypoints[f"right_{end}_paw"])
      if lv == 2 and rv == 2 and np.hypot(lx - rx, ly - ry) > 8:
        total += 1
        wins += _patch(s.image, lx, ly).mean() > _patch(s.image, rx, ry).mean()
  assert total > 20 and wins / total > 0.8


def test_quadrupeds_face_both_ways():
  facing = [np.sign(s.keypoints["nose"][0] - s.keypoints["tail_root"][0])
            for s in _samples("quadruped", 20)]
  assert 1 in facing and -1 in facing


def test_every_skeleton_name_is_rendered():
  lm = {"biped": set(render.BIPED_LANDMARKS), "quadruped": set(render.QUADRUPED_LANDMARKS)}
  for skel in SYNTHETIC_SKELETONS.values():
    assert set(skel.keypoint_names) <= lm[skel.body_type]
  for body_type, names in lm.items():
    assert set(_samples(body_type, 1)[0].keypoints) == names


def test_speed_smoke(tmp_path):
  """50 images at the default size; no timing assertion (shared CI machines vary)."""
  paths = generate.generate_synthetic_datasets(tmp_path, num_train=50, num_val=0,
                                               skeletons=("synth_coco",))
  image_dir = paths["synth_coco"]["image_dir"]
  assert len(os.listdir(image_dir)) == 50
  assert cv2.imread(os.path.join(image_dir, "train_000049.jpg")).shape == (192, 192, 3)
  assert _load(paths["synth_coco"]["val"])["images"] == []


# --- Domain styles (issue 18: the COCO-like and AIC-like sets as different domains) -----------


def test_default_style_is_the_unstyled_renderer():
  # A style changes how draws are used, never how many: None and the default style agree, and
  # every style keeps the landmark set.
  for i in range(5):
    a = render.render_sample(np.random.default_rng([4, i]), render.BIPED, (64, 48))
    b = render.render_sample(np.random.default_rng([4, i]), render.BIPED, (64, 48),
                             render.DEFAULT_STYLE)
    assert np.array_equal(a.image, b.image) and a.keypoints == b.keypoints
    for style in render.STYLES:
      s = render.render_sample(np.random.default_rng([4, i]), render.BIPED, (64, 48), style)
      assert set(s.keypoints) == set(render.BIPED_LANDMARKS)
  with pytest.raises(ValueError, match="unknown style 'comic'"):
    render.render_sample(np.random.default_rng(0), render.BIPED, (64, 48), "comic")


def _style_stats(style: str, n: int = 40) -> tuple[float, float, float]:
  """(mean background brightness, mean arm raise (wrist above shoulder, pixels / height),
  mean occluded fraction) over `n` figures."""
  bright, raise_, occluded = [], [], []
  for i in range(n):
    s = render.render_sample(np.random.default_rng([9, i]), render.BIPED, (96, 72), style)
    bright.append(float(s.background.mean()))
    k = s.keypoints
    raise_.append(np.mean([(k[f"{side}_shoulder"][1] - k[f"{side}_wrist"][1]) / 96
                           for side in ("left", "right")]))
    occluded.append(np.mean([v == 1 for _, _, v in k.values()]))
  return float(np.mean(bright)), float(np.mean(raise_)), float(np.mean(occluded))


def test_coco_like_and_aic_like_styles_differ_in_look_pose_and_occlusion():
  coco, aic = _style_stats("coco_like"), _style_stats("aic_like")
  assert coco[0] > aic[0] + 40  # Bright busy backgrounds vs dark plain ones.
  assert aic[1] > coco[1] + 0.05  # Arms mostly raised vs mostly low.
  assert aic[2] > coco[2]  # More occluders.


def test_domain_styles_switch_in_the_generator(tmp_path):
  kw = dict(num_train=3, num_val=0, image_size=(48, 48), skeletons=("synth_coco", "synth_aic"))
  plain = generate.generate_synthetic_datasets(str(tmp_path / "plain"), **kw)
  styled = generate.generate_synthetic_datasets(str(tmp_path / "styled"), domain_styles=True,
                                                **kw)
  manifest = json.loads((tmp_path / "styled" / generate.MANIFEST).read_text())
  assert manifest["params"]["domain_styles"] is True
  assert "domain_styles" not in json.loads((tmp_path / "plain" / generate.MANIFEST).read_text())[
      "params"]
  for name in ("synth_coco", "synth_aic"):
    a = cv2.imread(os.path.join(plain[name]["image_dir"], "train_000000.jpg"))
    b = cv2.imread(os.path.join(styled[name]["image_dir"], "train_000000.jpg"))
    assert not np.array_equal(a, b)
    # Each styled image is the renderer's image in the dataset's style.
    d = list(SYNTHETIC_SKELETONS).index(name)
    ref = render.render_sample(np.random.default_rng([0, d, 0, 0]), render.BIPED, (48, 48),
                               generate.DOMAIN_STYLES[name]).image
    assert np.abs(b.astype(int) - ref.astype(int)).mean() < 6  # JPEG.
