r"""posebh-eval: evaluate a workdir's checkpoint, or converted weights, on the held-out data.

  posebh-eval --config=configs/synthetic.py --workdir=/tmp/posebh_synthetic [--step=N]
  posebh-eval --config=configs/posebh.py:b --weights=/ckpt/posebh_b_converted \
      --workdir=/tmp/posebh_b_eval

Prints the PCK table and writes <workdir>/eval/metrics_<step>.json; converted weights
(`posebh-convert --out`) have no step and are written as metrics_0.json.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from posebh_jax.cli_logging import setup_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (a .py with get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Job directory holding checkpoints/ (with --weights: where results go).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "Converted weights (a posebh-convert --out directory) to evaluate instead "
    "of a --workdir checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict:
  """Restores a checkpoint of `config`'s model from `workdir` and evaluates it."""
  import jax
  from posebh_jax import experiment
  from posebh_jax.train import checkpoint as checkpoint_lib
  from posebh_jax.train import loop
  from posebh_jax.train import sharding as sharding_lib

  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):  # Check first: the checkpoint manager would create it.
    raise FileNotFoundError(f"no checkpoints in {workdir} (expected {ckpt_dir})")
  layout = experiment.build_layout(config)
  model = experiment.build_model(config, layout)
  td_cfg = experiment.topdown_config(config, layout)
  files = experiment.resolve_dataset_files(config, workdir)
  val_records, _ = experiment.load_records(config, layout, files, "val")
  mesh = sharding_lib.make_mesh(config.mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  if step not in ckpt.all_steps():
    raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt.directory} "
                            f"(have {ckpt.all_steps()})")
  _, abstract, _, _ = loop.abstract_train_state(config, model, layout, mesh)
  state = ckpt.restore(step, abstract, None, experiment.checkpoint_meta(config, layout))
  ckpt.close()
  return loop.evaluate(config, workdir, model, layout, td_cfg, mesh, val_records, state, step)


def load_eval_weights(config, weights_dir: str, model, layout, mesh):
  """Converted weights for `model`, replicated over `mesh` (what `evaluate_weights` runs).

  Returns:
    `convert.weights.PretrainedWeights`; its `params` / `batch_stats` are what the evaluator
    reads, as from a train state.

  Raises:
    FileNotFoundError: nothing converted at `weights_dir`.
    CheckpointMismatchError: the weights do not fit `model` (leaves named).
  """
  from posebh_jax.convert import weights as weights_lib
  from posebh_jax.train import sharding as sharding_lib

  weights, _ = weights_lib.load_weights(
      weights_dir, model, num_prototype_keypoints=layout.total_keypoints,
      num_in_class=config.model.proto.num_in_class, sharding=sharding_lib.replicated(mesh))
  return weights


def evaluate_weights(config, weights_dir: str, workdir: str) -> dict:
  """Evaluates converted weights (`posebh-convert --out`) on `config`'s held-out data.

  Results go under `workdir` (eval/metrics_0.json: converted weights have no step).
  """
  from posebh_jax import experiment
  from posebh_jax.train import loop
  from posebh_jax.train import sharding as sharding_lib

  layout = experiment.build_layout(config)
  model = experiment.build_model(config, layout)
  mesh = sharding_lib.make_mesh(config.mesh)
  weights = load_eval_weights(config, weights_dir, model, layout, mesh)  # Fail before the data.
  td_cfg = experiment.topdown_config(config, layout)
  files = experiment.resolve_dataset_files(config, workdir)
  val_records, _ = experiment.load_records(config, layout, files, "val")
  return loop.evaluate(config, workdir, model, layout, td_cfg, mesh, val_records, weights, 0)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WEIGHTS.value is not None and _STEP.value is not None:
    raise app.UsageError("--step selects a --workdir checkpoint; it does not apply to --weights")
  setup_logging()
  from posebh_jax.train.checkpoint import CheckpointMismatchError
  try:
    if _WEIGHTS.value is not None:
      evaluate_weights(_CONFIG.value, _WEIGHTS.value, _WORKDIR.value)
    else:
      evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value)
  except (FileNotFoundError, CheckpointMismatchError) as e:
    sys.exit(f"posebh-eval: {e}")


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
