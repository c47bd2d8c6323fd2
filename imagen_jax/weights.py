"""Readers for weight files written by other projects (Hugging Face, PyTorch).

Every network loaded from another project's files (T5, CLIP, the FID InceptionV3) reads
them through this module, so each format is parsed in one place:

- `weight_files(dir)`: the Hugging Face layout, `model.safetensors` or shards listed in
  `model.safetensors.index.json`; returns key -> file name.
- `read_tensors(file, keys)`: those keys of one safetensors file as numpy arrays.
- `read_hf_weights(dir, keys)`: the two together, reading each shard once.
- `read_json(file, what)`: a JSON file, or a `UserError` naming the file.

Paths go through `etils.epath`, so `gs://` works; a remote file is read whole.
"""

from __future__ import annotations

import json
import os
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
