r"""posebh-eval: evaluate a workdir's checkpoint, or converted weights, with the paper protocol.

  posebh-eval --config=configs/synthetic.py --workdir=/tmp/posebh_synthetic [--step=N]
  posebh-eval --config=configs/posebh.py:b --weights=/ckpt/posebh_b_converted \
      --workdir=/tmp/posebh_b_eval --config.data.root=/data [--datasets=coco,mpii] [--boxes=gt]
  posebh-eval --config=configs/posebh.py:tiny_reference_samples --weights=/tmp/tiny_converted \
      --workdir=/tmp/tiny_eval        # the tiny reference model on ../shared/data/samples

Each dataset is scored as the reference scores it (spec §5.1; `evaluation.benchmark`): OKS
AP/AR through COCOeval for the COCO-format sets (WholeBody with its part breakdown), PCKh for
MPII, box-normalised PCK for the synthetic data. Prints the table and writes
<workdir>/eval/metrics_<step>.json; converted weights (`posebh-convert --out`) have no step and
are written as metrics_0.json.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from posebh_jax.cli_logging import setup_logging


def _define_flags() -> None:
  """Registers this CLI's flags, at run time: importing the module for its functions (tests,
  notebooks, the other CLIs) must not clash with other CLIs' flags of the same names."""
  global _CONFIG, _WORKDIR, _STEP, _WEIGHTS, _DATASETS, _BOXES
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (a .py with get_config()).", lock_config=True)
  _WORKDIR = flags.DEFINE_string(
      "workdir", None, "Job directory holding checkpoints/ (with --weights: where results go).")
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
  flags.mark_flags_as_required(["config", "workdir"])


def _prepare(config, workdir: str, datasets, boxes: str):
  """Layout, model, mesh, protocols and records of the selected datasets (checked first)."""
  from posebh_jax import experiment
  from posebh_jax.evaluation import benchmark
  from posebh_jax.train import sharding as sharding_lib

  layout = experiment.build_layout(config)
  files = experiment.resolve_dataset_files(config, workdir)
  protocols = benchmark.dataset_protocols(config, files, benchmark.parse_datasets(datasets),
                                          boxes)
  if not protocols:
    raise benchmark.EvalSelectionError("no dataset of the config has validation annotations")
  model = experiment.build_model(config, layout)
  mesh = sharding_lib.make_mesh(config.mesh)
  return layout, model, mesh, files, protocols


def _evaluate(config, workdir, layout, model, mesh, files, protocols, state, step) -> dict:
  from posebh_jax import experiment
  from posebh_jax.evaluation import benchmark
  from posebh_jax.train import loop

  td_cfg = experiment.topdown_config(config, layout)
  val_records, reports = benchmark.load_eval_records(config, layout, files, protocols)
  for p, r in zip(protocols, reports):
    logging.getLogger("posebh").info("eval data %s (%s boxes): %s", p.name, p.boxes, r)
  return loop.evaluate(config, workdir, model, layout, td_cfg, mesh, val_records, state, step,
                       protocols=protocols)


def evaluate_checkpoint(config, workdir: str, step: int | None = None, *,
                        datasets: str | list[str] | None = None, boxes: str = "config") -> dict:
  """Restores a checkpoint of `config`'s model from `workdir` and evaluates it.

  Args:
    datasets: names (or "a,b") to evaluate; None = every dataset with validation annotations.
    boxes: "config", "gt" or "det" (see `evaluation.benchmark.dataset_protocols`).

  Returns:
    `loop.evaluate`'s dict: "datasets" (name → metric, boxes, n, values), "results" (PCK
    pairs of synthetic data), "metrics_file".
  """
  from posebh_jax import experiment
  from posebh_jax.train import checkpoint as checkpoint_lib
  from posebh_jax.train import loop

  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):  # Check first: the checkpoint manager would create it.
    raise FileNotFoundError(f"no checkpoints in {workdir} (expected {ckpt_dir})")
  layout, model, mesh, files, protocols = _prepare(config, workdir, datasets, boxes)
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
  return _evaluate(config, workdir, layout, model, mesh, files, protocols, state, step)


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


def evaluate_weights(config, weights_dir: str, workdir: str, *,
                     datasets: str | list[str] | None = None, boxes: str = "config") -> dict:
  """Evaluates converted weights (`posebh-convert --out`) on `config`'s held-out data.

  Results go under `workdir` (eval/metrics_0.json: converted weights have no step). `datasets`
  and `boxes` as `evaluate_checkpoint`.
  """
  layout, model, mesh, files, protocols = _prepare(config, workdir, datasets, boxes)
  weights = load_eval_weights(config, weights_dir, model, layout, mesh)  # Fail before the data.
  return _evaluate(config, workdir, layout, model, mesh, files, protocols, weights, 0)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WEIGHTS.value is not None and _STEP.value is not None:
    raise app.UsageError("--step selects a --workdir checkpoint; it does not apply to --weights")
  setup_logging()
  from data_pipelines.coco_reader import AnnotationError
  from posebh_jax.evaluation.benchmark import EvalSelectionError
  from posebh_jax.train.checkpoint import CheckpointMismatchError
  selection = dict(datasets=_DATASETS.value, boxes=_BOXES.value)
  try:
    if _WEIGHTS.value is not None:
      evaluate_weights(_CONFIG.value, _WEIGHTS.value, _WORKDIR.value, **selection)
    else:
      evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value, **selection)
  except (FileNotFoundError, CheckpointMismatchError, EvalSelectionError, AnnotationError) as e:
    sys.exit(f"posebh-eval: {e}")


def run() -> None:
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
