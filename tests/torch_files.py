"""Writes files in torch.save's formats without torch, for tests of the torch reader.

The pickles name `torch._utils._rebuild_tensor_v2` and `torch.FloatStorage` etc. as
torch.save does. pickle can only name globals it can import, so stand-in `torch` modules
are put in sys.modules while a pickle is written, and removed afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class Tensor:
  """A view into a flat storage array: what torch pickles a tensor as."""

  def __init__(self, storage: np.ndarray, offset: int, shape, stride, parameter=False):
    self.storage, self.offset = storage, offset
    self.shape, self.stride, self.parameter = tuple(shape), tuple(stride), parameter

  @classmethod
  def of(cls, array: np.ndarray, parameter: bool = False) -> "Tensor":
    array = np.ascontiguousarray(array)
    stride = tuple(s // array.itemsize for s in array.strides) if array.ndim else ()
    return cls(array.reshape(-1), 0, array.shape, stride, parameter)

  def __reduce__(self):
    torch_utils = sys.modules["torch._utils"]
    tensor = (torch_utils._rebuild_tensor_v2,
              (_StorageRef(self.storage), self.offset, self.shape, self.stride, False,
               collections.OrderedDict()))
    if self.parameter:
      return (torch_utils._rebuild_parameter,
              (_Reduced(*tensor), True, collections.OrderedDict()))
    return tensor


class _Reduced:
  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


class _StorageRef:
  def __init__(self, array: np.ndarray):
    self.array = array


@contextlib.contextmanager
def _fake_torch():
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")
  for name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
    fn = lambda *a: None  # noqa: E731  (never called: only its name is pickled)
    fn.__module__, fn.__name__, fn.__qualname__ = "torch._utils", name, name
    setattr(utils, name, fn)
  for name in _STORAGE_NAMES.values():
    setattr(torch, name, type(name, (), {"__module__": "torch"}))
  torch._utils = utils
  sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
  try:
    yield torch
  finally:
    del sys.modules["torch"], sys.modules["torch._utils"]


def _pickle(obj, storages: dict) -> bytes:
  """The object's pickle; `storages` gets key -> flat array for every storage named."""
  buf = io.BytesIO()
  with _fake_torch() as torch:
    pickler = pickle.Pickler(buf, protocol=2)

    def persistent_id(x):
      if not isinstance(x, _StorageRef):
        return None
      key = next((k for k, a in storages.items() if a is x.array), str(len(storages)))
      storages[key] = x.array
      storage_type = getattr(torch, _STORAGE_NAMES[x.array.dtype])
      return ("storage", storage_type, key, "cpu", x.array.size)

    pickler.persistent_id = persistent_id
    pickler.dump(obj)
  return buf.getvalue()


def zip_bytes(obj) -> bytes:
  """torch.save's zip format (torch >= 1.6)."""
  storages: dict[str, np.ndarray] = {}
  data = _pickle(obj, storages)
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", data)
    z.writestr("archive/byteorder", "little")
    for key, array in storages.items():
      z.writestr(f"archive/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
    z.writestr("archive/version", "3\n")
  return buf.getvalue()


def legacy_bytes(obj) -> bytes:
  """torch.save's legacy format (`_use_new_zipfile_serialization=False`)."""
  storages: dict[str, np.ndarray] = {}
  buf = io.BytesIO()
  pickle.dump(LEGACY_MAGIC, buf, protocol=2)
  pickle.dump(1001, buf, protocol=2)
  pickle.dump({"protocol_version": 1001, "little_endian": True,
               "type_sizes": {"short": 2, "int": 4, "long": 4}}, buf, protocol=2)
  buf.write(_pickle(obj, storages))
  keys = sorted(storages)
  pickle.dump(keys, buf, protocol=2)
  for key in keys:
    buf.write(np.int64(storages[key].size).tobytes())
    buf.write(storages[key].tobytes())
  return buf.getvalue()


def state_dict(arrays: dict[str, np.ndarray]) -> collections.OrderedDict:
  return collections.OrderedDict((k, Tensor.of(v)) for k, v in arrays.items())
