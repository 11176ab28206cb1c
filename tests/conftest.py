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


@pytest.fixture
def shared_dir() -> pathlib.Path:
  """../shared beside the repo; tests that need it skip (with this message) where it is absent."""
  if not SHARED.is_dir():
    pytest.skip(f"../shared not found at {SHARED}: golden/sample data tests need it")
  return SHARED


def load_golden(name: str) -> dict:
  """Arrays of `../shared/golden/<name>` (an .npz); skips the calling test where it is absent."""
  import numpy as np
  path = SHARED / "golden" / name
  if not path.exists():
    pytest.skip(f"../shared not found: {path} is missing (golden reference data)")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}
