"""`train_and_evaluate(config, workdir)`: the whole job, importable (CLI, tests and Colab alike).

Read top to bottom: layout and model, data, mesh and state, checkpoint/resume, step, loop, eval.
The workdir is the job's identity: a rerun with the same workdir resumes from its latest
checkpoint (train state and data iterator), so killing and restarting loses at most the steps
since the last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import tqdm
from tqdm.contrib import logging as tqdm_logging

from data_pipelines import datasets, device_targets, pipeline, storage
from posebh_jax import experiment
from posebh_jax.evaluation import benchmark
from posebh_jax.objective import clustering
from posebh_jax.objective.objective import ObjectiveConfig
from posebh_jax.train import checkpoint as checkpoint_lib
from posebh_jax.train import distributed, metrics_log
from posebh_jax.train import optimizer as optimizer_lib
from posebh_jax.train import schedule as schedule_lib
from posebh_jax.train import sharding as sharding_lib
from posebh_jax.train import state as state_lib
from posebh_jax.train import step as step_lib
from posebh_jax.train import throughput

log = logging.getLogger("posebh")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


class TooManyBadImagesError(RuntimeError):
  """More training images were unusable than `data.max_bad_images` allows."""


def count_skipped_images(local_batch: dict[str, np.ndarray], seen: int, limit: int,
                         step: int) -> int:
  """Pops the batch's `skipped` flags ([B] f32, see `pipeline.TopDownTrainTransform`) and
  returns the run's count of skipped samples so far.

  Raises:
    TooManyBadImagesError: the count exceeds `limit` (-1: no limit).
  """
  n = int(np.sum(local_batch.pop("skipped", 0)))
  if n:
    seen += n
    log.warning("step %d: %d training sample(s) skipped for an unusable image (%d in this run; "
                "the files are named in the warnings above)", step, n, seen)
    if 0 <= limit < seen:
      raise TooManyBadImagesError(
          f"{seen} training samples had an unusable image (missing, corrupt, "
          f"truncated or not their annotated size; each file is named in the warnings above), "
          f"more than data.max_bad_images={limit}; fix or remove those images, or raise the "
          f"limit. Checkpoints are intact; rerun to resume.")
  return seen


def step_config(config: ml_collections.ConfigDict, layout) -> ObjectiveConfig:
  """The first stage's static step settings (see `stage_config` for later stages)."""
  loss, proto = config.loss, config.model.proto
  return ObjectiveConfig(
      num_keypoints=tuple(layout.num_keypoints), heatmap_weight=loss.heatmap_weight,
      use_proto_head=bool(config.model.use_proto_head), proto_weight=loss.proto_weight,
      ppc_weight=loss.ppc_weight, ppd_weight=loss.ppd_weight, phm_weight=loss.phm_weight,
      gamma=proto.gamma, sinkhorn_epsilon=proto.sinkhorn_epsilon,
      sinkhorn_iterations=proto.sinkhorn_iterations, gumbel=bool(proto.gumbel),
      sample_threshold=proto.sample_threshold, cps_weight=loss.cps_weight,
      css_weight=loss.css_weight, css_conf_thr=loss.css_conf_thr,
      css_match_dist=loss.css_match_dist, css_sigma=loss.css_sigma,
      css_dark_kernel=loss.css_dark_kernel,
      compat=schedule_lib.reference_compat(config))


def stage_config(config: ml_collections.ConfigDict, base: ObjectiveConfig,
                 step: int, stage: schedule_lib.Stage | None = None) -> ObjectiveConfig:
  """The step's loss settings in force at optimizer step `step` (spec §3.2 stage schedule;
  `stage`: that step's, if the caller has it)."""
  stage = schedule_lib.stage_at(config, step) if stage is None else stage
  return dataclasses.replace(base, update_prototypes=stage.update_prototypes, cps=stage.cps,
                             css=stage.css)


