"""The README's command blocks, run as a user runs them: in a plain clone without ../shared.

Every `posebh-*` / `python` command of the README's ```bash blocks is either run here (in a copy
of the repository placed where no ../shared exists, training shortened by overrides appended to
the command) or matches one stated reason why it cannot run here (the user's own data, weights,
accelerators or cluster). A new command block that fits neither fails this test until it is
classified. The README's Python snippets for inference and export run too.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import COMPILATION_CACHE

REPO = pathlib.Path(__file__).resolve().parents[1]

# Commands that need what only the user has; each with the reason.
NOT_HERE = [
    (r"\bpip install\b|python3 -m venv|^\. \.venv/bin/activate",
     "the install itself: CI runs it on a fresh machine"),
    (r"python -m pytest", "the test suite itself"),
    (r"=/data\b|--config.data.root=/data", "the real datasets under /data"),
    (r"/ckpt/|converted/|\.pth\b", "the authors' checkpoints, downloaded by the user"),
    (r"^gcloud |coordinator_address=host0|^posebh-train \.\.\.", "a TPU pod / GPU cluster"),
    (r"configs/samples\.py", "../shared sample data (a developer check)"),
    (r"^(nice -n \d+ )?python benchmarks/", "benchmarks: minutes to hours of CPU each (ViT-B "
     "steps, both sides), run by hand and never timed in tests"),
    (r"my_configs/stick14\.py", "the user's own dataset and config file (\"Add a dataset\"): "
     "tests/test_new_skeleton.py writes them and runs these commands"),
]
# Overrides appended to the synthetic commands: the same commands, seconds instead of minutes.
SHORT_DATA = ["--config.data.synthetic.num_train=12", "--config.data.synthetic.num_val=4"]
# The session's compilation cache (not <workdir>/compilation_cache): posebh-eval and
# posebh-infer reuse what the training run's final evaluation compiled.
SHORT_TRAIN = ["--config.train.num_steps=3", "--config.train.checkpoint_every=3",
               "--config.train.log_every=1", f"--config.train.compilation_cache={COMPILATION_CACHE}"]


def readme_commands() -> list[str]:
  text = (REPO / "README.md").read_text()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"\s+#.*$", "", " ".join(line.split()))  # Trailing comments.
      if line and not line.startswith("#"):
        # `a && b` (the Quick start's install-then-run lines): each part on its own.
        commands.extend(part.strip() for part in line.split(" && "))
  return commands


def _plain_clone(tmp_path: pathlib.Path) -> pathlib.Path:
  """The repository's files (as a clone has them) under tmp_path/clone/posebh-jax."""
  files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
  dst = tmp_path / "clone" / "posebh-jax"
  for f in filter(None, files):
    if (REPO / f).is_file():
      (dst / f).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO / f, dst / f)
  assert not (dst.parent / "shared").exists()
  return dst


def _run(cmd: list[str], cwd: pathlib.Path, timeout: int = 900) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(cwd))  # The clone's code, not this checkout's.
  env.pop("POSEBH_SHARED", None)
  env.pop("XLA_FLAGS", None)  # One device, as the README's user runs them (not 8 simulated).
  bin_dir = pathlib.Path(sys.executable).parent
  if cmd[0].startswith("posebh-"):
    cmd = [str(bin_dir / cmd[0])] + cmd[1:]
  elif cmd[0] in ("python", "python3"):
    cmd = [sys.executable] + cmd[1:]
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-4000:])
  return out


def test_every_readme_command_is_run_or_needs_the_users_resources():
  unclassified = []
  for cmd in readme_commands():
    if not any(re.search(p, cmd) for p, _ in NOT_HERE) and not _runnable(cmd):
      unclassified.append(cmd)
  assert not unclassified, f"README commands neither run by this test nor excused: {unclassified}"


def _runnable(cmd: str) -> bool:
  return cmd.startswith(("posebh-train --config=configs/synthetic.py",
                         "posebh-eval --config=configs/synthetic.py",
                         "posebh-infer --config=configs/synthetic.py"))


@pytest.mark.slow
def test_readme_commands_run_in_a_plain_clone(tmp_path):
  clone = _plain_clone(tmp_path)
  ran = []
  for cmd in readme_commands():
    if any(re.search(p, cmd) for p, _ in NOT_HERE):
      continue
    assert _runnable(cmd), cmd
    args = cmd.split()
    args += SHORT_DATA + (SHORT_TRAIN if args[0] == "posebh-train" else [])
    out = _run(args, clone)
    ran.append((args[0], out))
  assert [a for a, _ in ran].count("posebh-train") >= 2 and any(a == "posebh-infer" for a, _ in ran)
  # What they wrote, where the README says.
  run = clone / "runs" / "synthetic"
  assert (run / "eval" / "metrics_3.json").is_file()
  assert (run / "eval_cli" / "all" / "metrics_3.json").is_file()
  assert (clone / "runs" / "synthetic_eval_flip" / "metrics_3.json").is_file()
  poses = json.load(open(clone / "runs" / "poses" / "val_000003.json"))
  assert len(poses["instances"]) == 1  # No --boxes: the whole image is one box.
  assert set(poses["instances"][0]["poses"]) == {"synth_coco", "synth_aic"}
  assert len(poses["instances"][0]["poses"]["synth_aic"]) == 14
  assert (clone / "runs" / "poses" / "val_000003.png").is_file()

  # The README's Python snippets (inference, then export) on the same run.
  text = (clone / "README.md").read_text()
  snippets = re.findall(r"```python\n(.*?)```", text, re.S)
  api = next(s for s in snippets if "Predictor.from_checkpoint(synthetic.get_config()" in s)
  exp = next(s for s in snippets if "export.export_skeleton" in s)
  exp = exp.replace("keypoints = f(crops, center, scale)", "assert f is not None")
  script = ("from configs import synthetic\n"
            "_get = synthetic.get_config\n"
            "synthetic.get_config = lambda *a: (lambda c: (c.data.synthetic.update(dict("
            "num_train=12, num_val=4)), c)[1])(_get(*a))\n" + api + exp +
            "print('POSES', len(poses), sorted({p['skeleton'] for p in poses}))\n")
  out = _run([sys.executable, "-c", script], clone)
  assert "POSES 2 ['synth_aic', 'synth_coco']" in out.stdout, out.stdout
  assert (clone / "runs" / "synth_coco_head.npz").is_file()
