"""benchmarks/train_step.py as a user starts it, at the tiny size: every line it promises.

Its timings are never checked (benchmarks, not timed tests); what is checked is that both steps
are built and timed, that XLA's FLOP counts see the PoseBH step doing more work than the
multi-head one, that the per-step scratch/page-fault line is there for each step, and that the
PyTorch side says why it was not timed (the port is PoseBH-B only; torch is an optional extra).
"""

import importlib.util
import os
import re
import subprocess
import sys

from conftest import REPO


def test_tiny_run_prints_both_steps_their_ratio_and_why_no_reference():
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), "--size=tiny",
       "--batch=8", "--repeats=1", "--settle=0"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      # One CPU device, as on a laptop (the suite's 8 simulated ones only slow the compile).
      env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
           "PYTHONPATH": str(REPO)})
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  out = proc.stdout
  gflops = {}
  for label, name in (("multi-head step (ViTPose++):", "multi-head"),
                      ("PoseBH step (proto + CPS + CSS):", "posebh")):
    row = re.search(re.escape(label) + r"\s+([\d.]+) ms\s+([\d.]+) img/s\s+([\d.]+) GFLOP/image",
                    out)
    assert row, out
    assert float(row.group(1)) > 0 and float(row.group(2)) > 0
    gflops[name] = float(row.group(3))
    usage = re.search(rf"^  {name}: XLA scratch buffer (\d+) MiB; per step (\d+) minor page "
                      r"faults, ([\d.]+) s system CPU", out, re.M)
    assert usage and int(usage.group(1)) > 0, out
  assert gflops["posebh"] > gflops["multi-head"] > 0, gflops
  ratio = re.search(r"^overhead ratio \(FLOPs\): ([\d.]+)$", out, re.M)
  assert ratio and float(ratio.group(1)) > 1, out
  assert re.search(r"^overhead ratio \(time\):\s+[\d.]+", out, re.M), out
  why = ("the PyTorch port is PoseBH-B float32 only" if importlib.util.find_spec("torch")
         else "PyTorch is not installed")
  assert f"reference (PyTorch port): not timed: {why}" in out, out