def validate_config(config: ml_collections.ConfigDict, layout) -> None:
  """Checks the PoseBH settings that would otherwise fail deep inside a compiled step."""
  s = config.schedule
  schedule_lib.stage_boundaries(config)  # Parses the freeze-hook events: bad ones fail here.
  if config.model.use_proto_head and s.cps_start_step >= 0:
    c, j = config.model.proto.num_clusters, layout.total_keypoints
    if not 0 < c < j:
      raise ValueError(f"model.proto.num_clusters={c} must be in (0, {j}) (the number of "
                       f"keypoints over all datasets; the reference skips C >= J)")
    if 0 <= s.proto_freeze_step and s.proto_freeze_step > s.cps_start_step:
      log.warning("CPS starts (step %d) before the prototypes freeze (step %d): the cluster "
                  "table is taken from prototypes that keep moving", s.cps_start_step,
                  s.proto_freeze_step)


def abstract_train_state(config: ml_collections.ConfigDict, model, layout, mesh):
  """Shapes and shardings of the train state, with nothing allocated.

  Returns:
    (init_fn, abstract state whose leaves carry their shardings, shardings, optimizer).
  """
  proto = config.model.proto
  init_fn = state_lib.make_init_fn(
      model, lambda p: optimizer_lib.make_optimizer(config, p),
      image_size_hw=tuple(config.data.image_size),
      num_prototype_keypoints=layout.total_keypoints, num_in_class=proto.num_in_class,
      out_channels=proto.out_channels, num_clusters=proto.num_clusters)
  abstract = jax.eval_shape(init_fn, jax.random.key(config.seed))
  shardings = sharding_lib.state_shardings(mesh, abstract, config.mesh.fsdp_min_size)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  tx = optimizer_lib.make_optimizer(config, abstract.params)
  return init_fn, abstract, shardings, tx


def create_train_state(config: ml_collections.ConfigDict, model, layout, mesh):
  """Creates the state directly in its sharded layout (never whole on one device first).

  Returns:
    (state, abstract state, shardings, optimizer).
  """
  init_fn, abstract, shardings, tx = abstract_train_state(config, model, layout, mesh)
  state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed))
  return state, abstract, shardings, tx


def init_from_weights(config: ml_collections.ConfigDict, state, model, layout, state_shardings):
  """A fresh run's start from converted weights (`init.weights`, e.g. ViTPose++; spec §3.1).

  Parameters and BN statistics are replaced; prototypes and the cluster table only where the
  weights hold them (a ViTPose++ checkpoint has none: they keep their fresh initialisation).
  The optimizer state stays fresh.
  """
  from posebh_jax.convert import weights as weights_lib  # Only runs that start from weights.
  w, meta = weights_lib.load_weights(
      config.init.weights, model, num_prototype_keypoints=layout.total_keypoints,
      num_in_class=config.model.proto.num_in_class)
  put = sharding_lib.put_host_array  # The same file on every host.
  updates = dict(params=jax.tree_util.tree_map(put, w.params, state_shardings.params),
                 batch_stats=jax.tree_util.tree_map(put, w.batch_stats,
                                                    state_shardings.batch_stats))
  loaded = ["params", "batch_stats"]
  if w.prototypes is not None:
    updates["prototypes"] = put(w.prototypes, state_shardings.prototypes)
    loaded.append("prototypes")
  if w.cluster_prototypes is not None and w.cluster_keypoint is not None:
    if w.cluster_prototypes.shape != state.cluster_prototypes.shape:
      log.warning("init.weights: cluster table %s differs from model.proto.num_clusters=%d; "
                  "not loaded (CPS clusters at its start step)",
                  tuple(w.cluster_prototypes.shape), config.model.proto.num_clusters)
    else:
      updates["cluster_prototypes"] = put(w.cluster_prototypes,
                                          state_shardings.cluster_prototypes)
      updates["cluster_keypoint"] = put(w.cluster_keypoint, state_shardings.cluster_keypoint)
      loaded.append("cluster table")
  log.info("initialised %s from converted weights %s (source: %s)", ", ".join(loaded),
           config.init.weights, meta.get("source", "?"))
  return state.replace(**updates)


