"""Evaluate a training checkpoint or converted weights with the paper protocol (the library
behind posebh-eval; notebooks and tests call these functions).

Each dataset is scored as the reference scores it (spec §5.1; `evaluation.benchmark`): OKS
AP/AR through COCOeval for the COCO-format sets (WholeBody with its part breakdown), PCKh for
MPII, box-normalised PCK for the synthetic data.
"""

from __future__ import annotations

import logging

from data_pipelines import datasets as datasets_lib  # `datasets` names the selection here.
from data_pipelines import storage

EVAL_CLI_DIR = "eval_cli"  # Under a workdir: posebh-eval's outputs, apart from training's eval/.


def default_out_dir(workdir: str, datasets: str | list[str] | None, boxes: str) -> str:
  """`<workdir>/eval_cli/<selection>`: one folder per dataset/box selection, so an evaluation
  never replaces the training run's `eval/` nor another selection's results."""
  if datasets is None:
    tag = "all"
  else:
    names = datasets.split(",") if isinstance(datasets, str) else list(datasets)
    tag = "+".join(n.strip() for n in names if n.strip()) or "all"
  if boxes != "config":
    tag += f"_{boxes}_boxes"
  return storage.join(workdir, EVAL_CLI_DIR, tag)


def _prepare(config, workdir: str, datasets, boxes: str):
  """Layout, model, mesh, protocols and records of the selected datasets (checked first)."""
  from posebh_jax import experiment
  from posebh_jax.evaluation import benchmark
  from posebh_jax.train import sharding as sharding_lib

  layout = datasets_lib.build_layout(config)
  files = experiment.resolve_dataset_files(config, workdir)
  protocols = benchmark.dataset_protocols(config, files, benchmark.parse_datasets(datasets),
                                          boxes, with_eval_datasets=True)
  if not protocols:
    raise benchmark.EvalSelectionError("no dataset of the config has validation annotations")
  model = experiment.build_model(config, layout)
  mesh = sharding_lib.make_mesh(config.mesh)
  return layout, model, mesh, files, protocols


def _evaluate(config, workdir, layout, model, mesh, files, protocols, state, step,
              out_dir: str) -> dict:
  from posebh_jax.evaluation import benchmark
  from posebh_jax.train import loop

  td_cfg = datasets_lib.topdown_config(config, layout)
  val_records, reports = benchmark.load_eval_records(config, layout, files, protocols)
  for p, r in zip(protocols, reports):
    logging.getLogger("posebh").info("eval data %s (%s boxes): %s", p.name, p.boxes, r)
  return loop.evaluate(config, workdir, model, layout, td_cfg, mesh, val_records, state, step,
                       protocols=protocols, eval_dir=out_dir)


def evaluate_checkpoint(config, workdir: str, step: int | None = None, *,
                        datasets: str | list[str] | None = None, boxes: str = "config",
                        out_dir: str | None = None) -> dict:
  """Restores a checkpoint of `config`'s model from `workdir` and evaluates it.

  Args:
    datasets: names (or "a,b") to evaluate; None = every dataset with validation annotations.
    boxes: "config", "gt" or "det" (see `evaluation.benchmark.dataset_protocols`).
    out_dir: where metrics_<step>.json and results_<step>/ go (default `default_out_dir`:
      never the training run's own `eval/`).

  Returns:
    `loop.evaluate`'s dict: "datasets" (name → metric, boxes, n, values), "results" (PCK
    pairs of synthetic data), "metrics_file".
  """
  from posebh_jax.train import restore

  restore.require_checkpoints(workdir)  # Before the data is read.
  layout, model, mesh, files, protocols = _prepare(config, workdir, datasets, boxes)
  state, step = restore.restore_state(config, workdir, step, mesh)
  out_dir = default_out_dir(workdir, datasets, boxes) if out_dir is None else out_dir
  return _evaluate(config, workdir, layout, model, mesh, files, protocols, state, step, out_dir)


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
                     datasets: str | list[str] | None = None, boxes: str = "config",
                     out_dir: str | None = None) -> dict:
  """Evaluates converted weights (`posebh-convert --out`) on `config`'s held-out data.

  Results go to `out_dir` (metrics_0.json: converted weights have no step), by default under
  `workdir` as `evaluate_checkpoint`'s. `datasets` and `boxes` as there.
  """
  layout, model, mesh, files, protocols = _prepare(config, workdir, datasets, boxes)
  weights = load_eval_weights(config, weights_dir, model, layout, mesh)  # Fail before the data.
  out_dir = default_out_dir(workdir, datasets, boxes) if out_dir is None else out_dir
  return _evaluate(config, workdir, layout, model, mesh, files, protocols, weights, 0, out_dir)
