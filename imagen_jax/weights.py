"""Readers for weight files written by other projects (Hugging Face, PyTorch).

Every network loaded from another project's files (T5, CLIP, the FID InceptionV3) reads
them through this module, so each format is parsed in one place:

- `weight_files(dir)`: the Hugging Face layout, `model.safetensors` or shards listed in
  `model.safetensors.index.json`; returns key -> file name.
- `read_tensors(file, keys)`: those keys of one safetensors file as numpy arrays.
- `read_hf_weights(dir, keys)`: the two together, reading each shard once.
- `read_json(file, what)`: a JSON file, or a `UserError` naming the file.
- `read_torch_state_dict(file)`: a `torch.save`d state dict (zip or legacy format) as
  numpy arrays, without torch and without running pickled code.
- `read_state_dict(file)`: that, or a safetensors file with the same keys (by content).

Paths go through `etils.epath`, so `gs://` works; a remote file is read whole.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import zipfile
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np
from etils import epath

from imagen_jax.errors import UserError


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def read_json(file: str | os.PathLike, what: str) -> Any:
  """Parses `file`; `what` names it in the error ("a CLIP config", ...)."""
  file = epath.Path(file)
  if not file.exists():
    raise UserError(f"{os.fspath(file)} is missing; expected {what} there")
  try:
    return json.loads(file.read_text())
  except ValueError as e:
    raise UserError(f"{os.fspath(file)} is not valid JSON ({what}): {e}") from e


def safetensors_keys(file: epath.Path) -> list[str]:
  try:
    if _is_local(file):
      from safetensors import safe_open
      with safe_open(os.fspath(file), framework="np") as f:
        return list(f.keys())
    import safetensors.numpy
    return list(safetensors.numpy.load(file.read_bytes()).keys())
  except Exception as e:  # safetensors raises its own SafetensorError on a bad header
    raise UserError(f"{os.fspath(file)} is not a readable safetensors file: {e}") from e


def weight_files(path: str | os.PathLike) -> dict[str, str]:
  """HF key -> file name, for single-file or sharded (index.json) safetensors in `path`."""
  path = epath.Path(path)
  index = path / "model.safetensors.index.json"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
      raise UserError(f"{index} is not a valid safetensors index (needs a 'weight_map'): "
                      f"{e}") from e
    return dict(weight_map)
  single = path / "model.safetensors"
  if single.exists():
    return {key: "model.safetensors" for key in safetensors_keys(single)}
  found = sorted(p.name for p in path.iterdir())
  hint = ""
  if any(name.endswith(".bin") for name in found):
    hint = (" (PyTorch .bin weights are not read here: convert once with "
            "`Model.from_pretrained(DIR).save_pretrained(OUT)` in transformers, which "
            "writes safetensors)")
  raise UserError(f"no model.safetensors or model.safetensors.index.json in {path}; "
                  f"found {found}{hint}")


def read_tensors(file: str | os.PathLike, keys: Iterable[str]) -> dict[str, np.ndarray]:
  """Reads only `keys` from a local safetensors file; a remote (gs://) file is read whole."""
  file = epath.Path(file)
  keys = list(keys)
  if not file.exists():
    raise UserError(f"safetensors file {file} does not exist")
  try:
    if _is_local(file):
      from safetensors import safe_open
      with safe_open(os.fspath(file), framework="np") as f:
        return {k: f.get_tensor(k) for k in keys}
    import safetensors.numpy
    tensors = safetensors.numpy.load(file.read_bytes())
    return {k: tensors[k] for k in keys}
  except (OSError, KeyError) as e:
    raise UserError(f"cannot read {keys[:3]}... from {file}: {e}") from e
  except Exception as e:  # safetensors raises its own SafetensorError on a bad header
    raise UserError(f"{file} is not a readable safetensors file: {e}") from e


def read_hf_weights(path: str | os.PathLike, keys: Iterable[str],
                    files: dict[str, str] | None = None) -> dict[str, np.ndarray]:
  """Key -> array for `keys` of the HF checkpoint in `path` (each shard opened once).

  `files` is `weight_files(path)` when the caller already has it. A key that is in no file
  is a `UserError` naming the first one missing.
  """
  path = epath.Path(path)
  files = weight_files(path) if files is None else files
  keys = sorted(set(keys))
  missing = [k for k in keys if k not in files]
  if missing:
    raise UserError(f"checkpoint {os.fspath(path)} lacks {len(missing)} tensor(s), first "
                    f"{missing[0]!r}")
  by_file: dict[str, list[str]] = {}
  for key in keys:
    by_file.setdefault(files[key], []).append(key)
  out: dict[str, np.ndarray] = {}
  for name, names in sorted(by_file.items()):
    out.update(read_tensors(path / name, names))
  return out


# ---------------------------------------------------------------------------------------
# PyTorch state dicts (`torch.save`), read without torch and without running pickled code.
#
# torch.save writes either a zip archive (torch >= 1.6: `<name>/data.pkl` plus one file
# `<name>/data/<key>` per storage) or the legacy stream (pickled magic number, protocol
# version and sys info, the pickled object, the pickled list of storage keys, then each
# storage as an int64 element count followed by its raw bytes). In both, the object's
# pickle names storages through `persistent_load` and rebuilds tensors with
# `torch._utils._rebuild_tensor_v2`. The unpickler below allows only those names, as
# torch's own `weights_only=True` loading does, so a file cannot make us run anything.

_TORCH_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """What `torch.FloatStorage` etc. stand for while unpickling: a numpy dtype."""

  def __init__(self, name: str):
    dtype = _TORCH_STORAGE_DTYPES[name]
    if dtype == "bfloat16":
      import ml_dtypes  # ships with jax
      dtype = ml_dtypes.bfloat16
    self.dtype = np.dtype(dtype)


class _Storage:
  """A storage named in the pickle; `data` (flat numpy) is filled in once read."""

  def __init__(self, dtype: np.dtype, key: str, numel: int):
    self.dtype, self.key, self.numel = dtype, key, numel
    self.data: np.ndarray | None = None


class _TensorRef:
  """A tensor waiting for its storage's bytes: (storage, offset, size, stride)."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  def to_numpy(self, file: str) -> np.ndarray:
    flat = self.storage.data
    if flat is None:
      raise UserError(f"{file} lacks the bytes of storage {self.storage.key}; the file is "
                      "incomplete")
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if 0 not in self.size and (self.offset < 0 or last >= flat.size):
      raise UserError(f"{file} is corrupt: a tensor of shape {self.size} reaches element "
                      f"{last} of a storage of {flat.size}")
    if 0 in self.size:
      return np.zeros(self.size, flat.dtype)
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=[s * flat.itemsize for s in self.stride])
    return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  return data


_TORCH_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _TensorUnpickler(pickle.Unpickler):
  """Rebuilds tensors and dicts; refuses every other global, so nothing else runs."""

  def __init__(self, stream, file: str):
    super().__init__(stream)
    self.file = file
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _TORCH_ALLOWED:
      return _TORCH_ALLOWED[(module, name)]
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return _StorageType(name)
    raise UserError(f"{self.file} asks for {module}.{name}; only tensors are read from "
                    "PyTorch files (nothing in them is run), so give a plain state dict")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise UserError(f"{self.file} names a storage {str(pid)[:80]} that is not a tensor "
                      "storage; only tensors are read from PyTorch files")
    _, storage_type, key, _location, numel = pid[:5]
    if len(pid) > 5 and pid[5] is not None:
      raise UserError(f"{self.file} uses storage views (torch < 1.0); load and save it "
                      "again with a current torch")
    key = str(key)
    if key not in self.storages:
      self.storages[key] = _Storage(storage_type.dtype, key, int(numel))
    return self.storages[key]


def _collect_tensors(obj: Any, file: str, prefix: str = "") -> dict[str, np.ndarray]:
  """Flattens the unpickled object (a state dict, possibly nested) into key -> array."""
  if isinstance(obj, _TensorRef):
    return {prefix: obj.to_numpy(file)}
  if isinstance(obj, dict):
    out = {}
    for key, value in obj.items():
      out.update(_collect_tensors(value, file, f"{prefix}.{key}" if prefix else str(key)))
    return out
  raise UserError(f"{file} holds a {type(obj).__name__} at {prefix or 'the top'}; expected "
                  "a state dict of tensors")


def _storage_bytes(storage: _Storage, raw: bytes, file: str, byteorder: str) -> None:
  dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
  if len(raw) < storage.numel * dtype.itemsize:
    raise UserError(f"{file} is truncated: storage {storage.key} holds {len(raw)} bytes, "
                    f"needs {storage.numel * dtype.itemsize}")
  storage.data = np.frombuffer(raw, dtype, storage.numel).astype(storage.dtype)


def _read_torch_zip(data: bytes, file: str) -> dict[str, np.ndarray]:
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if not pickles:
      raise UserError(f"{file} is a zip archive without data.pkl; not a torch.save file")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    byteorder = "little"
    if f"{prefix}byteorder" in names:
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
    unpickler = _TensorUnpickler(io.BytesIO(archive.read(pickles[0])), file)
    obj = unpickler.load()
    for key, storage in unpickler.storages.items():
      name = f"{prefix}data/{key}"
      if name not in names:
        raise UserError(f"{file} lacks the storage {name}; the file is incomplete")
      _storage_bytes(storage, archive.read(name), file, byteorder)
  except (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError) as e:
    raise UserError(f"{file} is not a readable torch zip file (truncated?): {e}") from e
  return _collect_tensors(obj, file)


def _read_torch_legacy(data: bytes, file: str) -> dict[str, np.ndarray]:
  stream = io.BytesIO(data)
  try:
    # The header is three plain pickles of ints and a dict: the restricted unpickler
    # reads them too, so not even the header can name a global.
    magic = _TensorUnpickler(stream, file).load()
    if magic != _TORCH_LEGACY_MAGIC:
      raise UserError(f"{file} is neither a torch.save file nor safetensors (bad magic "
                      "number)")
    _TensorUnpickler(stream, file).load()  # protocol version
    sys_info = _TensorUnpickler(stream, file).load()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    unpickler = _TensorUnpickler(stream, file)
    obj = unpickler.load()
    keys = _TensorUnpickler(stream, file).load()
  except (EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"{file} is not a readable torch file (truncated?): {e}") from e
  for key in keys:
    storage = unpickler.storages.get(str(key))
    if storage is None:
      raise UserError(f"{file} lists a storage {key} that no tensor uses; the file is "
                      "corrupt")
    header = stream.read(8)
    if len(header) < 8:
      raise UserError(f"{file} is truncated before storage {key}")
    numel = int(np.frombuffer(header, "<i8" if little else ">i8")[0])
    storage.numel = numel
    raw = stream.read(numel * storage.dtype.itemsize)
    _storage_bytes(storage, raw, file, "little" if little else "big")
  return _collect_tensors(obj, file)


def read_torch_state_dict(file: str | os.PathLike) -> dict[str, np.ndarray]:
  """Key -> numpy array of a `torch.save`d state dict (zip or legacy format), no torch.

  Dtypes are kept (bfloat16 as `ml_dtypes.bfloat16`); strides and storage offsets are
  honoured, and tensors sharing a storage each get their own copy. A pickle that names
  anything but tensor rebuilding raises `UserError` before anything runs.
  """
  path = epath.Path(file)
  if not path.exists():
    raise UserError(f"weight file {os.fspath(path)} does not exist")
  data = path.read_bytes()
  if data.startswith(_TORCH_ZIP_MAGIC):
    return _read_torch_zip(data, os.fspath(path))
  return _read_torch_legacy(data, os.fspath(path))


def _is_safetensors(head: bytes) -> bool:
  """safetensors: an 8-byte little-endian header length, then a JSON header."""
  return len(head) > 8 and head[8:9] == b"{"


def read_state_dict(file: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a PyTorch `.pth`/`.pt` file (zip or legacy) or a safetensors file."""
  path = epath.Path(file)
  if not path.exists():
    raise UserError(f"weight file {os.fspath(path)} does not exist; pass the path of a "
                    "PyTorch state dict (.pth) or a safetensors file")
  with path.open("rb") as f:
    head = f.read(16)
  if not head:
    raise UserError(f"weight file {os.fspath(path)} is empty")
  if path.suffix == ".safetensors" or _is_safetensors(head):
    keys = safetensors_keys(path)
    return read_tensors(path, keys)
  return read_torch_state_dict(path)
