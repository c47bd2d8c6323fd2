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


# ---------------------------------------------------------------------------------------
# Fixtures that several test files share (built once per session).


@pytest.fixture(scope="session")
def seqio_spm() -> pathlib.Path:
  """seqio's test sentencepiece model: T5's ids (pad 0, EOS 1, unk 2), 26 pieces."""
  import seqio
  return (pathlib.Path(seqio.__file__).parent / "test_data" / "sentencepiece" /
          "sentencepiece.model")


@pytest.fixture(scope="session")
def tiny_t5_config():
  """A T5 v1.1-style encoder small enough to compile in a second."""
  from imagen_jax.text import t5
  return t5.T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     feed_forward_proj="gated-gelu")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, tiny_t5_config, seqio_spm) -> pathlib.Path:
  """`tiny_t5_config` with random weights (seed 0) and `seqio_spm`, in the HF layout."""
  from imagen_jax.text import t5
  path = tmp_path_factory.mktemp("t5") / "tiny"
  t5.save_random_encoder(path, tiny_t5_config, seed=0, spiece_model=seqio_spm)
  return path


@pytest.fixture(scope="session")
def shapes_word_cache(tmp_path_factory) -> pathlib.Path:
  """An embedding cache of every shapes caption (both splits) from the test word encoder
  (test_train_lib.WordEncoder: d_model 16, max_length 12), for training runs."""
  import test_train_lib
  from imagen_jax.data import shapes
  from imagen_jax.text import cache as cache_lib
  path = tmp_path_factory.mktemp("word_cache")
  captions = shapes.all_captions("train") + shapes.all_captions("held_out")
  cache_lib.build_cache(path, captions, test_train_lib.WordEncoder(d_model=16, max_length=12),
                        progress=False)
  return path
