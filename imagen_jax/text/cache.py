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
  embed_summary.json       imagen-embed's last run: counts and captions/s per device

A multi-process build (`build_cache(..., process_count=P)`) writes process p's shards as
shard-p0000p-00000... and lists them in manifest.part-0000p.json until process 0 merges
the parts into manifest.json at the end; readers see manifest.json only.

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
next run ignores; captions already in a listed shard (in manifest.json or a part) are
skipped. One build at a time per directory (its processes write disjoint files).
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
PART_PREFIX = "manifest.part-"  # one per process of a multi-process build, until merged
DEFAULT_SHARD_SIZE = 4096
_MAGIC = b"IJE1"
_HEADER = struct.Struct("<4sIII32s")  # magic, length, d_model, caption bytes, key
_KEY_BYTES = 32
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

def part_name(process_index: int) -> str:
  """The manifest part that process `process_index` of a multi-process build writes."""
  return f"{PART_PREFIX}{process_index:05d}.json"


def shard_prefix(process_index: int, process_count: int) -> str:
  """Shard file names of one writer: one process alone writes shard-00000..., process p
  of several shard-p0000p-00000..., so concurrent writers never share a name."""
  return "shard-" if process_count == 1 else f"shard-p{process_index:05d}-"


def process_share(key: str, process_count: int) -> int:
  """The process that embeds the caption with this key: a pure function of the key, so
  the shares are disjoint and every process finds its own share in one pass, without
  holding the other processes' captions."""
  return int(key[:16], 16) % process_count


def _next_shard_index(root: epath.Path, manifest: Mapping[str, Any], prefix: str) -> int:
  """One past every `prefix` shard listed or lying on disk: never reuse (overwrite) a
  file name."""
  pattern = re.compile(re.escape(prefix) + r"(\d{5,})\.(array_record|keys)$")
  listed = {entry["file"] for entry in manifest["shards"]}
  listed |= {entry["keys_file"] for entry in manifest["shards"]}
  used = [-1]
  for name in listed:
    match = pattern.match(name)
    if match:
      used.append(int(match.group(1)))
  for file in root.glob(prefix + "*"):
    match = pattern.match(file.name)
    if match:
      used.append(int(match.group(1)))
      if file.name not in listed:
        logging.warning("%s is not listed in the manifest (an interrupted run?); it is "
                        "ignored and its captions are encoded again", file)
  return max(used) + 1


def _write_shard(root: epath.Path, name: str, items: Sequence[tuple[str, str]], encoder,
                 on_batch) -> dict:
  """Encodes `items` (key, caption) into the new shard `name`; returns its manifest entry."""
  from array_record.python import array_record_module
  shard_name, keys_name = f"{name}.array_record", f"{name}.keys"
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


def _read_listings(root: epath.Path, identity: Mapping[str, Any]) -> dict[str, dict]:
  """{file name: manifest} of manifest.json and every process's part, each checked
  against the encoder's identity."""
  files = [root / MANIFEST] if (root / MANIFEST).exists() else []
  files += sorted(root.glob(PART_PREFIX + "*.json"))
  listings = {}
  for file in files:
    manifest = read_manifest(root) if file.name == MANIFEST else _read_part(file)
    compare_identity(manifest, identity, repr(os.fspath(root)))
    listings[file.name] = manifest
  return listings


def _read_part(file: epath.Path) -> dict:
  try:
    manifest = json.loads(file.read_text())
  except ValueError as e:
    raise UserError(f"{file} is not valid JSON ({e}); delete it and rerun imagen-embed to "
                    "re-encode the captions it listed") from e
  if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{file} is not a format {FORMAT_VERSION} manifest part; delete it and "
                    "rerun imagen-embed")
  return manifest


def _union(listings: Mapping[str, dict], identity: Mapping[str, Any]) -> dict:
  """One manifest listing every shard of `listings` once (manifest.json's first)."""
  names = sorted(listings, key=lambda name: (name != MANIFEST, name))
  union = dict(listings[MANIFEST]) if MANIFEST in listings else new_manifest(identity)
  union["shards"] = []
  files = set()
  for name in names:
    for entry in listings[name]["shards"]:
      if entry["file"] not in files:
        files.add(entry["file"])
        union["shards"].append(entry)
  union["num_captions"] = sum(entry["count"] for entry in union["shards"])
  return union


def merge_parts(path: str | os.PathLike, identity: Mapping[str, Any]) -> dict:
  """Lists the shards of every process's manifest part in manifest.json, then deletes the
  parts; returns the manifest. Rewrites nothing when there is no part and manifest.json
  exists. Only one process may call it, when no other writes."""
  root = epath.Path(path)
  listings = _read_listings(root, identity)
  manifest = _union(listings, identity)
  if set(listings) != {MANIFEST}:
    files.write_atomic(root / MANIFEST, json.dumps(manifest, indent=1).encode())
    for name in listings:
      if name != MANIFEST:
        (root / name).unlink()
  return manifest


