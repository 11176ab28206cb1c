r"""posebh-train: train then evaluate one experiment config.

  posebh-train --config=configs/synthetic.py --workdir=/tmp/posebh_synthetic \
      [--config.train.num_steps=50 ...]

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from posebh_jax.cli_logging import setup_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a .py with get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Job directory: checkpoints, events, eval/.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods / GPU clusters).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # After flag parsing, so --jax_* flags apply.
  # Random bits that do not depend on how arrays are partitioned: the same step on 1 or 8 devices.
  jax.config.update("jax_threefry_partitionable", True)
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  setup_logging()
  from posebh_jax.train import loop
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
