"""End to end on tiny synthetic data: train, checkpoint, resume, evaluate, and the CLI."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, cli_env, tiny_config, tiny_train_args
from posebh_jax.evaluation import evaluate
from posebh_jax.train import checkpoint as checkpoint_lib
from posebh_jax.train import loop

pytestmark = pytest.mark.slow


def _params(workdir, cfg, step):
  from data_pipelines import datasets
  from posebh_jax import experiment
  layout = datasets.build_layout(cfg)
  model = experiment.build_model(cfg, layout)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  _, abstract, _, _ = loop.abstract_train_state(cfg, model, layout, mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir)
  state = ckpt.restore(step, abstract, None, experiment.checkpoint_meta(cfg, layout))
  ckpt.close()
  return jax.device_get(state)


def test_train_checkpoint_resume_evaluate(tmp_path, data_root):
  wd_a, wd_b = str(tmp_path / "a"), str(tmp_path / "b")
  # Uninterrupted: 4 steps, checkpoints at 2 and 4, evaluation at the end.
  out = loop.train_and_evaluate(tiny_config(data_root, num_steps=4), wd_a)
  assert out["step"] == 4 and np.isfinite(out["train"]["loss/total"])
  assert sorted(checkpoint_lib.Checkpointer(wd_a).all_steps()) == [2, 4]
  metrics = json.load(open(os.path.join(wd_a, "eval", "metrics_4.json")))
  assert set(metrics["per_dataset"]) == {"synth_coco", "synth_aic", "synth_ap10k"}
  assert set(metrics["cross_skeleton"]) == {"synth_coco->synth_aic", "synth_aic->synth_coco"}
  for v in metrics["per_dataset"].values():
    assert 0.0 <= v["pck@0.1"] <= 1.0 and v["num_instances"] == 8
  assert os.listdir(os.path.join(wd_a, "tensorboard"))

  # Interrupted: stop after 2 steps, then the same command with the full budget resumes there
  # and reproduces the uninterrupted run bit for bit (same batches, same step RNG).
  loop.train_and_evaluate(tiny_config(data_root, num_steps=2, eval_at_end=False), wd_b)
  assert checkpoint_lib.Checkpointer(wd_b).all_steps() == [2]
  loop.train_and_evaluate(tiny_config(data_root, num_steps=4, eval_at_end=False), wd_b)
  cfg = tiny_config(data_root, num_steps=4)
  a, b = _params(wd_a, cfg, 4), _params(wd_b, cfg, 4)
  for x, y in zip(jax.tree_util.tree_leaves((a.params, a.prototypes, a.batch_stats, a.opt_state)),
                  jax.tree_util.tree_leaves((b.params, b.prototypes, b.batch_stats, b.opt_state))):
    np.testing.assert_array_equal(x, y)

  # Standalone evaluation of the checkpoint gives the numbers training printed.
  ev = evaluate.evaluate_checkpoint(cfg, wd_a)
  again = {r["images"] + "->" + r["skeleton"]: r["pck"] for r in ev["results"]}
  assert again["synth_coco->synth_coco"] == pytest.approx(
      {k: v for k, v in metrics["per_dataset"]["synth_coco"].items() if k.startswith("pck")})

  # A checkpoint of another model is refused with a clear message, not silently loaded.
  other = tiny_config(data_root, num_steps=4)
  other.model.embed_dim = 48
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="embed_dim"):
    evaluate.evaluate_checkpoint(other, wd_a)


def _cli(*args, timeout=600):
  return subprocess.run(list(args), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                        timeout=timeout)


def _eval_args(workdir, *flags):
  return [sys.executable, "-m", "posebh_jax.main_eval", "--config=configs/synthetic.py:tiny",
          f"--workdir={workdir}", *flags]


def test_cli_trains_and_rejects_typos(tmp_path, data_root):
  wd = str(tmp_path / "cli")
  bad = _cli(*tiny_train_args(wd, data_root, "--config.train.nmu_steps=3"))
  assert bad.returncode != 0 and "nmu_steps" in bad.stderr
  ok = _cli(*tiny_train_args(wd, data_root, num_steps=2))
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "Evaluation at step 2" in ok.stdout and "synth_ap10k" in ok.stdout
  train_metrics = pathlib.Path(wd, "eval", "metrics_2.json").read_bytes()
  ev = _cli(*_eval_args(wd, f"--config.data.root={data_root}", "--config.eval.flip_test=True"))
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert "Evaluation at step 2" in ev.stdout
  # The evaluation (other settings) has its own folder; the training run's results are intact.
  assert pathlib.Path(wd, "eval", "metrics_2.json").read_bytes() == train_metrics
  assert json.load(open(os.path.join(wd, "eval_cli", "all", "metrics_2.json")))["step"] == 2
  missing = _cli(*_eval_args(tmp_path / "empty", f"--config.data.root={data_root}"))
  assert missing.returncode == 1 and "posebh-eval: no checkpoints in" in missing.stderr
  assert not (tmp_path / "empty").exists()
