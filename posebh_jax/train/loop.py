"""`train_and_evaluate(config, workdir)`: the whole job, importable (CLI, tests and Colab alike).

Read top to bottom: layout and model, data, mesh and state, checkpoint/resume, step, loop, eval.
The workdir is the job's identity: a rerun with the same workdir resumes from its latest
checkpoint (train state and data iterator), so killing and restarting loses at most the steps
since the last checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from data_pipelines import pipeline
from posebh_jax import experiment
from posebh_jax.evaluation import evaluator as evaluator_lib
from posebh_jax.train import checkpoint as checkpoint_lib
from posebh_jax.train import optimizer as optimizer_lib
from posebh_jax.train import sharding as sharding_lib
from posebh_jax.train import state as state_lib
from posebh_jax.train import step as step_lib

log = logging.getLogger("posebh")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


def step_config(config: ml_collections.ConfigDict, layout) -> step_lib.StepConfig:
  return step_lib.StepConfig(
      num_keypoints=layout.num_keypoints,
      global_index=tuple(tuple(int(x) for x in row) for row in layout.global_index()),
      heatmap_weight=config.loss.heatmap_weight, phm_weight=config.loss.phm_weight,
      proto_gamma=config.model.proto.gamma, proto_threshold=0.5,
      use_proto_head=config.model.use_proto_head)


def abstract_train_state(config: ml_collections.ConfigDict, model, layout, mesh):
  """Shapes and shardings of the train state, with nothing allocated.

  Returns:
    (init_fn, abstract state whose leaves carry their shardings, shardings, optimizer).
  """
  init_fn = state_lib.make_init_fn(
      model, lambda p: optimizer_lib.make_optimizer(config.train, p),
      image_size_hw=tuple(config.data.image_size),
      num_prototype_keypoints=layout.total_keypoints,
      num_in_class=config.model.proto.num_in_class, embed_dim=config.model.proto.out_channels)
  abstract = jax.eval_shape(init_fn, jax.random.key(config.seed))
  shardings = sharding_lib.state_shardings(mesh, abstract)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  tx = optimizer_lib.make_optimizer(config.train, abstract.params)
  return init_fn, abstract, shardings, tx


def create_train_state(config: ml_collections.ConfigDict, model, layout, mesh):
  """Creates the state directly in its sharded layout (never whole on one device first).

  Returns:
    (state, abstract state, shardings, optimizer).
  """
  init_fn, abstract, shardings, tx = abstract_train_state(config, model, layout, mesh)
  state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed))
  return state, abstract, shardings, tx


def _is_writer() -> bool:
  return jax.process_index() == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains for `config.train.num_steps` (resuming from `workdir` if possible), then evaluates.

  Returns:
    {"step": final step, "train": last logged train metrics, "eval": evaluation results}.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.time()

  # --- Layout, model ------------------------------------------------------------------------------
  layout = experiment.build_layout(config)
  model = experiment.build_model(config, layout)
  td_cfg = experiment.topdown_config(config, layout)

  # --- Data -----------------------------------------------------------------------------------------
  files = experiment.resolve_dataset_files(config, workdir)
  train_records, reports = experiment.load_records(config, layout, files, "train")
  val_records, val_reports = experiment.load_records(config, layout, files, "val")
  for r in reports + val_reports:
    log.info("data: %s", r)

  # --- Mesh, state -------------------------------------------------------------------------------
  mesh = sharding_lib.make_mesh(config.mesh)
  per_host_batch = sharding_lib.check_batch_size(config.train.batch_size, mesh)
  state, abstract_state, state_shardings, tx = create_train_state(config, model, layout, mesh)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_state.params))
  log.info("model: %.2fM parameters; mesh %s; global batch %d", n_params / 1e6,
           dict(mesh.shape), config.train.batch_size)

  weights = [config.data.datasets[n].weight for n in config.data.dataset_names]
  dataset = pipeline.mixed_train_dataset(
      train_records, weights, td_cfg, batch_size=per_host_batch, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = pipeline.make_iterator(dataset, num_workers=config.data.num_workers,
                                     prefetch=config.data.prefetch)

  # --- Checkpoint / resume --------------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
  meta = experiment.checkpoint_meta(config, layout)
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, abstract_state, data_iter, meta)
    log.info("resumed from checkpoint at step %d (%s)", latest, ckpt.directory)
  start_step = int(jax.device_get(state.step))

  # --- Step ---------------------------------------------------------------------------------------
  train_step = step_lib.make_train_step(model, tx, step_config(config, layout), mesh,
                                        state_shardings)

  writer = None
  if _is_writer():
    import tensorboardX  # Imported lazily: only process 0 writes events.
    writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  # --- Loop ---------------------------------------------------------------------------------------
  num_steps = config.train.num_steps
  last_metrics: dict[str, float] = {}
  bar = tqdm.tqdm(total=num_steps, initial=start_step, desc="train", unit="step",
                  disable=not _is_writer(), mininterval=2.0, dynamic_ncols=True)
  t_log, steps_since_log = time.time(), 0
  try:
    for step in range(start_step, num_steps):
      batch = pipeline.to_global_batch(next(data_iter), mesh)
      state, metrics = train_step(state, batch)
      steps_since_log += 1
      bar.update(1)
      done = step + 1
      if done % config.train.log_every == 0 or done == num_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in metrics.values()):
          bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
          raise NonFiniteLossError(
              f"non-finite training metrics at step {done}: {bad}; last good checkpoint: "
              f"step {ckpt.latest_step()} in {ckpt.directory}")
        elapsed = time.time() - t_log
        metrics["images_per_second"] = steps_since_log * config.train.batch_size / elapsed
        metrics["learning_rate"] = float(optimizer_lib.learning_rate_schedule(config.train)(step))
        t_log, steps_since_log = time.time(), 0
        last_metrics = metrics
        bar.set_postfix(loss=f"{metrics['loss/total']:.3g}")
        if writer is not None:
          for k, v in metrics.items():
            writer.add_scalar(f"train/{k}", v, done)
      if done % config.train.checkpoint_every == 0 or done == num_steps:
        ckpt.save(done, state, data_iter, meta)
  finally:
    bar.close()
    ckpt.wait()
  log.info("training done at step %d (%.0f s since start)", num_steps, time.time() - t_start)

  # --- Evaluation ------------------------------------------------------------------------------
  eval_out: dict[str, Any] = {}
  if config.train.eval_at_end:
    eval_out = evaluate(config, workdir, model, layout, td_cfg, mesh, val_records, state,
                        num_steps, writer)
  if writer is not None:
    writer.close()
  ckpt.close()
  return dict(step=num_steps, train=last_metrics, eval=eval_out)


def evaluate(config, workdir, model, layout, td_cfg, mesh, val_records, state, step, writer=None
             ) -> dict[str, Any]:
  """Runs the PCK evaluator, prints the table, writes `eval/metrics_<step>.json` and events."""
  ev = evaluator_lib.PCKEvaluator(
      model, layout, config.data.dataset_names, val_records, td_cfg, mesh,
      batch_size=config.eval.batch_size, thresholds=config.eval.pck_thresholds)
  results = ev.run(state.params, state.batch_stats)
  table = evaluator_lib.format_table(results, config.eval.pck_thresholds)
  out = {}
  if _is_writer():
    print(f"\nEvaluation at step {step} (held-out images; PCK normalised by box size):\n{table}\n",
          flush=True)
    path = evaluator_lib.write_metrics(results, workdir, step)
    print(f"metrics written to {path}", flush=True)
    out["metrics_file"] = path
    if writer is not None:
      for r in results:
        for k, v in r.pck.items():
          tag = k.replace("@", "_")  # TensorBoard tags allow [A-Za-z0-9_./-] only.
          writer.add_scalar(f"eval/{r.images}_on_{r.skeleton}/{tag}", v, step)
  out["results"] = [dict(images=r.images, skeleton=r.skeleton, n=r.num_instances, pck=r.pck,
                         pck_novel=r.pck_novel) for r in results]
  return out