def cluster_state(config: ml_collections.ConfigDict, state, state_shardings):
  """Start of CPS: clusters the keypoint prototypes into the cluster table (spec §3.3).

  Deterministic in the prototypes, so a run resumed before this step recomputes the same table,
  and one resumed after it restores the table from its checkpoint.
  """
  p = config.model.proto
  compat = schedule_lib.reference_compat(config)
  table, keypoint = clustering.init_clusters(
      state.prototypes, p.num_clusters, iterations=p.cluster_iterations, beta=p.cluster_beta,
      compat=compat)
  # Deterministic float64 host clustering: every process computed the same table.
  table = sharding_lib.put_host_array(table, state_shardings.cluster_prototypes)
  keypoint = sharding_lib.put_host_array(keypoint, state_shardings.cluster_keypoint)
  log.info("step %d: clustered %d keypoint prototypes into %d cluster prototypes (CPS)",
           int(jax.device_get(state.step)), state.prototypes.shape[0], p.num_clusters)
  return state.replace(cluster_prototypes=table, cluster_keypoint=keypoint)


class StageSteps:
  """The compiled train step of the stage in force at each step.

  Compiles at most once per distinct stage (loss flags and trainable groups): a run crossing the
  reference's three phases compiles three steps, whatever its length. Each is compiled ahead of
  time (`lower(...).compile()`), which also gives XLA's FLOP count for MFU.
  """

  def __init__(self, config, layout, model, tx, mesh, state_shardings, targets=None):
    self._config, self._model, self._tx = config, model, tx
    self._targets = targets  # device_targets.TargetSpec of compact batches (None: host targets).
    self._mesh, self._shardings = mesh, state_shardings
    self._base = step_config(config, layout)
    # Every stage of the run, once: a step only looks its stage up.
    self.schedule = schedule_lib.StageSchedule.from_config(config, tx.groups)
    self.compiled: dict[tuple, Any] = {}
    self.flops: dict[tuple, float | None] = {}

  def stage(self, step: int) -> tuple[ObjectiveConfig, tuple[str, ...]]:
    stage = self.schedule.at(step)
    return stage_config(self._config, self._base, step, stage), stage.trainable

  def run(self, step: int, state, batch):
    """Runs step `step` (compiling its stage first if new). → (state, metrics)."""
    key = self.stage(step)
    if key not in self.compiled:
      cfg, trainable = key
      log.info("step %d: compiling the train step for stage (trainable %s; prototype EMA %s, "
               "CPS %s, CSS %s)", step, ",".join(trainable) or "nothing",
               cfg.update_prototypes, cfg.cps, cfg.css)
      fn = step_lib.make_train_step(self._model, self._tx, cfg, self._mesh, self._shardings,
                                    trainable, targets=self._targets)
      self.compiled[key] = fn.lower(state, batch).compile()
      self.flops[key] = throughput.compiled_flops(self.compiled[key])
      # Compile times differ between hosts; the step's first collective must not time out.
      distributed.barrier(f"compiled stage at step {step}")
    return self.compiled[key](state, batch)

  def flops_at(self, step: int) -> float | None:
    """XLA's FLOPs per device of one step of `step`'s stage (None before it is compiled)."""
    return self.flops.get(self.stage(step))


def enter_step(config: ml_collections.ConfigDict, state, step: int, tx, state_shardings,
               stages: schedule_lib.StageSchedule):
  """Stage changes that touch the state, at the start of `step` (before its update).

  Clusters the prototypes where CPS starts; restarts the Adam state of groups thawed at this
  step (`stages`: the run's stage schedule). Both are functions of the step and of state that a
  checkpoint holds, so a run resumed at any step does exactly what an uninterrupted run does.
  """
  if config.model.use_proto_head and step == config.schedule.cps_start_step:
    state = cluster_state(config, state, state_shardings)
  thawed = stages.thawed_at(step)
  if thawed:
    log.info("step %d: thawing %s (fresh Adam state)", step, ", ".join(thawed))
    reset = jax.jit(lambda o: tx.reset_groups(o, thawed), out_shardings=state_shardings.opt_state,
                    donate_argnums=(0,))
    state = state.replace(opt_state=reset(state.opt_state))
  return state


