"""benchmarks/input_pipeline.py compares the same work: a short run, as a user starts it.

Its ratio is only meaningful while both sides make identical training inputs; the script
checks that first and exits non-zero otherwise. A change to the training transform that the
script's OpenCV loop does not follow (the 6.15 centre jitter once did, and the check only
printed `False`) now fails here. Its timings are never checked (benchmarks, not timed tests).
"""

import os
import re
import subprocess
import sys

from conftest import REPO, shared_path


def test_benchmark_sides_make_identical_inputs():
  samples = shared_path("data/samples")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "input_pipeline.py"),
       f"--samples={samples}", "--n=16", "--rounds=1", "--tile=200"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  out = proc.stdout
  assert "target weights equal: True" in out, out  # The same-work check (it exits otherwise).
  # The default compact batch feeds the device the host-target path's inputs.
  compact = re.search(r"^default \(compact\) vs host-target batch 0: (.*)$", out, re.M)
  assert compact, out
  assert "normalised crops equal: True" in compact.group(1), compact.group(1)
  assert compact.group(1).endswith("weights equal: True"), compact.group(1)
  assert "bytes per sample: 149592 " in out, out  # The PoseBH-B compact batch (goal <= 200,000).
  assert "ratio: " in out, out
