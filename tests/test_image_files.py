"""One read-then-decode path for every image (issue 15 items 7–10), on real files.

  7. a file name that is not UTF-8 (read through os.fsencode bytes) is read, trained on,
     inferred on and written back (cv2.imread/imwrite crashed on such names with SIGSEGV);
  8. a truncated JPEG is a decode error in every path (reader check, TFDS bytes, training,
     inference), never a grey-filled image;
  9. undecodable images met by posebh-train are counted skips, logged with the file; above
     `data.max_bad_images` the run stops with one clear line, and a resume does not crash-loop;
 10. an image whose real size differs from its annotation (1×1 recorded as 640×425) is named.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from data_pipelines import image_files, pipeline, readers
from data_pipelines.skeletons import SYNTH_AIC, SYNTH_AP10K, SYNTH_COCO, SkeletonLayout
from data_pipelines.synthetic import generate
from posebh_jax import inference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = SkeletonLayout((SYNTH_COCO, SYNTH_AIC, SYNTH_AP10K))
HW = (64, 48)


def _cfg() -> pipeline.TopDownConfig:
  return pipeline.TopDownConfig(layout=LAYOUT, encodings=("udp", "msra", "msra"),
                                image_size_hw=HW, heatmap_size_hw=(16, 12))


def _dataset(tmp_path, num_train=2):
  """A small synth_coco dataset: (annotation path, image dir)."""
  files = generate.generate_synthetic_datasets(str(tmp_path / "data"), num_train=num_train,
                                               num_val=0, seed=3, image_size=(96, 96),
                                               skeletons=("synth_coco",))["synth_coco"]
  return files["train"], files["image_dir"]


def _read(ann, image_dir, **kw):
  return readers.read_dataset("coco", ann, image_dir, SYNTH_COCO, 0, image_size_hw=HW, **kw)


def test_truncated_jpeg_is_a_decode_error_in_every_path(tmp_path, caplog):
  ann, image_dir = _dataset(tmp_path)
  path = os.path.join(image_dir, "train_000000.jpg")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) * 2 // 3])  # Header intact, scan data cut off.
  truncated = open(path, "rb").read()
  assert image_files.decode_bgr(truncated) is None
  # The reader's decode check counts it; the existence check alone keeps it.
  records, report = _read(ann, image_dir, decode_images=True)
  assert report.skipped == {"corrupt image": 1} and len(records) == 1
  records, _ = _read(ann, image_dir)
  bad = next(r for r in records if r["image_path"] == path)
  # Evaluation and TFDS-stored bytes: a clear error naming the file.
  with pytest.raises(image_files.ImageDecodeError,
                     match=r"cannot decode image .*train_000000.jpg .*truncated"):
    pipeline.load_image(bad)
  with pytest.raises(image_files.ImageDecodeError, match=r"train_000000.jpg .*ann_id"):
    image_files.decode_record_image(dict(bad, image_bytes=truncated))
  with pytest.raises(pipeline.ImageError, match="cannot decode image .*train_000000.jpg"):
    inference.read_rgb(path)
  # Training: a counted skip, logged with the file.
  with caplog.at_level(logging.WARNING, logger="posebh"):
    ex = pipeline.TopDownTrainTransform(_cfg()).random_map(bad, np.random.default_rng(0))
  assert ex["skipped"] == 1 and not ex["target_weight"].any()
  assert "train_000000.jpg" in caplog.text


def test_image_size_other_than_annotated_is_named(tmp_path, caplog):
  ann, image_dir = _dataset(tmp_path)
  path = os.path.join(image_dir, "train_000001.jpg")
  ok, buf = cv2.imencode(".jpg", np.full((1, 1, 3), 128, np.uint8))
  assert ok
  with open(path, "wb") as f:
    f.write(buf.tobytes())
  doc = json.load(open(ann))
  for img in doc["images"]:
    if img["file_name"] == "train_000001.jpg":
      img["width"], img["height"] = 640, 425
  with open(ann, "w") as f:
    json.dump(doc, f)
  records, report = _read(ann, image_dir, decode_images=True)
  assert report.skipped == {"image size differs from annotation": 1} and len(records) == 1
  records, _ = _read(ann, image_dir)
  bad = next(r for r in records if r["image_path"] == path)
  assert list(bad["image_wh"]) == [640, 425]
  with pytest.raises(image_files.ImageSizeError,
                     match=r"train_000001.jpg .* is 1x1 pixels but its annotation says 640x425"):
    pipeline.load_image(bad)
  with caplog.at_level(logging.WARNING, logger="posebh"):
    ex = pipeline.TopDownTrainTransform(_cfg()).random_map(bad, np.random.default_rng(0))
  assert ex["skipped"] == 1 and "train_000001.jpg" in caplog.text
  good = next(r for r in records if r["image_path"] != path)
  assert pipeline.load_image(good).shape == (96, 96, 3)


def test_non_utf8_file_names_are_read_trained_inferred_and_written(tmp_path):
  ann, image_dir = _dataset(tmp_path, num_train=1)
  # In a subprocess: before the fix such a name crashed the whole process (SIGSEGV).
  script = textwrap.dedent(f"""\
      import json, os
      import numpy as np
      from data_pipelines import pipeline, readers, storage
      from data_pipelines.skeletons import SYNTH_AIC, SYNTH_AP10K, SYNTH_COCO, SkeletonLayout
      from posebh_jax import image_inference, inference, visualize

      image_dir = {image_dir!r}
      raw = os.path.join(os.fsencode(image_dir), b"caf\\xe9_\\xff.jpg")  # Latin-1, not UTF-8.
      os.rename(os.path.join(os.fsencode(image_dir), b"train_000000.jpg"), raw)
      name = os.fsdecode(raw)  # Surrogate escapes: what Python gives for such names.
      doc = json.load(open({ann!r}))
      doc["images"][0]["file_name"] = os.path.basename(name)
      json.dump(doc, open({ann!r}, "w"))  # \\udce9 escapes: they decode to the same str.
      records, report = readers.read_dataset("coco", {ann!r}, image_dir, SYNTH_COCO, 0,
                                             image_size_hw={HW!r}, decode_images=True)
      assert report.kept == 1 and records[0]["image_path"] == name, report
      layout = SkeletonLayout((SYNTH_COCO, SYNTH_AIC, SYNTH_AP10K))
      cfg = pipeline.TopDownConfig(layout=layout, encodings=("udp", "msra", "msra"),
                                   image_size_hw={HW!r}, heatmap_size_hw=(16, 12))
      ex = pipeline.TopDownTrainTransform(cfg).random_map(records[0], np.random.default_rng(0))
      assert ex["skipped"] == 0 and ex["target_weight"].sum() > 0
      assert image_inference.discover_images(image_dir) == [name]
      rgb = inference.read_rgb(name)
      np.testing.assert_array_equal(rgb, pipeline.load_image(records[0]))
      out = os.path.join({str(tmp_path)!r}, os.path.splitext(os.path.basename(name))[0] + ".png")
      visualize.save_overlay(out, rgb, [])
      assert os.path.basename(os.fsencode(out)) == b"caf\\xe9_\\xff.png"
      print("read", rgb.shape, "from", storage.display(name))
      """)
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
  assert out.returncode == 0, f"rc {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
  assert out.stdout.strip().endswith(r"caf\xe9_\xff.jpg")
  assert (tmp_path / os.fsdecode(b"caf\xe9_\xff.png")).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_training_skips_bad_images_counts_them_and_stops_at_the_limit(tmp_path):
  """posebh-train on data whose synth_coco training images are all truncated."""
  from configs import synthetic
  from posebh_jax import experiment
  cfg = synthetic.get_config("tiny")
  cfg.data.root = str(tmp_path / "data")
  files = experiment.resolve_dataset_files(cfg, str(tmp_path))  # What the CLI will reuse.
  image_dir = files[0].image_dir
  for f in sorted(os.listdir(image_dir)):
    if f.startswith("train_"):
      p = os.path.join(image_dir, f)
      data = open(p, "rb").read()
      with open(p, "wb") as fh:
        fh.write(data[:len(data) // 2])
  workdir = str(tmp_path / "run")
  base = [sys.executable, "-m", "posebh_jax.main_train", "--config=configs/synthetic.py:tiny",
          f"--workdir={workdir}", f"--config.data.root={cfg.data.root}",
          "--config.train.eval_at_end=False"]
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  first = subprocess.run(base + ["--config.train.num_steps=2", "--config.data.max_bad_images=-1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  log = first.stdout + first.stderr
  assert first.returncode == 0, log[-3000:]
  assert "skipping a training sample: cannot decode image " in log
  assert f"{image_dir}/train_0000" in log and "truncated" in log
  assert "training sample(s) skipped for an unusable image" in log
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  # The rerun resumes (no crash loop on the bad files) and stops at the limit with one line.
  second = subprocess.run(base + ["--config.train.num_steps=4", "--config.data.max_bad_images=0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  log = second.stdout + second.stderr
  assert second.returncode == 1, log[-3000:]
  assert "resumed from checkpoint at step 2" in log
  assert "Traceback" not in log
  # The stop is one line (input prefetch threads may still log a warning after it).
  stops = [line for line in second.stderr.splitlines() if line.startswith("posebh-train: ")]
  assert len(stops) == 1 and "more than data.max_bad_images=0" in stops[0], log[-3000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))  # Nothing lost.
