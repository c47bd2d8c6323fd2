"""Test set-up shared by every test.

8 simulated CPU devices, so sharded code paths run here as on a pod slice; this must happen
before jax is imported anywhere. The persistent compilation cache makes a program compiled
once (in any test, or any subprocess a test starts) load in about a second afterwards.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

# tf.data (used by seqio) must never grab an accelerator or print warnings here.
try:
  import tensorflow as tf  # noqa: E402
  tf.config.set_visible_devices([], "GPU")
except ImportError:  # pragma: no cover
  pass


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU")


@pytest.fixture(scope="session")
def devices():
  """All simulated devices; tests that need a given count slice this."""
  assert len(jax.devices()) >= 8, "tests expect 8 simulated CPU devices (see conftest.py)"
  return jax.devices()


@pytest.fixture(autouse=True)
def _clear_gin():
  """gin's registry is global: every test starts and ends with an empty config."""
  import gin
  gin.clear_config()
  yield
  gin.clear_config()
