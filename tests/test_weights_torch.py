"""The torch.save reader (imagen_jax.weights.read_state_dict), on files written without
torch by tests/torch_files.py; benchmarks/fid_parity.py checks files written by torch."""

import collections
import os
import pickle

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import torch_files
from imagen_jax import weights
from imagen_jax.errors import UserError

WRITERS = {"zip": torch_files.zip_bytes, "legacy": torch_files.legacy_bytes}


def _expected_and_state_dict():
  rng = np.random.default_rng(0)
  shared = rng.normal(size=20).astype(np.float32)
  matrix = rng.normal(size=(3, 5)).astype(np.float32)
  expected = {
      "conv.weight": rng.normal(size=(4, 3, 2, 2)).astype(np.float32),
      "half": rng.normal(size=(3,)).astype(np.float16),
      "brain": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
      "steps": np.array(7, np.int64),
      "mask": np.array([True, False, True]),
      "param": rng.normal(size=(2,)).astype(np.float64),
      # Views torch keeps as (storage, offset, stride): a transpose and two slices of
      # one storage.
      "transposed": matrix.T,
      "slice_a": shared[2:8].reshape(2, 3),
      "slice_b": shared[10:14],
  }
  sd = torch_files.state_dict({k: expected[k] for k in
                               ("conv.weight", "half", "brain", "steps", "mask")})
  sd["param"] = torch_files.Tensor.of(expected["param"], parameter=True)
  sd["transposed"] = torch_files.Tensor(matrix.reshape(-1), 0, (5, 3), (1, 5))
  sd["slice_a"] = torch_files.Tensor(shared, 2, (2, 3), (3, 1))
  sd["slice_b"] = torch_files.Tensor(shared, 10, (4,), (1,))
  return expected, sd


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_reads_dtypes_strides_and_offsets(tmp_path, fmt):
  expected, sd = _expected_and_state_dict()
  file = tmp_path / "w.pth"
  file.write_bytes(WRITERS[fmt](sd))
  got = weights.read_state_dict(file)
  assert sorted(got) == sorted(expected)
  for key, want in expected.items():
    assert got[key].dtype == want.dtype, key
    np.testing.assert_array_equal(got[key], want, err_msg=key)
  # Tensors that share a storage are independent copies.
  got["slice_a"][...] = 0
  assert got["slice_b"].any()


def test_safetensors_with_the_same_keys(tmp_path):
  arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.ones(3, np.float16)}
  file = tmp_path / "w.bin"  # detected by content, whatever the extension
  file.write_bytes(safetensors.numpy.save(arrays))
  got = weights.read_state_dict(file)
  for key, want in arrays.items():
    np.testing.assert_array_equal(got[key], want)


class _RunsACommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_a_pickle_asking_for_code_never_runs(tmp_path, fmt):
  marker = tmp_path / "ran"
  sd = torch_files.state_dict({"w": np.ones(2, np.float32)})
  sd["evil"] = _RunsACommand(marker)
  file = tmp_path / "evil.pth"
  file.write_bytes(WRITERS[fmt](sd))
  with pytest.raises(UserError, match=r"asks for (posix|os)\.system; only tensors"):
    weights.read_state_dict(file)
  assert not marker.exists()
  # The same pickle does run under plain pickle: the test would catch a reader that ran it.
  pickle.loads(pickle.dumps(_RunsACommand(marker)))
  assert marker.exists()


def test_non_tensor_contents_are_refused(tmp_path):
  file = tmp_path / "list.pth"
  file.write_bytes(torch_files.zip_bytes(collections.OrderedDict(w=[1, 2])))
  with pytest.raises(UserError, match="holds a list at w; expected a state dict"):
    weights.read_state_dict(file)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_truncated_and_missing_files(tmp_path, fmt):
  data = WRITERS[fmt](torch_files.state_dict({"w": np.ones((64, 64), np.float32)}))
  for cut in (len(data) // 2, len(data) - 100, 40):
    file = tmp_path / f"cut{cut}.pth"
    file.write_bytes(data[:cut])
    with pytest.raises(UserError, match="truncated|not a readable|incomplete") as e:
      weights.read_state_dict(file)
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="does not exist"):
    weights.read_state_dict(tmp_path / "nope.pth")
  (tmp_path / "empty.pth").write_bytes(b"")
  with pytest.raises(UserError, match="empty"):
    weights.read_state_dict(tmp_path / "empty.pth")
