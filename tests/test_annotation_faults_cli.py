"""Bad annotation files met through `posebh-train` on the real sample data: one line naming the
file (and the record), no traceback, nothing outside the workdir changed (issue 15 item 11)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, shared_path
from faultcheck import changed, snapshot


def _train(data_root, workdir):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run(
      [sys.executable, "-m", "posebh_jax.main_train", "--config=configs/samples.py",
       f"--workdir={workdir}", f"--config.data.root={data_root}", "--config.train.num_steps=1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("fault", ["non_utf8", "image_null"])
def test_bad_mpii_annotation_file_is_one_line_naming_it(tmp_path, fault):
  root = tmp_path / "samples"
  shutil.copytree(shared_path("data/samples"), root)
  ann = root / "mpii" / "test_mpii.json"
  entries = json.loads(ann.read_text())
  if fault == "image_null":
    entries[1]["image"] = None
    ann.write_text(json.dumps(entries))
    want = f"posebh-train: {ann}: entry 1: 'image' must be an image file name, got None"
  else:
    text = json.dumps(entries).encode()
    at = text.index(b'"image"')
    ann.write_bytes(text[:at + 1] + b"\xe9" + text[at + 1:])  # A raw Latin-1 byte in a key.
    want = (f"posebh-train: {ann}: not UTF-8 (byte 0xe9 at offset {at + 1}); JSON annotation "
            "files must be UTF-8")
  before = snapshot(REPO, tmp_path, exclude=(tmp_path / "wd",))
  r = _train(root, tmp_path / "wd")
  assert r.returncode == 1
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == want
  assert changed(before, snapshot(REPO, tmp_path, exclude=(tmp_path / "wd",))) == []
