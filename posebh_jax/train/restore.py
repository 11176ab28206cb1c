"""The one way to read a training workdir's checkpoint back as a train state.

Used by `posebh-eval` (`evaluation.evaluate.evaluate_checkpoint`), `inference.restore_checkpoint`
and the tests; the train loop's own resume goes through `checkpoint.Checkpointer.restore_latest`,
which also restores the data iterator.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from data_pipelines import datasets, storage
from posebh_jax import experiment
from posebh_jax.train import checkpoint as checkpoint_lib
from posebh_jax.train import loop
from posebh_jax.train import sharding as sharding_lib


def require_checkpoints(workdir: str) -> str:
  """The workdir's checkpoint directory. Checked before anything opens it: the checkpoint
  manager would create it.

  Raises:
    FileNotFoundError: `workdir` has no `checkpoints/`.
  """
  ckpt_dir = storage.join(storage.absolute(workdir), "checkpoints")  # The workdir may be gs://.
  if not storage.is_dir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoints in {workdir} (expected {ckpt_dir})")
  return ckpt_dir


def restore_state(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                  mesh: Mesh | None = None) -> tuple[Any, int]:
  """`config`'s train state from `workdir`'s checkpoint `step` (default: the latest).

  Args:
    config: the experiment config the checkpoint was trained with (its model and datasets are
      compared with the checkpoint's metadata).
    workdir: the training workdir (local or gs://).
    step: which checkpoint; None = the latest.
    mesh: where the state is placed, sharded as in training; None = one device (what an
      interactive session wants).

  Returns:
    (train state, its step).

  Raises:
    FileNotFoundError: no checkpoints, or no checkpoint `step`.
    CheckpointMismatchError: the checkpoint belongs to another model or dataset mix.
    CheckpointDamagedError: the checkpoint cannot be read as saved.
  """
  require_checkpoints(workdir)
  layout = datasets.build_layout(config)
  model = experiment.build_model(config, layout)
  if mesh is None:
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1)), jax.devices()[:1])
  ckpt = checkpoint_lib.Checkpointer(workdir)
  try:
    steps = ckpt.all_steps()
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt.directory} "
                              f"(have {steps})")
    _, abstract, _, _ = loop.abstract_train_state(config, model, layout, mesh)
    state = ckpt.restore(step, abstract, None, experiment.checkpoint_meta(config, layout))
  finally:
    ckpt.close()
  return state, step
