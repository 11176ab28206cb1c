"""Pod options where a user meets them: `data.num_workers=-1` (auto, the default) and
`train.profile_start_step` (a `jax.profiler` trace in the workdir), through real `posebh-train`
runs on tiny synthetic data."""

import os
import subprocess
import sys

import jax

from conftest import cli_env, tiny_train_args

from configs import synthetic
from data_pipelines import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs posebh-train as an accelerator host would see it: JAX reports a TPU backend and the host
# has 4 CPUs (the compute itself stays on the CPU devices). Only `num_input_workers` asks.
_AS_TPU_HOST = ("import os, sys, jax; jax.default_backend = lambda: 'tpu'; "
                "os.cpu_count = lambda: 4; from posebh_jax import main_train; "
                "sys.argv[0] = 'posebh-train'; main_train.run()")


def _train(workdir, data_root, *flags, as_tpu_host=False):
  head = [sys.executable, "-c", _AS_TPU_HOST] if as_tpu_host else [
      sys.executable, "-m", "posebh_jax.main_train"]
  # The session's tiny data and compilation cache (conftest): the programs of the other tiny runs.
  args = head + tiny_train_args(workdir, data_root, "--config.train.eval_at_end=False",
                                "--config.train.checkpoint_every=100", *flags)[3:]
  return subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                        timeout=600)


def test_num_workers_auto_resolution(monkeypatch):
  cfg = synthetic.get_config("tiny")
  assert cfg.data.num_workers == -1  # The default of every config (configs/common.py).
  assert jax.default_backend() == "cpu"
  assert datasets.num_input_workers(cfg) == 0  # CPU devices: the step needs the cores.
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  for cpus, want in ((1, 1), (4, 2), (10, 5), (64, 16), (240, 16)):
    monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
    assert datasets.num_input_workers(cfg) == want, cpus
  cfg.data.num_workers = 3  # An explicit count is kept as given.
  assert datasets.num_input_workers(cfg) == 3
  cfg.data.num_workers = 0
  assert datasets.num_input_workers(cfg) == 0


def test_cli_resolves_workers_and_writes_a_profile_trace(tmp_path, data_root):
  """Two real runs: on CPU devices with a profile of steps 1-2; as a 4-CPU TPU host without."""
  # CPU devices: the default (-1) resolves to reading in the main process.
  workdir = tmp_path / "cpu"
  cpu = _train(workdir, data_root, "--config.train.num_steps=4",
               "--config.train.profile_start_step=1", "--config.train.profile_num_steps=2")
  assert cpu.returncode == 0, cpu.stderr[-3000:]
  log = cpu.stdout + cpu.stderr
  assert "data: 0 input worker process(es) per host" in log
  assert "profile of steps 1-2 written to" in log
  traces = [p for p in (workdir / "profile").rglob("*") if p.is_file()]
  assert traces, f"no file under {workdir / 'profile'}"
  assert any(p.name.endswith((".xplane.pb", ".trace.json.gz")) for p in traces), traces
  assert all(p.stat().st_size > 0 for p in traces), [(p, p.stat().st_size) for p in traces]
  # An accelerator host with 4 CPUs: 2 grain worker processes, and training finishes with them.
  # No profile asked for (the default): no profile directory.
  tpu = _train(tmp_path / "tpu", data_root, "--config.train.num_steps=2", as_tpu_host=True)
  assert tpu.returncode == 0, tpu.stderr[-3000:]
  assert "data: 2 input worker process(es) per host" in tpu.stdout + tpu.stderr
  assert (tmp_path / "tpu" / "train_metrics.jsonl").read_text().count('"step"') == 2
  assert not (tmp_path / "tpu" / "profile").exists()


def test_auto_compilation_cache_keeps_the_one_jax_was_given(tmp_path):
  """`train.compilation_cache="auto"`: JAX_COMPILATION_CACHE_DIR where the user set it (this
  session sets it in conftest), else <workdir>/compilation_cache; "" turns it off."""
  from conftest import COMPILATION_CACHE
  from posebh_jax.train import loop
  cfg = synthetic.get_config("tiny")
  assert cfg.train.compilation_cache == "auto"
  given = jax.config.jax_compilation_cache_dir
  assert given == COMPILATION_CACHE
  try:
    assert loop.enable_compilation_cache(cfg, str(tmp_path)) == COMPILATION_CACHE
    jax.config.update("jax_compilation_cache_dir", None)
    assert loop.enable_compilation_cache(cfg, str(tmp_path)) == str(tmp_path / "compilation_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compilation_cache")
    cfg.train.compilation_cache = ""
    assert loop.enable_compilation_cache(cfg, str(tmp_path)) is None
  finally:
    jax.config.update("jax_compilation_cache_dir", given)
