"""The real CLIs on 2 local processes × 2 CPU devices (jax.distributed), as a pod user runs them.

  * posebh-train from a fresh workdir (process 0 generates the synthetic data, the other waits),
    killed (SIGKILL, both processes) after its first checkpoint, rerun with the same command:
    it resumes from the checkpoint and finishes with its evaluation.
  * posebh-eval of that checkpoint on 2 processes gives the metrics of 1 process.
  * mesh data=1, fsdp=4 across the 2 processes trains on the same global batches as data=4 on
    1 process × 4 devices: equal losses, so every row reaches the loss and the batches do not
    depend on the process count; and equal final parameters, read back from each run's
    checkpoint (the FSDP run's parameter shards written by both processes).

Every process runs the console-script entry point (`python -m posebh_jax.main_*`, the same
`run()`), with its own XLA_FLAGS; logs go to files named in the failure message.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import assert_params_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

TIMEOUT_S = 900  # Per multi-process run: CPU collectives are slow on a loaded 2-core machine.
# Small, uneven evaluation shares (11 instances per dataset over 2 processes: 6 + 5, in batches
# of 2 rows per process with padding) and a short run.
# One training stage (no prototype freeze / CPS / CSS): one step compilation per run.
COMMON = ["--config=configs/synthetic.py:tiny", "--config.data.synthetic.num_val=11",
          "--config.eval.batch_size=4", "--config.schedule.proto_freeze_step=-1",
          "--config.schedule.cps_start_step=-1", "--config.schedule.css_start_step=-1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(module: str, args: list[str], nproc: int, devices: int, log_dir: str,
            **env_vars: str) -> list[tuple[subprocess.Popen, str]]:
  """Starts `python -m module args` on `nproc` processes of `devices` CPU devices each."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **env_vars)
  port = _free_port()
  procs = []
  os.makedirs(log_dir, exist_ok=True)
  for i in range(nproc):
    extra = []
    if nproc > 1:
      extra = ["--config.distributed.enabled=True",
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               f"--config.distributed.num_processes={nproc}",
               f"--config.distributed.process_id={i}"]
    log = os.path.join(log_dir, f"{module.rsplit('.', 1)[-1]}_{nproc}x{devices}_{i}.log")
    with open(log, "a") as f:
      procs.append((subprocess.Popen([sys.executable, "-m", module, *args, *extra], cwd=REPO,
                                     env=env, stdout=f, stderr=subprocess.STDOUT), log))
  return procs


def _kill(procs) -> None:
  for p, _ in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
  for p, _ in procs:
    p.wait()


def _wait(procs, timeout_s: float = TIMEOUT_S) -> list[str]:
  """Waits for every process to exit 0; returns their logs (failure: the logs' tails)."""
  deadline = time.time() + timeout_s
  try:
    for p, _ in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    _kill(procs)
  logs = [open(log).read() for _, log in procs]
  bad = [(i, p.returncode) for i, (p, _) in enumerate(procs) if p.returncode != 0]
  assert not bad, "\n".join(f"process {i} exit {rc}:\n{logs[i][-4000:]}" for i, rc in bad)
  return logs