def _known_keys(root: epath.Path, identity: Mapping[str, Any]) -> dict[bytes, Any]:
  """The keys of every shard listed in manifest.json or a part, after size checks."""
  listings = _read_listings(root, identity)
  if not listings:
    return {}
  existing = EmbeddingCache(root, _union(listings, identity))
  for shard in existing._shards:  # a truncated shard would stay unnoticed otherwise
    if not shard.path.exists() or shard.path.stat().length != shard.entry["bytes"]:
      raise UserError(f"shard {os.fspath(shard.path)} listed in the manifest is missing "
                      "or truncated; restore it, or remove its entry from the manifest "
                      "and rerun")
  return existing._index  # noqa: SLF001  (same module)


def _share(captions: Iterable[str], known: Mapping[bytes, Any], process_index: int,
           process_count: int) -> tuple[int, int, dict[str, str]]:
  """(captions given, unique captions in this process's share, {key: caption} of those
  the cache lacks, in order of first appearance)."""
  given = 0
  seen: set[str] = set()
  todo: dict[str, str] = {}
  for caption in captions:
    given += 1
    key = caption_key(caption)
    if process_count > 1 and process_share(key, process_count) != process_index:
      continue
    seen.add(key)
    if key not in todo and bytes.fromhex(key) not in known:
      todo[key] = caption.strip()
  return given, len(seen), todo


def build_cache(path: str | os.PathLike, captions: Iterable[str], encoder, *,
                shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True,
                process_index: int = 0, process_count: int = 1, barrier=None) -> dict:
  """Adds the embeddings of `captions` that the cache lacks; resumable.

  `encoder` is a `TextEncoder` (`encode_with_info`, `identity`, `batch_size`). Captions
  are trimmed of surrounding whitespace and de-duplicated by `caption_key`.

  Several processes (`process_count` > 1) each pass every caption and embed their share
  (`process_share`), writing their own shards and manifest part; then `barrier(name)`
  (every process must call build_cache), process 0 merges the parts into manifest.json
  (`merge_parts`), and a second barrier returns once the cache is whole. A process killed
  mid-run leaves its finished shards listed in its part; a rerun, with any process count,
  skips them.

  Returns counts for this process: `captions` (given), `unique` (in its share),
  `existing` (already cached), `new` (added), `shards` (written now), `truncated` (new
  captions cut to max_length), `seconds`.
  """
  if shard_size < 1:
    raise UserError(f"shard_size={shard_size} must be positive")
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index={process_index} must be in 0 ... {process_count - 1}")
  if process_count > 1 and barrier is None:
    raise ValueError("a multi-process build needs a barrier")
  root = epath.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  identity = encoder.identity
  known = _known_keys(root, identity)
  given, unique, todo = _share(captions, known, process_index, process_count)
  if given == 0:
    raise UserError("no captions to embed: the caption list is empty")
  if process_count == 1:  # lists leftovers of a killed multi-process run, fixes the encoder
    listing, manifest = MANIFEST, merge_parts(root, identity)
  else:
    if process_index == 0 and not (root / MANIFEST).exists():
      files.write_atomic(root / MANIFEST, json.dumps(new_manifest(identity), indent=1).encode())
    listing = part_name(process_index)
    manifest = (_read_part(root / listing) if (root / listing).exists()
                else new_manifest(identity))
  items = list(todo.items())
  stats = {"captions": given, "unique": unique, "existing": unique - len(items),
           "new": len(items), "shards": 0, "truncated": 0, "seconds": 0.0}
  start_time = time.perf_counter()
  bar = None
  if progress and items and process_index == 0:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(items), unit="caption", desc="embedding", smoothing=0.1)
  prefix = shard_prefix(process_index, process_count)
  try:
    index = _next_shard_index(root, manifest, prefix)
    for start in range(0, len(items), shard_size):
      entry = _write_shard(root, f"{prefix}{index:05d}", items[start:start + shard_size],
                           encoder, bar.update if bar else (lambda n: None))
      manifest["shards"].append(entry)
      manifest["num_captions"] += entry["count"]
      files.write_atomic(root / listing, json.dumps(manifest, indent=1).encode())
      stats["shards"] += 1
      stats["truncated"] += entry["truncated"]
      index += 1
  finally:
    if bar is not None:
      bar.close()
  stats["seconds"] = time.perf_counter() - start_time
  if process_count > 1:
    barrier("embedding_cache_written")
    if process_index == 0:
      merge_parts(root, identity)
    barrier("embedding_cache_merged")
  return stats