def check_finite(pending, ckpt: checkpoint_lib.Checkpointer) -> None:
  """Raises NonFiniteLossError naming the non-finite terms and state parts if the step's flag is
  False.

  Args:
    pending: (step count after the step, its on-device metrics) or None.
  """
  if pending is None or bool(pending[1]["finite"]):
    return
  done, metrics = pending
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  bad = {k: v for k, v in values.items() if not k.startswith("finite") and not math.isfinite(v)}
  loss = {k: v for k, v in bad.items() if k.startswith("loss/") or k == "grad_norm"}
  parts = [p for p in step_lib.STATE_PARTS if not values[f"finite/{p}"]]
  where = (f"non-finite training loss at step {done}: {bad}" if loss else
           f"non-finite training state after step {done} (finite loss and gradient norm; "
           f"non-finite {bad})")
  if parts:
    where += f"; NaN/Inf in the updated {', '.join(parts)}"
  # Every saved checkpoint had its step's flag checked first, so the latest one is finite.
  latest = ckpt.latest_step()
  good = (f"last good checkpoint: step {latest} in {ckpt.directory}" if latest is not None
          else f"no checkpoint was saved yet in {ckpt.directory}")
  raise NonFiniteLossError(f"{where}; stopped without saving; {good}")


def write_train_metrics(writer, train_log: metrics_log.TrainMetricsLog, step: int,
                        metrics: dict[str, float]) -> None:
  """TensorBoard scalars `train/<name>` and one JSON line in `<workdir>/train_metrics.jsonl`
  (local or gs://; each step once after a resume: `metrics_log.TrainMetricsLog`)."""
  for k, v in metrics.items():
    writer.add_scalar(f"train/{k}", v, step)
  train_log.write(step, metrics)


# --- Pod ergonomics: compilation cache, profiler (issue 13) ---------------------------------------


def enable_compilation_cache(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Points JAX's persistent compilation cache at `train.compilation_cache` ("auto": the
  directory JAX was given (`JAX_COMPILATION_CACHE_DIR`) if any, else <workdir>/compilation_cache;
  "": off). Returns the directory (None: off).

  Takes effect for compilations after the call (JAX initialises the cache at the first one):
  the CLI calls it before anything compiles.
  """
  where = config.train.compilation_cache
  if not where:
    return None
  if where == "auto":
    # A cache the user gave JAX itself is kept: one cache for all their jobs (the test suite
    # shares one across its ~50 CLI processes this way).
    where = jax.config.jax_compilation_cache_dir or storage.join(workdir, "compilation_cache")
  jax.config.update("jax_compilation_cache_dir", where)
  log.info("persistent compilation cache: %s", where)
  return where


class StepProfiler:
  """A `jax.profiler` trace of `train.profile_num_steps` steps from `train.profile_start_step`
  into <workdir>/profile (off when the start step is -1, or before it on a resumed run)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.start = int(config.train.profile_start_step)
    self.stop = self.start + max(1, int(config.train.profile_num_steps))
    self.directory = storage.join(workdir, "profile")
    self.active = False

  def before(self, step: int) -> None:
    if self.start >= 0 and step == self.start:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step + 1 >= self.stop:
      jax.block_until_ready(state)  # The traced steps' device work, not just their dispatch.
      self.close()
      log.info("profile of steps %d-%d written to %s", self.start, step, self.directory)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _is_writer() -> bool:
  return jax.process_index() == 0


@contextlib.contextmanager
def progress_bar(start_step: int, num_steps: int) -> Iterator[tqdm.tqdm]:
  """A tqdm bar over the steps (process 0 only), with the log lines redirected above it instead
  of being glued to its line."""
  with tqdm.tqdm(total=num_steps, initial=start_step, desc="train", unit="step",
                 disable=not _is_writer(), mininterval=2.0, dynamic_ncols=True) as bar:
    with tqdm_logging.logging_redirect_tqdm(loggers=[log]):
      yield bar


