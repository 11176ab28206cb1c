"""notebooks/posebh_colab.ipynb runs top to bottom on CPU (nbclient), so it cannot rot.

It needs nothing beside the repository (no ../shared): it trains a short synthetic run, evaluates
it, predicts three skeletons through both routes on a held-out image, draws overlays and
round-trips the export. The test checks that the model it shows is trained (well above the
untrained model's 0.03-0.06 PCK@0.1) and that every metric it prints is a fraction."""

from __future__ import annotations

import json
import os
import re
import sys

import cv2
import numpy as np
import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat", reason="the test extra (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="the test extra (pip install -e '.[test]')")

NOTEBOOK = REPO / "notebooks" / "posebh_colab.ipynb"
STEPS = 150


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", ()):
      if o.get("output_type") == "stream":
        out.append(o["text"])
  return "".join(out)


@pytest.mark.slow
def test_notebook_executes_top_to_bottom(tmp_path, monkeypatch):
  # The kernel inherits this environment: never pip install, write under tmp_path, no shared
  # data, and start the same interpreter (the kernelspec says just "python").
  monkeypatch.setenv("POSEBH_NOTEBOOK_CI", "1")
  monkeypatch.setenv("POSEBH_NOTEBOOK_WORKDIR", str(tmp_path))
  # Half the notebook's 300 training steps (every cell runs the same; ~40 s less on 2 cores).
  # 150 steps already give PCK@0.1 0.44 (synth_coco) and 0.38 (synth_aic), checked below.
  monkeypatch.setenv("POSEBH_NOTEBOOK_STEPS", str(STEPS))
  monkeypatch.delenv("POSEBH_WORKDIR", raising=False)
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # One device, as in Colab (not 8 simulated).
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert "git clone" in "".join(nb.cells[0].source)  # The first cell says how to get the repo.
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  text = _text(nb)
  assert f"trained {STEPS} steps" in text
  assert "max |reloaded - live| = 0.0" in text
  # The evaluation table: fractions, and a trained model.
  rows = re.findall(r"^(\S+ -> \S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", text, re.M)
  assert len(rows) == 5, text  # Three datasets + two cross-skeleton pairs.
  for _, _, p05, p10 in rows:
    assert 0.0 <= float(p05) <= float(p10) <= 1.0
  own = {name: float(p10) for name, _, _, p10 in rows if name.split(" -> ")[0] == name.split(
      " -> ")[1]}
  assert own["synth_coco -> synth_coco"] > 0.3 and own["synth_aic -> synth_aic"] > 0.3, own
  metrics_file = tmp_path / "synthetic_run" / "eval_cli" / "all" / f"metrics_{STEPS}.json"
  metrics = json.load(open(metrics_file))
  assert metrics["per_dataset"]["synth_coco"]["pck@0.1"] == pytest.approx(
      own["synth_coco -> synth_coco"], abs=1e-3)
  assert "synth_aic    (14, 3)" in text and "prototypes synth_ap10k  (17, 3)" in text
  for through in ("head", "prototypes"):
    overlay = cv2.imread(str(tmp_path / f"overlay_{through}.png"))
    assert overlay is not None and overlay.shape[2] == 3
    # Both human skeletons were drawn, each in its own palette (COCO-like green/orange, AIC-like
    # magenta/cyan): both palettes' pixels appear.
    rgb = cv2.cvtColor(overlay, cv2.COLOR_BGR2RGB).astype(np.int64)
    def count(color):
      return int((np.abs(rgb - np.asarray(color)).sum(-1) < 60).sum())
    if through == "head":
      assert count((0, 255, 0)) + count((255, 128, 0)) > 20
      assert count((255, 0, 255)) + count((0, 255, 255)) > 20
