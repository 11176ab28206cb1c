r"""posebh-train: train then evaluate one experiment config.

  posebh-train --config=configs/synthetic.py --workdir=/tmp/posebh_synthetic \
      [--config.train.num_steps=50 ...]

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from posebh_jax.cli_logging import setup_logging


def _define_flags() -> None:
  """Registers this CLI's flags, at run time: importing the module for its functions (tests,
  notebooks, the other CLIs) must not clash with other CLIs' flags of the same names."""
  global _CONFIG, _WORKDIR, _DISTRIBUTED
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (a .py with get_config()).", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Job directory: checkpoints, events, eval/.")
  _DISTRIBUTED = flags.DEFINE_bool(
      "distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods / GPU "
      "clusters); same as --config.distributed.enabled=True.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # After flag parsing, so --jax_* flags apply.
  # Random bits that do not depend on how arrays are partitioned: the same step on 1 or 8 devices.
  jax.config.update("jax_threefry_partitionable", True)
  config = _CONFIG.value
  if _DISTRIBUTED.value or config.distributed.enabled:
    initialize_distributed(config.distributed)
  setup_logging()
  from posebh_jax.train import loop
  try:
    loop.train_and_evaluate(config, _WORKDIR.value)
  except loop.NonFiniteLossError as e:
    # The diagnosis is the message (which terms, last good checkpoint); no traceback needed.
    print(f"posebh-train: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def initialize_distributed(dist) -> None:
  """`jax.distributed.initialize` from `config.distributed` (unset fields: auto-detected from
  the cluster environment, e.g. TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS etc.)."""
  import jax
  kwargs = {}
  if dist.coordinator_address:
    kwargs["coordinator_address"] = dist.coordinator_address
  if dist.num_processes > 0:
    kwargs["num_processes"] = dist.num_processes
  if dist.process_id >= 0:
    kwargs["process_id"] = dist.process_id
  jax.distributed.initialize(**kwargs)


def run() -> None:
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
