"""Test set-up: eight CPU devices so sharding tests run on a 2x2x2 mesh.

XLA reads the flag once, when jax first initialises its backends, so it must be set
before anything imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real data beside the project (../shared/data); never copied into git."""
  if not SHARED_DATA.exists():
    pytest.fail(f"shared data not found at {SHARED_DATA}")
  return SHARED_DATA
