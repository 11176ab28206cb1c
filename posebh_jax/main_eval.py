r"""posebh-eval: evaluate a workdir's checkpoint, or converted weights, with the paper protocol.

  posebh-eval --config=configs/synthetic.py:tiny --workdir=runs/tiny [--step=N]
  posebh-eval --config=configs/posebh.py:b --weights=/ckpt/posebh_b_converted \
      --workdir=/tmp/posebh_b_eval --config.data.root=/data [--datasets=coco,mpii] [--boxes=gt]

Each dataset is scored as the reference scores it (spec §5.1): OKS AP/AR through COCOeval for
the COCO-format sets (WholeBody with its part breakdown), PCKh for MPII, box-normalised PCK for
the synthetic data. Prints the table and writes metrics_<step>.json and results_<step>/ to --out
(default <workdir>/eval_cli/<selection>/: never the training run's own eval/). Converted weights
have no step: metrics_0.json. On a pod, run the same command on every host with --distributed
(or --config.distributed.*): each host predicts a share of the instances, process 0 writes.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from posebh_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a .py with get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Job directory holding checkpoints/ (and synthetic data); with --weights: "
    "where results go unless --out is given.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "Converted weights (a posebh-convert --out directory) to evaluate instead "
    "of a --workdir checkpoint.")
_DATASETS = flags.DEFINE_string(
    "datasets", None, "Comma-separated dataset names to evaluate (default: every dataset of "
    "the config that has validation annotations).")
_BOXES = flags.DEFINE_enum(
    "boxes", "config", ["config", "gt", "det"], "Boxes to crop: 'config' (each dataset's "
    "data.datasets.<name>.val_det: detections for COCO/WholeBody as the paper, else ground "
    "truth), 'gt' (ground-truth boxes everywhere) or 'det' (detections; every selected dataset "
    "must have them).")
_OUT = flags.DEFINE_string(
    "out", None, "Folder for this evaluation's metrics_<step>.json and results_<step>/ "
    "(default: <workdir>/eval_cli/<datasets>[_<boxes>_boxes]).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host: run the same command "
    "on every host); same as --config.distributed.enabled=True.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  cli.no_positional_args(argv)
  if _WEIGHTS.value is not None and _STEP.value is not None:
    raise app.UsageError("--step selects a --workdir checkpoint; it does not apply to --weights")
  from data_pipelines.coco_reader import AnnotationError
  from data_pipelines.image_files import ImageError
  from posebh_jax import config_checks
  from posebh_jax.evaluation import evaluate
  from posebh_jax.evaluation.benchmark import EvalSelectionError
  from posebh_jax.errors import CheckpointDamagedError, CheckpointMismatchError
  selection = dict(datasets=_DATASETS.value, boxes=_BOXES.value, out_dir=_OUT.value)
  try:
    config_checks.check_config(_CONFIG.value)
    if _DISTRIBUTED.value or _CONFIG.value.distributed.enabled:
      # The same command on every host: each predicts a share, process 0 writes the metrics.
      from posebh_jax.train import distributed
      distributed.initialize_distributed(_CONFIG.value.distributed)
    if _WEIGHTS.value is not None:
      evaluate.evaluate_weights(_CONFIG.value, _WEIGHTS.value, _WORKDIR.value, **selection)
    else:
      evaluate.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value, **selection)
  except (config_checks.ConfigError, FileNotFoundError, CheckpointMismatchError,
          CheckpointDamagedError, EvalSelectionError, AnnotationError, ImageError) as e:
    # ImageError: an evaluation image that is missing, undecodable or not its annotated size
    # (the message names the file and the record).
    sys.exit(f"posebh-eval: {e}")


def run() -> None:
  """Console-script entry point."""
  cli.run(main, __doc__, "posebh-eval")


if __name__ == "__main__":
  run()
