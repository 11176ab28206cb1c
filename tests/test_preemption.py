"""Preemption, crashes, NaN guard and determinism of `posebh-train` on tiny synthetic data.

  * kill -9 during a checkpoint save → the latest checkpoint restores, and rerunning the same
    command resumes and finishes with per-step losses bit-identical to an uninterrupted run,
    each step logged once in train_metrics.jsonl;
  * SIGTERM → a checkpoint at the current step and exit code 0;
  * a non-finite loss stops training with the term named, keeping the last good checkpoint.
"""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import REPO, cli_env, tiny_config, tiny_train_args
from posebh_jax.train import checkpoint as checkpoint_lib
from posebh_jax.train import loop, restore

NUM_STEPS = 8


def _config(data_root, **train):
  return tiny_config(data_root, **{"num_steps": NUM_STEPS, "eval_at_end": False, **train})


def _cli_args(workdir, data_root, **train):
  return tiny_train_args(workdir, data_root,
                         **{"num_steps": NUM_STEPS, "eval_at_end": False, **train})


def _start(args):
  return subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _losses(workdir):
  """Per-step total loss from train_metrics.jsonl (a resumed run's later lines win)."""
  out = {}
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out[r["step"]] = r["loss/total"]
  return out


def _restore(workdir, cfg, step):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.device_get(restore.restore_state(cfg, workdir, step, mesh)[0])


def _wait_for(predicate, proc, timeout=300):
  t = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    if time.time() - t > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.05)


def test_kill_during_save_then_resume_is_bit_identical(tmp_path, data_root):
  ref_dir, wd = str(tmp_path / "ref"), str(tmp_path / "killed")
  ckpt_dir = os.path.join(wd, "checkpoints")
  # Checkpoint every step, so that saves are in flight most of the time; kill -9 as soon as a
  # save's temporary directory appears after the first complete checkpoint.
  proc = _start(_cli_args(wd, data_root, checkpoint_every=1))

  def saving_after_first():
    if not os.path.isdir(ckpt_dir):
      return False
    names = os.listdir(ckpt_dir)
    done = [n for n in names if n.isdigit()]
    return bool(done) and any("tmp" in n for n in names)
  # Compiling the first step takes minutes on a loaded 2-core machine.
  _wait_for(saving_after_first, proc, timeout=900)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  ckpt = checkpoint_lib.Checkpointer(wd)
  latest = ckpt.latest_step()
  ckpt.close()
  assert latest is not None and 1 <= latest < NUM_STEPS
  cfg = _config(data_root)
  state = _restore(wd, cfg, latest)
  assert int(state.step) == latest
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))

  # The same command again resumes from `latest` and finishes.
  resumed = _start(_cli_args(wd, data_root, checkpoint_every=1))
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-3000:]
  assert f"resumed from checkpoint at step {latest}" in err
  # The killed run may have logged steps after `latest`: they are dropped, then logged again.
  with open(os.path.join(wd, "train_metrics.jsonl")) as f:
    logged = [json.loads(line)["step"] for line in f]
  assert logged == list(range(1, NUM_STEPS + 1))

  # Uninterrupted reference in this process: identical losses at every step, identical state.
  loop.train_and_evaluate(_config(data_root), ref_dir)
  ref, got = _losses(ref_dir), _losses(wd)
  assert sorted(ref) == sorted(got) == list(range(1, NUM_STEPS + 1))
  assert got == ref  # Bit-identical floats (JSON round-trips float64 exactly).
  a, b = _restore(ref_dir, cfg, NUM_STEPS), _restore(wd, cfg, NUM_STEPS)
  for x, y in zip(jax.tree_util.tree_leaves((a.params, a.opt_state, a.prototypes, a.batch_stats)),
                  jax.tree_util.tree_leaves((b.params, b.opt_state, b.prototypes, b.batch_stats))):
    np.testing.assert_array_equal(x, y)


def test_sigterm_checkpoints_the_current_step_and_exits_zero(tmp_path, data_root):
  wd = str(tmp_path / "term")
  proc = _start(_cli_args(wd, data_root, checkpoint_every=100))
  metrics = os.path.join(wd, "train_metrics.jsonl")
  _wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 2, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped at step" in out and "rerun the same command to resume" in out
  step = int(out.split("stopped at step ")[1].split()[0])
  ckpt = checkpoint_lib.Checkpointer(wd)
  steps = ckpt.all_steps()
  ckpt.close()
  assert 2 <= step < NUM_STEPS and steps == [step]  # checkpoint_every=100: only this one.
  assert int(_restore(wd, _config(data_root), step).step) == step


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root):
  wd = str(tmp_path / "nan")
  loop.train_and_evaluate(_config(data_root, num_steps=2, checkpoint_every=2), wd)
  bad = _config(data_root, checkpoint_every=1)
  bad.loss.heatmap_weight = float("nan")
  with pytest.raises(loop.NonFiniteLossError, match=r"step 3: \{.*'loss/total': nan"):
    loop.train_and_evaluate(bad, wd)
  ckpt = checkpoint_lib.Checkpointer(wd)
  assert ckpt.all_steps() == [2]  # Nothing saved after the bad step.
  ckpt.close()
  state = _restore(wd, bad, 2)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.params))
