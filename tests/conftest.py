"""Test setup: 8 simulated CPU devices, and where the shared reference data lives."""

import os

# Before JAX is imported anywhere: every test session sees 8 CPU devices, so sharding tests run
# the same way whether pytest is started by CI (which also sets this) or by hand.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# One persistent compilation cache for the whole session, set before JAX is imported: the
# in-process tests and every subprocess (CLIs inherit the environment) reuse an executable that
# any of them compiled from the same program, instead of recompiling the same tiny configs in
# each of ~50 processes. A cache hit is the same executable, so results stay bit for bit those
# of a fresh compile. Everything is cached (not only compilations over 1 s), and the key does
# not depend on the cache's path (JAX would otherwise add a GPU autotune folder under it).
# A cache directory given by the caller is kept; ours is removed at the end of the session.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
COMPILATION_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="posebh_tests_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES", "none")


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # Not an xdist worker's exit.
    shutil.rmtree(COMPILATION_CACHE, ignore_errors=True)


# --- Tiny synthetic training runs (test_end_to_end, test_preemption, test_checkpoint_faults) -----


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
  """A folder where the tiny synthetic datasets are generated on first use (the same files for
  every test: the generator is seeded), shared by the whole session."""
  return str(tmp_path_factory.mktemp("synthetic_data"))


def tiny_config(data_root: str, **train):
  """`configs/synthetic.py:tiny` on `data_root`, data=8 mesh, the session's compilation cache,
  and `train.<key>=value` overrides."""
  from configs import synthetic
  cfg = synthetic.get_config("tiny")
  cfg.data.root = str(data_root)
  cfg.mesh.data = 8
  cfg.train.compilation_cache = COMPILATION_CACHE
  for k, v in train.items():
    cfg.train[k] = v
  return cfg


def tiny_train_args(workdir, data_root, *overrides: str, **train) -> list[str]:
  """argv of `posebh-train --config=configs/synthetic.py:tiny` (as `python -m`, run from REPO)
  like `tiny_config`: `overrides` are further `--config.x=y` flags, `train` sets
  `--config.train.<key>=value`."""
  return [sys.executable, "-m", "posebh_jax.main_train", "--config=configs/synthetic.py:tiny",
          f"--workdir={workdir}", f"--config.data.root={data_root}", "--config.mesh.data=8",
          f"--config.train.compilation_cache={COMPILATION_CACHE}",
          *[f"--config.train.{k}={v}" for k, v in train.items()], *overrides]


def cli_env() -> dict[str, str]:
  """The environment of a CLI subprocess: this one, with this checkout on PYTHONPATH."""
  return dict(os.environ, PYTHONPATH=str(REPO))


def shared_path(rel: str) -> pathlib.Path:
  """`../shared/<rel>` beside the repo; skips the calling test (saying so) where it is absent.

  The only place a test may skip: users' clones have no ../shared, CI always does.
  """
  path = SHARED / rel
  if not path.exists():
    pytest.skip(f"../shared not found: {path} is missing (golden/sample reference data)")
  return path


def load_golden(name: str) -> dict:
  """Arrays of `../shared/golden/<name>` (an .npz)."""
  import numpy as np
  with np.load(shared_path(f"golden/{name}")) as data:
    return {k: data[k] for k in data.files}


# Conv biases directly followed by a BatchNorm in the prototype head (posebh_jax/models/heads.py).
_ZERO_GRADIENT_BIASES = ("neck/conv1/bias", "neck/conv2/bias", "head_0/bias")


def assert_params_close(a, b, *, adam_steps: int, learning_rate: float, rtol: float,
                        atol: float = 1e-5) -> None:
  """Two parameter trees trained the same way (e.g. on other meshes) agree leaf by leaf.

  Except the conv biases that feed a BatchNorm: their true gradient is 0 (BN removes
  constants), so their gradient is float noise whose sign depends on the reduction order, and
  Adam turns it into ±lr steps. Those are only bounded, by 2·lr per step (tests/test_train_step.py
  explains the same for meshes).
  """
  import jax
  import numpy as np

  def flat(tree):
    return {"/".join(str(k.key) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys() and len(fa) > 10
  bound = 2 * adam_steps * learning_rate + 1e-6
  for k in fa:
    if k.endswith(_ZERO_GRADIENT_BIASES):
      assert np.all(np.abs(fa[k] - fb[k]) <= bound), k
    else:
      np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
  """`posebh-convert` output of ../shared/golden/tiny_posebh.pth, converted once per session."""
  from configs import posebh as posebh_configs
  from posebh_jax.convert.from_pth import convert_checkpoint
  out = tmp_path_factory.mktemp("tiny_reference") / "converted"
  convert_checkpoint(posebh_configs.get_config("tiny_reference"),
                     str(shared_path("golden/tiny_posebh.pth")), str(out))
  return str(out)


@pytest.fixture(scope="session")
def gcs_emulator():
  """fake-gcs-server on 127.0.0.1 (a free port) for the session; stopped at its end.

  Use `gcs_emulator.env` for the subprocesses under test and `gcs_bucket` for a fresh bucket.
  """
  from gcs_emulator import GcsEmulator
  emulator = GcsEmulator.start()
  try:
    yield emulator
  finally:
    emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
  """A new, empty bucket on the session's emulator (tests never see each other's objects)."""
  return gcs_emulator.create_bucket()
