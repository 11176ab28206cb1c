"""benchmarks/synthetic_study.py --quick as a user runs it: one command, a table and a plot.

Checks the machinery (every arm runs: power check, equal-budget branches, low data, transfer to
a new skeleton) and the shape of what it writes; never its values or timings (the quick sizes
are far too small for a result).
"""

import json
import os
import subprocess
import sys

import cv2
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_quick_mode_writes_table_plot_and_json(tmp_path):
  out = tmp_path / "study"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "synthetic_study.py"), "--quick",
       f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=1500,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (out / "synthetic_study.md").read_text()
  for heading in ("## Power check", "## Equal budget", "## Low data",
                  "## Transfer to a new skeleton"):
    assert heading in table, heading
  for row in ("| synth_coco head on the other domain |", "| synth_aic head on the other domain |",
              "| mean head on the other domain |", "| novel via heads (mean) |",
              "| novel via prototypes (mean) |", "| own domain, synth_coco |",
              "| own domain, synth_aic |", "| 8 |", "| 16 |", "Fraction of the oracle gap closed",
              "- seed 0:", "- seed 1:"):
    assert row in table, row
  # Two seeds: every cell of the paired-difference column has an interval.
  power = table.split("## Power check")[1].split("##")[0]
  assert power.count("±") >= 9
  plot = cv2.imread(str(out / "synthetic_study.png"))
  assert plot is not None and plot.shape[0] > 100 and plot.shape[1] > 100
  assert plot.std() > 10  # Bars drawn, not a blank canvas.
  data = json.loads((out / "synthetic_study.json").read_text())
  assert [r["seed"] for r in data["results"]] == [0, 1]
  arms = {"baseline", "posebh", "oracle", "low/baseline", "low/posebh", "transfer"}
  assert arms <= set(data["results"][0])
  assert set(data["results"][0]["transfer"]) == {
      f"{b}/{n}@{t}" for b in ("baseline", "posebh") for n in (8, 16) for t in (0.05, 0.1)}
