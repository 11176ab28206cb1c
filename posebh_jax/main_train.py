r"""posebh-train: train, then evaluate, one experiment config.

  posebh-train --config=configs/synthetic.py --workdir=runs/synthetic \
      [--config.train.num_steps=50 ...]

Rerunning with the same --workdir resumes from its latest checkpoint. On a pod, run the same
command on every host with --distributed (or --config.distributed.*).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from posebh_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a .py with get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Job directory: checkpoints, events, eval/.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods / GPU "
    "clusters); same as --config.distributed.enabled=True.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  cli.no_positional_args(argv)
  from posebh_jax import config_checks
  config = _CONFIG.value
  try:
    config_checks.check_config(config)  # Before jax, data or compilation: a typo fails at once.
  except config_checks.ConfigError as e:
    sys.exit(f"posebh-train: {e}")
  # (Random bits independent of partitioning, jax_threefry_partitionable, are jax 0.10's default.)
  from data_pipelines.coco_reader import AnnotationError
  from posebh_jax.errors import CheckpointDamagedError, CheckpointMismatchError
  from posebh_jax.train import distributed, loop
  if _DISTRIBUTED.value or config.distributed.enabled:
    distributed.initialize_distributed(config.distributed)
  try:
    loop.train_and_evaluate(config, _WORKDIR.value)
  except (loop.NonFiniteLossError, loop.TooManyBadImagesError, config_checks.ConfigError,
          CheckpointMismatchError, CheckpointDamagedError,
          AnnotationError) as e:
    # The diagnosis is the message (which terms or fields, last good checkpoint, which damaged
    # checkpoints and why, which annotation file and record); no traceback needed.
    print(f"posebh-train: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def run() -> None:
  """Console-script entry point."""
  cli.run(main, __doc__, "posebh-train")


if __name__ == "__main__":
  run()
