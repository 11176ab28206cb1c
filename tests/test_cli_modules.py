"""The four CLIs import side by side (tests, notebooks and scripts use their functions) and each
registers its own flags only when run."""

import subprocess
import sys

from absl import flags

from posebh_jax import main_convert, main_eval, main_infer, main_train

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_importing_every_cli_defines_no_flags():
  modules = (main_convert, main_eval, main_infer, main_train)
  assert all(callable(m.run) for m in modules)
  assert "workdir" not in flags.FLAGS and "images" not in flags.FLAGS


def test_each_cli_defines_its_flags_when_run():
  # absl prints the module's own flags for --helpshort (and exits 1).
  for module, flag in (("main_train", "--[no]distributed:"), ("main_eval", "--boxes:"),
                       ("main_infer", "--through:"), ("main_convert", "--pth:")):
    out = subprocess.run([sys.executable, "-m", f"posebh_jax.{module}", "--helpshort"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert flag in out.stdout and "--config:" in out.stdout, (module, out.stdout[-2000:],
                                                              out.stderr[-2000:])