def _run(module, args, nproc, devices, log_dir, timeout_s=TIMEOUT_S) -> list[str]:
  return _wait(_launch(module, args, nproc, devices, log_dir), timeout_s)


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return {r["step"]: r["loss/total"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
  """The 2-process tiny runs' persistent compilation cache (same program: compiled once)."""
  return str(tmp_path_factory.mktemp("multihost_cli_jax_cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
  """A 2-process training run killed after its first checkpoint and resumed to the end."""
  root = tmp_path_factory.mktemp("multihost_cli")
  workdir, logs = str(root / "train"), str(root / "logs")
  # The persistent compilation cache outside the workdir, shared by both attempts: the resumed
  # run reuses the killed run's compiled step.
  args = [*COMMON, f"--workdir={workdir}", "--config.train.checkpoint_every=2",
          "--config.train.log_every=1", f"--config.train.compilation_cache={cache}"]
  # First attempt: far more steps than needed; SIGKILL both processes once a checkpoint is
  # complete (orbax renames the step directory when the save is finished).
  procs = _launch("posebh_jax.main_train", [*args, "--config.train.num_steps=1000"], 2, 2, logs)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + TIMEOUT_S
  try:
    while time.time() < deadline:
      done = [int(d) for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
              if d.isdigit()]
      if done or any(p.poll() is not None for p, _ in procs):
        break
      time.sleep(0.2)
  finally:
    _kill(procs)
  first = [open(log).read() for _, log in procs]
  assert done, "no checkpoint before the kill:\n" + "\n".join(t[-3000:] for t in first)
  killed_at = max(done)
  assert killed_at < 1000 and all(p.returncode == -signal.SIGKILL for p, _ in procs)
  # The same command (shorter budget) on both hosts resumes there and finishes with evaluation.
  final = killed_at + 2
  out = _run("posebh_jax.main_train", [*args, f"--config.train.num_steps={final}"], 2, 2,
             logs)
  return dict(workdir=workdir, logs=logs, killed_at=killed_at, final=final, out=out,
              cache=cache)


def test_train_from_fresh_workdir_killed_resumed_and_evaluated(trained):
  workdir, final = trained["workdir"], trained["final"]
  assert f"resumed from checkpoint at step {trained['killed_at']}" in trained["out"][0]
  # Process 0 wrote the evaluation of the final step; every dataset was scored on all 11 held-out
  # instances (each host predicted its share, process 0 gathered them).
  with open(os.path.join(workdir, "eval", f"metrics_{final}.json")) as f:
    metrics = json.load(f)
  assert set(metrics["per_dataset"]) == {"synth_coco", "synth_aic", "synth_ap10k"}
  for v in metrics["per_dataset"].values():
    assert v["num_instances"] == 11 and 0.0 <= v["pck@0.1"] <= 1.0
  losses = _losses(workdir)
  assert set(range(trained["killed_at"] + 1, final + 1)) <= set(losses)
  assert all(np.isfinite(v) for v in losses.values())
  # Data generated once, by process 0, in the fresh workdir.
  assert os.path.isfile(os.path.join(workdir, "synthetic_data", "manifest.json"))
  assert os.listdir(trained["cache"])  # Compiled executables persisted for the next start.


def test_eval_on_two_processes_equals_one(trained, tmp_path):
  metrics = {}
  for nproc, devices in ((1, 2), (2, 2)):
    wd = str(tmp_path / f"eval_{nproc}")
    os.makedirs(wd)
    os.symlink(os.path.join(trained["workdir"], "checkpoints"), os.path.join(wd, "checkpoints"))
    data = os.path.join(trained["workdir"], "synthetic_data")
    # Wide PCK thresholds too: a 4-step model is rarely within 0.1 of the box size.
    _run("posebh_jax.main_eval", [*COMMON, f"--workdir={wd}", f"--config.data.root={data}",
                                  f"--out={wd}/out", "--config.eval.pck_thresholds=(0.1,0.3,1.0)"],
         nproc, devices, str(tmp_path / "logs"))
    with open(os.path.join(wd, "out", f"metrics_{trained['final']}.json")) as f:
      metrics[nproc] = json.load(f)
  assert metrics[2]["per_dataset"]["synth_coco"]["num_instances"] == 11
  assert any(0 < v["pck@0.3"] < 1 for v in metrics[1]["per_dataset"].values())
  assert metrics[2] == metrics[1]


def test_fsdp_across_processes_reaches_every_row(tmp_path):
  # data=1 x fsdp=4 over 2 processes x 2 devices vs data=4 on 1 process x 4 devices: the same
  # global batches (a function of the config alone) and every row of them in the loss. Before,
  # the batch was placed on 'data' only: with data=1 one host's rows were taken as the batch.
  data = str(tmp_path / "data")
  common = [*COMMON, f"--config.data.root={data}", "--config.train.num_steps=3",
            "--config.train.log_every=1", "--config.train.eval_at_end=False",
            "--config.mesh.fsdp_min_size=64"]
  runs = {}
  for name, nproc, devices, mesh in (("one", 1, 4, ["--config.mesh.data=4"]),
                                     ("fsdp", 2, 2, ["--config.mesh.data=1",
                                                     "--config.mesh.fsdp=4"])):
    wd = str(tmp_path / name)
    _run("posebh_jax.main_train", [*common, *mesh, f"--workdir={wd}"], nproc, devices,
         str(tmp_path / "logs"))
    runs[name] = _losses(wd)
  assert sorted(runs["one"]) == sorted(runs["fsdp"]) == [1, 2, 3]
  for step in (1, 2, 3):
    np.testing.assert_allclose(runs["fsdp"][step], runs["one"][step], rtol=1e-4,
                               err_msg=f"step {step}")
  # The parameters each run checkpointed at its end (the FSDP run's shards written by both
  # hosts) are those of the single process: every parameter, not only the loss.
  from configs import synthetic
  from posebh_jax.train import restore
  cfg = synthetic.get_config("tiny")
  cfg.data.root = data
  params = {}
  for name in runs:
    state, step = restore.restore_state(cfg, str(tmp_path / name))
    assert step == 3, name
    params[name] = state.params
  assert_params_close(params["fsdp"], params["one"], adam_steps=3,
                      learning_rate=cfg.train.learning_rate, rtol=1e-5)


def test_sigterm_on_one_host_stops_every_host_at_one_step(tmp_path, cache):
  # Without JAX's preemption service, SIGTERM to ONE process: every process saves the same step
  # and exits 0 (a per-process flag would leave the other host waiting in a collective).
  workdir = str(tmp_path / "run")
  procs = _launch("posebh_jax.main_train",
                  [*COMMON, f"--config.data.root={tmp_path / 'data'}", f"--workdir={workdir}",
                   "--config.train.num_steps=1000", "--config.train.checkpoint_every=1000",
                   "--config.train.log_every=1", "--config.train.eval_at_end=False",
                   f"--config.train.compilation_cache={cache}"],
                  2, 2, str(tmp_path / "logs"), JAX_ENABLE_PREEMPTION_SERVICE="false")
  metrics = os.path.join(workdir, "train_metrics.jsonl")
  deadline = time.time() + TIMEOUT_S
  while time.time() < deadline and not os.path.exists(metrics):
    if any(p.poll() is not None for p, _ in procs):
      break
    time.sleep(0.2)
  procs[1][0].send_signal(signal.SIGTERM)  # Host 1 only.
  logs = _wait(procs)
  stops = [re.search(r"stopped at step (\d+) \(preemption/SIGTERM\)", t) for t in logs]
  assert all(stops), [t[-2000:] for t in logs]
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step and 1 <= step < 1000
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))

