"""Test setup: 8 simulated CPU devices, and where the shared reference data lives."""

import os

# Before JAX is imported anywhere: every test session sees 8 CPU devices, so sharding tests run
# the same way whether pytest is started by CI (which also sets this) or by hand.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


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
