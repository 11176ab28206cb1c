"""benchmarks/fault_battery.py's classification machinery (the battery itself runs by hand).

  * two real cases through `posebh-train` (one expected clear error, one expected counted
    skip), classified as expected, the exit status 0 and the counts printed;
  * the classifier on made-up outcomes: a traceback, a signal, an error line that names
    nothing, a silent success, a changed file outside the job, a lost checkpoint.
"""

import re
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fault_battery as fb  # noqa: E402


def test_two_real_cases_are_classified_as_expected(tmp_path):
  r = subprocess.run([sys.executable, "benchmarks/fault_battery.py",
                      "--only=ann_non_utf8_bytes,train_missing_image_files",
                      f"--root={tmp_path / 'battery'}"], cwd=REPO, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]
  assert re.search(r"^11 ann_non_utf8_bytes +clear error .*posebh-train: <root>/cases/"
                   r"ann_non_utf8_bytes/data/synth_coco/annotations/train\.json: not UTF-8 "
                   r"\(byte 0xe9 at offset \d+\)", r.stdout, re.M), r.stdout
  assert re.search(r"^ 9 train_missing_image_files +counted skip .*synth_ap10k/annotations/"
                   r"train\.json: kept \d+ instances; skipped 5 \(missing image file: 5\)",
                   r.stdout, re.M), r.stdout
  assert "2 cases in " in r.stdout and "clear error 1, counted skip 1" in r.stdout


def _run(rc=0, err="", out=""):
  return fb.Run(["x"], rc, out, err, 0.0)


@pytest.fixture
def witness(tmp_path):
  (tmp_path / "mine.txt").write_text("keep")
  (tmp_path / "wd" / "checkpoints" / "2").mkdir(parents=True)
  return fb.Witness(tmp_path, own=(tmp_path / "wd",), workdir=tmp_path / "wd")


@pytest.mark.parametrize("run,want", [
    (_run(1, "Traceback (most recent call last):\n  ...\nKeyError: 'x'"), "traceback"),
    (_run(-11, "x"), "crash"),
    (_run(1, "posebh-train: something went wrong"), "unclear error"),
    (_run(1, "posebh-train: /data/a.json: not UTF-8"), "clear error"),
    (_run(0, out="kept 3 instances; skipped 2 (missing image: 2)"), "counted skip"),
    (_run(0), "silent"),
])
def test_classifier(witness, run, want):
  got = fb.classify(run, witness=witness, prog="posebh-train: ", names=("/data/a.json",),
                    skip=r"skipped [1-9]\d* \(")
  assert got.cls == want, got


def test_classifier_sees_lost_data_first(witness, tmp_path):
  (tmp_path / "mine.txt").write_text("changed")
  got = fb.classify(_run(1, "posebh-train: /data/a.json: bad"), witness=witness,
                    prog="posebh-train: ", names=("/data/a.json",))
  assert got.cls == "data lost" and "mine.txt" in got.detail
  (tmp_path / "mine.txt").write_text("keep")
  fb.Witness.__init__(witness, tmp_path, own=(tmp_path / "wd",), workdir=tmp_path / "wd")
  (tmp_path / "wd" / "checkpoints" / "2").rmdir()
  got = fb.classify(_run(0), witness=witness, correct=lambda: None)
  assert got.cls == "data lost" and got.detail == "checkpoint 2 lost"
  (tmp_path / "wd" / "checkpoints_damaged" / "2").mkdir(parents=True)  # Set aside: kept.
  assert fb.classify(_run(0), witness=witness, correct=lambda: None).cls == "correct"
