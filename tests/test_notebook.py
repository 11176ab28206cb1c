"""notebooks/posebh_colab.ipynb runs top to bottom on CPU (nbclient), so it cannot rot.

It converts ../shared/golden/tiny_posebh.pth, evaluates on the sample data, predicts three
skeletons through both routes, draws overlays and round-trips the export. Without ../shared
the notebook falls back to an untrained model and a synthetic image; the test then checks only
that it runs."""

from __future__ import annotations

import os
import sys

import cv2
import pytest

from conftest import REPO, SHARED

nbformat = pytest.importorskip("nbformat", reason="the test extra (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="the test extra (pip install -e '.[test]')")

NOTEBOOK = REPO / "notebooks" / "posebh_colab.ipynb"


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", ()):
      if o.get("output_type") == "stream":
        out.append(o["text"])
  return "".join(out)


@pytest.mark.slow
def test_notebook_executes_top_to_bottom(tmp_path, monkeypatch):
  # The kernel inherits this environment: never pip install, write under tmp_path, and start
  # the same interpreter (the kernelspec says just "python").
  monkeypatch.setenv("POSEBH_NOTEBOOK_CI", "1")
  monkeypatch.setenv("POSEBH_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("POSEBH_SHARED", str(SHARED))
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  text = _text(nb)
  assert "max |reloaded - live| = 0.0" in text
  for through in ("head", "prototypes"):
    overlay = cv2.imread(str(tmp_path / f"overlay_{through}.png"))
    assert overlay is not None and overlay.shape[2] == 3
  if (SHARED / "golden" / "tiny_posebh.pth").is_file():
    assert "converted 162 tensors" in text
    assert "head       coco_wholebody  (133, 3)" in text
    assert "prototypes ap10k           (17, 3)" in text
    for name in ("coco", "aic", "mpii", "ap10k", "coco_wholebody"):
      assert any(line.startswith(name + " ") for line in text.splitlines()), name
  else:
    assert "untrained initialisation" in text
