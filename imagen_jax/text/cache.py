"""The embedding cache: T5 embeddings of every caption, computed once by `imagen-embed`.

Imagen keeps the text encoder frozen (Saharia et al. 2022, §2.1), so each caption's
embedding is computed once and read back during training.

Layout of a cache directory:

  manifest.json            format_version, encoder identity, d_model, max_length,
                           num_captions, and the shard list (file names, caption counts,
                           byte sizes, sha256 of each file)
  shard-00000.array_record ArrayRecord: one record per caption (random access)
  shard-00000.keys         the records' keys, in record order: 32-byte sha256 digests
  config.gin               imagen-embed's operative config (the encoder it used)

A record is a fixed header and raw bytes, no pickle:

  magic b"IJE1" | uint32 length | uint32 d_model | uint32 caption bytes  (little-endian)
  | 32-byte key | caption (UTF-8) | bfloat16 [length, d_model] (little-endian)

Only the caption's real tokens are stored (`length` = the mask's count, EOS included).
The key is the sha256 of the caption with surrounding whitespace trimmed (T5 is
case-sensitive, so nothing else is normalised); a caption that repeats is stored once.

Lookup is O(1): opening the cache reads the small `.keys` files into a dict key ->
(shard, record); shard readers open on first use.

Writing is resumable and never touches what exists. Each shard is written under a
temporary name and renamed when complete, then the manifest is rewritten atomically (temp
file + rename) to list it. A killed run leaves at most an unlisted temp file, which the
next run ignores; captions already in a listed shard are skipped. Only one writer at a time
per directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from imagen_jax import files
from imagen_jax.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_SIZE = 4096
_MAGIC = b"IJE1"
_HEADER = struct.Struct("<4sIII32s")  # magic, length, d_model, caption bytes, key
_KEY_BYTES = 32
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.(array_record|keys)$")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
assert sys.byteorder == "little", "the cache format stores little-endian bfloat16"
# Identity fields that must match for cached embeddings to equal the encoder's output.
_IDENTITY_FIELDS = ("d_model", "weights_sha256", "vocab_sha256", "max_length")


def caption_key(caption: str) -> str:
  """sha256 (hex) of the caption with surrounding whitespace trimmed; case is kept."""
  if not isinstance(caption, str):
    raise UserError(f"a caption must be a string, got {type(caption).__name__}: "
                    f"{caption!r}")
  return hashlib.sha256(caption.strip().encode("utf-8")).hexdigest()


def _add_command(path) -> str:
  return (f"imagen-embed --gin_file={os.fspath(path)}/config.gin "
          f"--gin.CACHE_DIR=\"'{os.fspath(path)}'\" --captions=FILE (FILE lists the "
          "captions, one per line), or with --gin.DATASET=... naming their dataset")


def encode_record(key: str, caption: str, embedding: np.ndarray) -> bytes:
  """One record: header, key, caption text, bfloat16 [length, d_model] bytes."""
  length, d_model = embedding.shape
  text = caption.encode("utf-8")
  header = _HEADER.pack(_MAGIC, length, d_model, len(text), bytes.fromhex(key))
  return header + text + np.ascontiguousarray(embedding, BFLOAT16).tobytes()


def decode_record(record: bytes, where: str) -> tuple[str, str, np.ndarray]:
  """-> (key hex, caption, bfloat16 [length, d_model]); UserError if malformed."""
  if len(record) < _HEADER.size:
    raise UserError(f"{where}: record of {len(record)} bytes is shorter than its header; "
                    "the shard is corrupt")
  magic, length, d_model, text_len, key = _HEADER.unpack_from(record)
  expected = _HEADER.size + text_len + 2 * length * d_model
  if magic != _MAGIC or len(record) != expected:
    raise UserError(f"{where}: malformed record (magic {magic!r}, {len(record)} bytes, "
                    f"header implies {expected}); the shard is corrupt")
  start = _HEADER.size
  caption = record[start:start + text_len].decode("utf-8")
  emb = np.frombuffer(record, BFLOAT16, length * d_model, start + text_len)
  return key.hex(), caption, emb.reshape(length, d_model)


def _sha256_file(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def new_manifest(identity: Mapping[str, Any]) -> dict:
  return {"format_version": FORMAT_VERSION, "encoder": dict(identity),
          "d_model": int(identity["d_model"]), "max_length": int(identity["max_length"]),
          "num_captions": 0, "shards": []}


def read_manifest(path: str | os.PathLike) -> dict:
  path = epath.Path(path)
  file = path / MANIFEST
  if not file.exists():
    raise UserError(f"{os.fspath(path)!r} is not an embedding cache (no {MANIFEST}); make "
                    f"one with imagen-embed --gin_file=runs/embed.gin "
                    f"--gin.CACHE_DIR=\"'{os.fspath(path)}'\" --gin.DATASET=...")
  try:
    manifest = json.loads(file.read_text())
  except ValueError as e:
    raise UserError(f"{file} is not valid JSON ({e}); the cache manifest is corrupt") from e
  version = manifest.get("format_version") if isinstance(manifest, dict) else None
  if version != FORMAT_VERSION:
    raise UserError(f"{file} has format_version {version!r}; this version of imagen-jax "
                    f"reads format {FORMAT_VERSION}. Re-create the cache with imagen-embed")
  return manifest


def compare_identity(manifest: Mapping[str, Any], identity: Mapping[str, Any],
                     where: str) -> None:
  """UserError unless `identity` (a TextEncoder's) made the cache of this manifest."""
  cached = dict(manifest["encoder"])
  if int(manifest["d_model"]) != int(identity["d_model"]):
    raise UserError(
        f"embedding cache {where} holds d_model={manifest['d_model']} embeddings (encoder "
        f"{cached.get('name')!r}) but the configured text encoder "
        f"{identity.get('name')!r} has d_model={identity['d_model']}; configure the "
        "encoder the cache was made with, or embed into a new CACHE_DIR")
  diffs = [f for f in _IDENTITY_FIELDS if str(cached.get(f)) != str(identity.get(f))]
  if diffs:
    detail = "; ".join(f"{f}: cache {str(cached.get(f))[:16]} vs configured "
                       f"{str(identity.get(f))[:16]}" for f in diffs)
    raise UserError(
        f"embedding cache {where} was made by text encoder {cached.get('name')!r}, which "
        f"differs from the configured {identity.get('name')!r} ({detail}); configure the "
        "encoder the cache was made with (its config.gin), or embed into a new CACHE_DIR")


class _Shard:
  """One listed shard; its ArrayRecord reader opens on first use (thread-safe)."""

  def __init__(self, root: epath.Path, entry: Mapping[str, Any], verify: bool):
    self.path = root / entry["file"]
    self.entry = entry
    self.verify = verify
    self._reader = None
    self._lock = threading.Lock()

  def _open(self):
    size = self.path.stat().length if self.path.exists() else None
    if size != self.entry["bytes"]:
      raise UserError(f"shard {os.fspath(self.path)} is corrupt or truncated: "
                      f"{size} bytes on disk, the manifest says {self.entry['bytes']}. "
                      "Restore it, or remove its entry from manifest.json and rerun "
                      "imagen-embed to re-encode its captions")
    if self.verify and _sha256_file(self.path) != self.entry["sha256"]:
      raise UserError(f"shard {os.fspath(self.path)} is corrupt: its sha256 differs from "
                      "the manifest's. Restore it, or remove its entry from manifest.json "
                      "and rerun imagen-embed to re-encode its captions")
    from array_record.python import array_record_module
    try:
      reader = array_record_module.ArrayRecordReader(os.fspath(self.path),
                                                     "readahead_buffer_size:0")
    except RuntimeError as e:
      raise UserError(f"shard {os.fspath(self.path)} cannot be opened: {e}") from e
    if reader.num_records() != self.entry["count"]:
      raise UserError(f"shard {os.fspath(self.path)} has {reader.num_records()} records; "
                      f"the manifest says {self.entry['count']}; the shard is corrupt")
    return reader

  def read(self, indices: list[int]) -> list[bytes]:
    with self._lock:
      if self._reader is None:
        self._reader = self._open()
      try:
        return self._reader.read(indices)
      except RuntimeError as e:  # riegeli's chunk hashes catch flipped bits
        raise UserError(f"shard {os.fspath(self.path)} is corrupt: {e}. Restore it, or "
                        "remove its entry from manifest.json and rerun imagen-embed") from e

  def close(self):
    with self._lock:
      if self._reader is not None:
        self._reader.close()
        self._reader = None


def _read_keys(root: epath.Path, entry: Mapping[str, Any]) -> bytes:
  file = root / entry["keys_file"]
  if not file.exists():
    raise UserError(f"key index {os.fspath(file)} listed in the manifest is missing; "
                    "restore it, or remove its shard's entry from manifest.json and rerun "
                    "imagen-embed")
  data = file.read_bytes()
  if (len(data) != _KEY_BYTES * entry["count"]
      or hashlib.sha256(data).hexdigest() != entry["keys_sha256"]):
    raise UserError(f"key index {os.fspath(file)} is corrupt (size or sha256 differs from "
                    "the manifest); restore it, or remove its shard's entry from "
                    "manifest.json and rerun imagen-embed")
  return data


class EmbeddingCache:
  """Read access to a cache directory: O(1) lookup of a caption's embedding."""

  def __init__(self, path: str | os.PathLike, manifest: dict, *, verify: bool = False):
    self.path = epath.Path(path)
    self.manifest = manifest
    self.d_model = int(manifest["d_model"])
    self.max_length = int(manifest["max_length"])
    self._shards = [_Shard(self.path, entry, verify) for entry in manifest["shards"]]
    self._index: dict[bytes, tuple[int, int]] = {}
    for s, entry in enumerate(manifest["shards"]):
      keys = _read_keys(self.path, entry)
      for r in range(entry["count"]):
        self._index.setdefault(keys[r * _KEY_BYTES:(r + 1) * _KEY_BYTES], (s, r))

  @classmethod
  def open(cls, path: str | os.PathLike, *, verify: bool = False) -> "EmbeddingCache":
    """Opens a cache. `verify` also checks each shard's sha256 when it is first read
    (a full read of the shard); sizes and record counts are always checked."""
    return cls(path, read_manifest(path), verify=verify)

  def __len__(self) -> int:
    return len(self._index)

  def __contains__(self, caption: str) -> bool:
    return bytes.fromhex(caption_key(caption)) in self._index

  def keys(self) -> set[str]:
    return {k.hex() for k in self._index}

  def check_compatible(self, identity: Mapping[str, Any]) -> None:
    """UserError unless the encoder with this identity made the cache."""
    compare_identity(self.manifest, identity, repr(os.fspath(self.path)))

  def _missing(self, captions: Sequence[str]) -> UserError:
    return UserError(
        f"{len(captions)} caption(s) missing from the embedding cache "
        f"{os.fspath(self.path)!r}, e.g. {captions[0]!r}; add them with: "
        + _add_command(self.path))

  def _read(self, captions: Sequence[str]) -> list[np.ndarray]:
    where = {}
    missing = []
    for i, caption in enumerate(captions):
      loc = self._index.get(bytes.fromhex(caption_key(caption)))
      if loc is None:
        missing.append(caption)
      else:
        where.setdefault(loc[0], []).append((i, loc[1]))
    if missing:
      raise self._missing(missing)
    out: list[Any] = [None] * len(captions)
    for s, wanted in where.items():
      records = self._shards[s].read([r for _, r in wanted])
      for (i, r), record in zip(wanted, records):
        key, _, emb = decode_record(record, f"{os.fspath(self._shards[s].path)}[{r}]")
        if key != caption_key(captions[i]) or emb.shape[1] != self.d_model:
          raise UserError(f"{os.fspath(self._shards[s].path)}[{r}] holds key {key[:12]} "
                          f"with d_model {emb.shape[1]}; the key index says "
                          f"{caption_key(captions[i])[:12]} and d_model {self.d_model}. "
                          "The shard or its .keys file is corrupt")
        out[i] = emb
    return out

  def lookup(self, caption: str) -> np.ndarray:
    """bfloat16 [length, d_model]: the caption's embedding at its real tokens."""
    return self._read([caption])[0]

  def get_batch(self, captions: Sequence[str], max_length: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(emb bfloat16 [N, max_length, d_model], zero-padded; mask bool [N, max_length])."""
    embs = self._read(list(captions))
    emb = np.zeros((len(embs), max_length, self.d_model), BFLOAT16)
    mask = np.zeros((len(embs), max_length), bool)
    for i, e in enumerate(embs):
      if e.shape[0] > max_length:
        raise UserError(f"caption {captions[i]!r} has {e.shape[0]} cached tokens, more "
                        f"than max_length={max_length}; the cache was built with "
                        f"max_length={self.max_length}, so use that")
      emb[i, :e.shape[0]] = e
      mask[i, :e.shape[0]] = True
    return emb, mask

  def verify(self) -> None:
    """Checks every shard's size and sha256 against the manifest (reads all shards)."""
    for shard in self._shards:
      if not shard.path.exists() or shard.path.stat().length != shard.entry["bytes"]:
        raise UserError(f"shard {os.fspath(shard.path)} is missing or truncated; restore "
                        "it, or remove its entry from manifest.json and rerun imagen-embed")
      if _sha256_file(shard.path) != shard.entry["sha256"]:
        raise UserError(f"shard {os.fspath(shard.path)} is corrupt (sha256 differs from the "
                        "manifest); restore it, or remove its entry from manifest.json and "
                        "rerun imagen-embed")

  def close(self) -> None:
    for shard in self._shards:
      shard.close()


# --- writing -----------------------------------------------------------------------------

def _shard_names(index: int) -> tuple[str, str]:
  return f"shard-{index:05d}.array_record", f"shard-{index:05d}.keys"


def _next_shard_index(root: epath.Path, manifest: Mapping[str, Any]) -> int:
  """One past every shard listed or lying on disk: never reuse (overwrite) a file name."""
  used = [-1]
  for entry in manifest["shards"]:
    match = _SHARD_RE.match(entry["file"])
    if match:
      used.append(int(match.group(1)))
  listed = {entry["file"] for entry in manifest["shards"]}
  listed |= {entry["keys_file"] for entry in manifest["shards"]}
  for file in root.glob("shard-*"):
    match = _SHARD_RE.match(file.name)
    if match:
      used.append(int(match.group(1)))
      if file.name not in listed:
        logging.warning("%s is not listed in the manifest (an interrupted run?); it is "
                        "ignored and its captions are encoded again", file)
  return max(used) + 1


def _write_shard(root: epath.Path, index: int, items: Sequence[tuple[str, str]], encoder,
                 on_batch) -> dict:
  """Encodes `items` (key, caption) into one new shard; returns its manifest entry."""
  from array_record.python import array_record_module
  shard_name, keys_name = _shard_names(index)
  tmp = root / (shard_name + ".tmp")
  writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
  truncated = 0
  try:
    for start in range(0, len(items), encoder.batch_size):
      batch = items[start:start + encoder.batch_size]
      emb, mask, cut = encoder.encode_with_info([caption for _, caption in batch])
      truncated += len(cut)
      lengths = mask.sum(axis=1)
      for (key, caption), e, n in zip(batch, emb, lengths):
        writer.write(encode_record(key, caption, e[:n]))
      on_batch(len(batch))
  finally:
    writer.close()
  keys = b"".join(bytes.fromhex(key) for key, _ in items)
  files.write_atomic(root / keys_name, keys)
  entry = {"file": shard_name, "keys_file": keys_name, "count": len(items),
           "bytes": tmp.stat().length, "sha256": _sha256_file(tmp),
           "keys_sha256": hashlib.sha256(keys).hexdigest(), "truncated": truncated}
  tmp.replace(root / shard_name)
  return entry


def build_cache(path: str | os.PathLike, captions: Iterable[str], encoder, *,
                shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict:
  """Adds the embeddings of `captions` that the cache lacks; resumable.

  `encoder` is a `TextEncoder` (`encode_with_info`, `identity`, `batch_size`). Captions
  are trimmed of surrounding whitespace and de-duplicated by `caption_key`. Returns counts:
  `captions` (given), `unique`, `existing` (already cached), `new` (added), `shards`
  (written now), `truncated` (new captions cut to max_length), `seconds`.
  """
  if shard_size < 1:
    raise UserError(f"shard_size={shard_size} must be positive")
  root = epath.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  identity = encoder.identity
  if (root / MANIFEST).exists():
    manifest = read_manifest(root)
    compare_identity(manifest, identity, repr(os.fspath(root)))
    existing = EmbeddingCache(root, manifest)
    known = existing._index  # noqa: SLF001  (same module)
    for shard in existing._shards:  # a truncated shard would stay unnoticed otherwise
      if not shard.path.exists() or shard.path.stat().length != shard.entry["bytes"]:
        raise UserError(f"shard {os.fspath(shard.path)} listed in the manifest is missing "
                        "or truncated; restore it, or remove its entry from manifest.json "
                        "and rerun")
  else:
    manifest = None
    known = {}
  given = 0
  seen: set[str] = set()
  todo: dict[str, str] = {}
  for caption in captions:
    given += 1
    key = caption_key(caption)
    seen.add(key)
    if key not in todo and bytes.fromhex(key) not in known:
      todo[key] = caption.strip()
  if given == 0:
    raise UserError("no captions to embed: the caption list is empty")
  if manifest is None:  # a new cache: its manifest fixes the encoder before any shard
    manifest = new_manifest(identity)
    files.write_atomic(root / MANIFEST, json.dumps(manifest, indent=1))
  items = list(todo.items())
  stats = {"captions": given, "unique": len(seen), "existing": len(seen) - len(items),
           "new": len(items), "shards": 0, "truncated": 0, "seconds": 0.0}
  start_time = time.perf_counter()
  bar = None
  if progress and items:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(items), unit="caption", desc="embedding", smoothing=0.1)
  try:
    index = _next_shard_index(root, manifest)
    for start in range(0, len(items), shard_size):
      entry = _write_shard(root, index, items[start:start + shard_size], encoder,
                           bar.update if bar else (lambda n: None))
      manifest["shards"].append(entry)
      manifest["num_captions"] += entry["count"]
      files.write_atomic(root / MANIFEST, json.dumps(manifest, indent=1))
      stats["shards"] += 1
      stats["truncated"] += entry["truncated"]
      index += 1
  finally:
    if bar is not None:
      bar.close()
  stats["seconds"] = time.perf_counter() - start_time
  return stats
