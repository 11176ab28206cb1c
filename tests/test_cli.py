"""The four command-line tools as a user first meets them: `--help`, and bad configuration
caught in one line before any data is read or anything compiles."""

import os
import pathlib
import subprocess
import sys

import pytest

from configs import posebh, samples, synthetic
from posebh_jax import config_checks

REPO = pathlib.Path(__file__).resolve().parents[1]
CLIS = {  # console script -> flags that its --help must list
    "posebh-train": ("--config:", "--workdir:", "--[no]distributed:"),
    "posebh-eval": ("--config:", "--workdir:", "--weights:", "--datasets:", "--boxes:",
                    "--out:", "--step:"),
    "posebh-infer": ("--config:", "--weights:", "--workdir:", "--images:", "--boxes:",
                     "--skeletons:", "--through:", "--out:"),
    "posebh-convert": ("--config:", "--pth:", "--out:", "--[no]overwrite:"),
}


def _script(name: str) -> str:
  path = pathlib.Path(sys.executable).parent / name
  assert path.exists(), f"{name} is not installed beside {sys.executable} (pip install -e .)"
  return str(path)


def _run(*args, cwd=REPO, timeout=300):
  return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("name", sorted(CLIS))
def test_help_exits_0_and_lists_own_flags(name):
  out = _run(_script(name), "--help")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith(f"{name}: "), out.stdout[:200]  # The module's usage text.
  for flag in CLIS[name]:
    assert flag in out.stdout, (flag, out.stdout)
  # Only its own flags: not absl's or another CLI's.
  assert "only_check_args" not in out.stdout
  assert ("--pth:" in out.stdout) == (name == "posebh-convert")
  full = _run(_script(name), "--helpfull")
  assert full.returncode == 0 and "only_check_args" in full.stdout


BAD = [  # override -> what the one line must say
    ("--config.train.num_step=5", "no such field 'num_step' Did you mean \"num_steps\""),
    ("--config.train.batch_size=0", "train.batch_size=0: must be a positive number"),
    ("--config.train.batch_size=-4", "train.batch_size=-4: must be a positive number"),
    ("--config.train.checkpoint_every=0", "train.checkpoint_every=0: must be a positive"),
    ("--config.data.image_size=(60,48)", "data.image_size=(60, 48): each side must be a "
     "multiple of model.patch_size=8"),
    ("--config.data.heatmap_size=(16,16)", "data.heatmap_size=(16, 16): the 8x6 token grid"),
    ("--config.train.batch_size=abc", "--config.train.batch_size=abc: invalid literal"),
    ("--config.model.bn_groups=3", "model.bn_groups=3: must be a positive divisor of "
     "train.batch_size=8"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_config_is_one_line_before_any_work(override, message, tmp_path):
  workdir = tmp_path / "run"
  out = _run(_script("posebh-train"), "--config=configs/synthetic.py:tiny",
             f"--workdir={workdir}", override, timeout=120)
  assert out.returncode == 1, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[0].startswith("posebh-train: ") and message in lines[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert not workdir.exists()  # Nothing generated, read or written.


def test_eval_and_infer_check_the_config_too(tmp_path):
  ev = _run(_script("posebh-eval"), "--config=configs/synthetic.py:tiny", f"--workdir={tmp_path}",
            "--config.eval.batch_size=0", timeout=120)
  assert ev.returncode == 1 and "posebh-eval: eval.batch_size=0" in ev.stderr, ev.stderr
  inf = _run(_script("posebh-infer"), "--config=configs/synthetic.py:tiny",
             f"--workdir={tmp_path}", f"--images={tmp_path}", f"--out={tmp_path / 'o'}",
             "--config.model.patch_size=7", timeout=120)
  assert inf.returncode == 1 and "posebh-infer: data.image_size=(64, 48)" in inf.stderr, (
      inf.stderr)


def test_every_shipped_config_passes_the_checks():
  for cfg in (synthetic.get_config(), synthetic.get_config("tiny"),
              synthetic.get_config("baseline"), synthetic.get_config("posebh_b,steps=6"),
              samples.get_config(), posebh.get_config("b"), posebh.get_config("h"),
              posebh.get_config("tiny_reference"), posebh.get_config("vitpose_b")):
    config_checks.check_config(cfg)


def test_dataset_keypoints_must_match_the_format():
  cfg = posebh.get_config("b")
  cfg.data.datasets.coco.skeleton = "aic"
  with pytest.raises(config_checks.ConfigError,
                     match="data.datasets.coco: skeleton 'aic' has 14 keypoints but format "
                           "'coco' files hold 17"):
    config_checks.check_config(cfg)
  cfg = posebh.get_config("b")
  cfg.data.dataset_names = cfg.data.dataset_names + ("extra",)
  with pytest.raises(config_checks.ConfigError, match="no entry for it"):
    config_checks.check_config(cfg)