def save_and_stop(step: int, state, data_iter, meta, ckpt: checkpoint_lib.Checkpointer) -> None:
  """The stop on preemption or SIGTERM at `step`: checkpoint (unless one exists), wait, say so."""
  if ckpt.latest_step() != step:
    ckpt.save(step, state, data_iter, meta, force=True)
  ckpt.wait()
  msg = (f"posebh-train: stopped at step {step} (preemption/SIGTERM); checkpoint saved in "
         f"{ckpt.directory}; rerun the same command to resume")
  log.warning(msg)
  print(msg, flush=True)


def log_metrics(metrics, *, steps: int, elapsed: float, batch_size: int,
                flops: float | None) -> dict[str, float]:
  """A log step's metrics on the host: the step's scalars (learning rate included) plus
  images/s and MFU over the `steps` steps since the last log."""
  out = {k: float(v) for k, v in jax.device_get(metrics).items()
         if not k.startswith("finite")}  # Always 1 here: checked before.
  out["images_per_second"] = steps * batch_size / elapsed
  utilisation = throughput.mfu(flops, elapsed / steps)
  if utilisation is not None:
    out["mfu"] = utilisation
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains for `config.train.num_steps` (resuming from `workdir` if possible), then evaluates.

  Returns:
    {"step": final step, "train": last logged train metrics, "eval": evaluation results}.
  """
  # ==== Workdir ===================================================================================
  # Never os.path on the workdir: it may be a URL (gs://bucket/run), used as it is.
  workdir = storage.absolute(workdir)
  storage.makedirs(workdir)
  t_start = time.time()
  enable_compilation_cache(config, workdir)

  # ==== Layout, model =============================================================================
  layout = datasets.build_layout(config)
  validate_config(config, layout)
  model = experiment.build_model(config, layout)
  td_cfg = datasets.topdown_config(config, layout)

  # ==== Data: records ============================================================================
  files = experiment.resolve_dataset_files(config, workdir)
  train_records, reports = datasets.load_records(config, layout, files, "train")
  val_records, val_reports = datasets.load_records(config, layout, files, "val")
  for r in reports + val_reports:
    log.info("data: %s", r)

  # ==== Mesh, state ===============================================================================
  mesh = sharding_lib.make_mesh(config.mesh)
  per_host_batch = sharding_lib.check_batch_size(config.train.batch_size, mesh)
  state, abstract_state, state_shardings, tx = create_train_state(config, model, layout, mesh)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_state.params))
  log.info("model: %.2fM parameters; mesh %s; global batch %d", n_params / 1e6,
           dict(mesh.shape), config.train.batch_size)

  # ==== Data: input pipeline =====================================================================
  weights = datasets.train_weights(config)  # 0 for evaluation-only datasets.
  # Every host computes the same global sample stream and materialises only its rows of each
  # global batch: the batches do not depend on the process count.
  rows = pipeline.host_batch_rows(config.train.batch_size, mesh)
  assert len(rows) == per_host_batch, (rows, per_host_batch)
  dataset = pipeline.mixed_train_dataset(
      train_records, weights, td_cfg, batch_size=config.train.batch_size, seed=config.seed,
      rows=rows)
  num_workers = datasets.num_input_workers(config)
  log.info("data: %d input worker process(es) per host", num_workers)
  data_iter = pipeline.make_iterator(dataset, num_workers=num_workers,
                                     prefetch=config.data.prefetch)

  # ==== Checkpoint / resume =======================================================================
  # Hosts reach this point minutes apart under load; the checkpoint manager's first collective
  # (gloo on CPU) waits only 30 s for its peers: line them up at a barrier that waits long.
  distributed.barrier("checkpointer")
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
  meta = experiment.checkpoint_meta(config, layout)
  # The newest intact checkpoint: damaged ones are skipped (and set aside) with a warning.
  try:
    restored = ckpt.restore_latest(abstract_state, data_iter, meta)
  except BaseException:
    # A refused restore (another model, every checkpoint damaged) is a one-line error: close
    # orbax's manager first, or its threads meet the interpreter's shutdown and print a
    # "cannot schedule new futures after shutdown" traceback after that line.
    ckpt.close()
    raise
  if restored is not None:
    latest, state = restored
    log.info("resumed from checkpoint at step %d (%s)", latest, ckpt.directory)
  elif config.init.weights:
    state = init_from_weights(config, state, model, layout, state_shardings)
  start_step = int(jax.device_get(state.step))

  # ==== Step: one compiled function per stage =====================================================
  step_fn = StageSteps(config, layout, model, tx, mesh, state_shardings,
                       targets=device_targets.TargetSpec.from_topdown(td_cfg))

  # ==== Writers (process 0) =======================================================================
  writer = train_log = None
  if _is_writer():
    import tensorboardX  # Imported lazily: only process 0 writes events.
    # tensorboardX writes gs:// itself (google-cloud-storage, no TensorFlow).
    writer = tensorboardX.SummaryWriter(storage.join(workdir, "tensorboard"))
    train_log = metrics_log.TrainMetricsLog(workdir, start_step)

  # ==== Loop ======================================================================================
  # Every step's finiteness flag is read after the NEXT step has been dispatched, so the host
  # never waits on the device for it; before a checkpoint, an evaluation, a log line or a stop
  # the current step's flag is read, so none of them ever sees a non-finite state.
  num_steps = config.train.num_steps
  last_metrics: dict[str, float] = {}
  t_log, steps_since_log = time.time(), 0
  preemption = checkpoint_lib.PreemptionWatch(ckpt)
  signal_stop = distributed.SignalStop()  # Multi-process SIGTERM without the preemption service.
  profiler = StepProfiler(config, workdir)
  pending = None  # (step count, metrics) whose finiteness is not checked yet.
  evaluator = None  # Built at the first evaluation; its predict functions compile once.
  stopped_at = None
  bad_images, max_bad_images = 0, int(config.data.max_bad_images)
  try:
    with progress_bar(start_step, num_steps) as bar:
      for step in range(start_step, num_steps):
        # -- Stop on preemption / SIGTERM --
        if preemption.should_stop(step) or signal_stop.should_stop(step):
          check_finite(pending, ckpt)
          pending = None
          save_and_stop(step, state, data_iter, meta, ckpt)
          stopped_at = step
          break
        # -- One step --
        state = enter_step(config, state, step, tx, state_shardings, step_fn.schedule)
        local_batch = next(data_iter)
        bad_images = count_skipped_images(local_batch, bad_images, max_bad_images, step)
        batch = pipeline.to_global_batch(local_batch, mesh)
        profiler.before(step)
        state, metrics = step_fn.run(step, state, batch)
        profiler.after(step, state)
        check_finite(pending, ckpt)
        done = step + 1
        pending = (done, metrics)
        steps_since_log += 1
        bar.update(1)
        # -- Log --
        if done % config.train.log_every == 0 or done == num_steps:
          check_finite(pending, ckpt)
          pending = None
          last_metrics = log_metrics(metrics, steps=steps_since_log,
                                     elapsed=time.time() - t_log,
                                     batch_size=config.train.batch_size,
                                     flops=step_fn.flops_at(step))
          t_log, steps_since_log = time.time(), 0
          bar.set_postfix(loss=f"{last_metrics['loss/total']:.3g}")
          if writer is not None:
            write_train_metrics(writer, train_log, done, last_metrics)
        # -- Checkpoint --
        if done % config.train.checkpoint_every == 0 or done == num_steps:
          check_finite(pending, ckpt)
          pending = None
          ckpt.save(done, state, data_iter, meta)
        # -- Periodic evaluation --
        if eval_due(config, done):
          check_finite(pending, ckpt)
          pending = None
          evaluator = evaluator or make_evaluator(config, workdir, model, layout, td_cfg, mesh,
                                                  val_records, files=files)
          evaluate(config, workdir, model, layout, td_cfg, mesh, val_records, state, done,
                   writer, evaluator=evaluator)
      check_finite(pending, ckpt)
  except BaseException:
    if writer is not None:
      writer.close()  # Explicitly: tensorboardX would re-upload gs:// events at interpreter exit.
    raise
  finally:
    preemption.close()
    signal_stop.close()
    profiler.close()
    ckpt.wait()
  if stopped_at is not None:
    if writer is not None:
      writer.close()
    ckpt.close()
    return dict(step=stopped_at, train=last_metrics, eval={}, preempted=True)
  log.info("training done at step %d (%.0f s since start)", num_steps, time.time() - t_start)

  # ==== Evaluation ================================================================================
  eval_out: dict[str, Any] = {}
  if config.train.eval_at_end:
    eval_out = evaluate(config, workdir, model, layout, td_cfg, mesh, val_records, state,
                        num_steps, writer, files=files, evaluator=evaluator)
  if writer is not None:
    writer.close()
  ckpt.close()
  return dict(step=num_steps, train=last_metrics, eval=eval_out)


def evaluate(config, workdir, model, layout, td_cfg, mesh, val_records, state, step, writer=None,
             *, files=None, protocols=None, evaluator=None,
             eval_dir: str | None = None) -> dict[str, Any]:
  """Evaluates with each dataset's paper protocol (spec §5.1; `evaluation.benchmark`), prints
  the table, writes `<eval_dir>/metrics_<step>.json` (and the COCO result files under
  `<eval_dir>/results_<step>/`) and, with a `writer`, TensorBoard scalars.

  Args:
    val_records: validation records per dataset index, read with the protocols' boxes.
    files: the resolved dataset files (default: resolved from `config`).
    protocols: the datasets to score (default: every dataset with validation annotations,
      boxes as configured).
    evaluator: a `BenchmarkEvaluator` to reuse (periodic evaluation: compiled once).
    eval_dir: where the outputs go (default `<workdir>/eval`, the training run's own).
  """
  eval_dir = storage.join(workdir, "eval") if eval_dir is None else eval_dir
  if evaluator is None:
    evaluator = make_evaluator(config, workdir, model, layout, td_cfg, mesh, val_records,
                               files=files, protocols=protocols)
  results_dir = storage.join(eval_dir, f"results_{step}") if _is_writer() else None
  results = evaluator.run(state.params, state.batch_stats, results_dir=results_dir)
  table = benchmark.format_table(results, config.eval.pck_thresholds)
  out = {}
  if _is_writer():
    flip = "with" if evaluator.flip_test else "without"
    print(f"\nEvaluation at step {step} (held-out images, {flip} flip test; values in [0, 1]):"
          f"\n{table}\n", flush=True)
    path = benchmark.write_metrics(results, eval_dir, step)
    print(f"metrics written to {path}", flush=True)
    out["metrics_file"] = path
    if writer is not None:
      for tag, v in benchmark.tensorboard_scalars(results).items():
        writer.add_scalar(tag, v, step)
      writer.flush()
  out["datasets"] = {r.name: dict(metric=r.metric, boxes=r.boxes, n=r.num_instances,
                                  values=r.values) for r in results.datasets}
  out["results"] = [dict(images=r.images, skeleton=r.skeleton, n=r.num_instances, pck=r.pck,
                         pck_novel=r.pck_novel) for r in results.pairs]
  return out


def make_evaluator(config, workdir, model, layout, td_cfg, mesh, val_records, *, files=None,
                   protocols=None) -> benchmark.BenchmarkEvaluator:
  """The evaluator of `config`'s datasets (see `evaluate`)."""
  if protocols is None:
    files = experiment.resolve_dataset_files(config, workdir) if files is None else files
    protocols = benchmark.dataset_protocols(config, files)
  return benchmark.BenchmarkEvaluator(model, layout, config, td_cfg, mesh, protocols,
                                      val_records)


def eval_due(config: ml_collections.ConfigDict, done: int) -> bool:
  """Whether the periodic evaluation (`train.eval_every` steps; -1 off) runs after `done`
  steps; the last step is left to `train.eval_at_end` when that is on."""
  every = config.train.eval_every
  last = done == config.train.num_steps and config.train.eval_at_end
  return every > 0 and done % every == 0 and not last
