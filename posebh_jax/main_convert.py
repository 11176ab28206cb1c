r"""posebh-convert: turn a reference PyTorch checkpoint (.pth) into converted weights.

  posebh-convert --config=configs/posebh.py:b --pth=weights/vitpose+_base.pth \
      --out=/ckpt/vitpose_plus_b_converted [--overwrite]

Reads the .pth without torch and without running pickled code, maps its tensors onto the
config's model and writes a directory that `posebh-train --config.init.weights=DIR` and
`posebh-eval --weights=DIR` start from. PoseBH and ViTPose++ checkpoints (mmcv layouts, DDP
prefixes) are accepted; any unknown, missing or mis-shaped tensor is reported by name and nothing
is written. From Python (e.g. Colab): `posebh_jax.convert.from_pth.convert_checkpoint`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from posebh_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a .py with get_config()) whose model the weights "
    "are for.", lock_config=True)
_PTH = flags.DEFINE_string("pth", None, "PyTorch checkpoint to convert (torch.save zip format).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the converted weights to.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it already exists.")
flags.mark_flags_as_required(["config", "pth", "out"])


def main(argv: Sequence[str]) -> None:
  cli.no_positional_args(argv)
  from posebh_jax import config_checks
  from posebh_jax.convert import from_pth
  try:
    config_checks.check_config(_CONFIG.value)
    summary = from_pth.convert_checkpoint(_CONFIG.value, _PTH.value, _OUT.value,
                                          overwrite=_OVERWRITE.value)
  except (config_checks.ConfigError, FileNotFoundError, FileExistsError,
          from_pth.ConversionError) as e:
    sys.exit(f"posebh-convert: {e}")
  print(from_pth.format_summary(summary), flush=True)


def run() -> None:
  """Console-script entry point."""
  cli.run(main, __doc__, "posebh-convert")


if __name__ == "__main__":
  run()
