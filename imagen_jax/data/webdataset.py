"""`webdataset:PATTERN`: img2dataset tar shards, read by seek after a one-time index.

img2dataset's webdataset output is `00000.tar`, `00001.tar`, ..., each holding samples
`KEY.jpg` (or .png/.jpeg/.webp), `KEY.txt` (or `KEY.caption`) and `KEY.json`; a sample's
key is its member name up to the first dot of the file name (the webdataset convention).

Each shard is indexed once by walking its tar headers (no image is read): the offset and
size of every sample's image, and its caption. The index goes in a sidecar next to the
shard, `00000.tar.idx.json`, or, when the shard's folder cannot be written (a read-only
bucket), in `$IMAGEN_JAX_CACHE/tar_index/` (default `~/.cache/imagen_jax/tar_index/`),
named by a hash of the shard's path. An index whose recorded shard size differs from the
shard's is stale and rebuilt. After that, example i is one seek and one read: a pure
function of i, like every other source. Samples without an image or without a non-empty
caption are left out when indexing and counted (`skipped`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from typing import Any

import numpy as np
from etils import epath

from imagen_jax.data import sources
from imagen_jax.errors import UserError
from imagen_jax.files import write_atomic

log = logging.getLogger(__name__)

INDEX_FORMAT = "imagen_jax.tar_index/2"
_TAIL_BYTES = 16384  # tar pads to 10240-byte records: an append can keep the file size
INDEX_SUFFIX = ".idx.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "caption")  # first found wins


def cache_dir() -> epath.Path:
  """Where indexes of shards in read-only folders go: $IMAGEN_JAX_CACHE/tar_index."""
  return sources.cache_root() / "tar_index"


def index_paths(shard: epath.Path) -> list[epath.Path]:
  """The sidecar next to the shard, then the cache entry: where an index is looked for."""
  digest = hashlib.sha256(os.fspath(shard).encode("utf-8")).hexdigest()[:16]
  return [shard.parent / (shard.name + INDEX_SUFFIX),
          cache_dir() / f"{digest}-{shard.name}{INDEX_SUFFIX}"]


def _split_name(name: str) -> tuple[str, str]:
  folder, _, base = name.rpartition("/")
  stem, _, ext = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), ext.lower()


def fingerprint(shard: epath.Path) -> dict[str, Any]:
  """What identifies a shard's content cheaply: size, mtime, sha256 of its last bytes."""
  stat = shard.stat()
  with shard.open("rb") as f:
    f.seek(max(0, stat.length - _TAIL_BYTES))
    tail = hashlib.sha256(f.read()).hexdigest()
  return {"size": stat.length, "mtime": stat.mtime, "tail_sha256": tail}


def build_index(shard: epath.Path) -> dict[str, Any]:
  """Walks the tar headers of `shard`: image offset/size and caption of every full sample."""
  samples: dict[str, dict] = {}
  try:
    with shard.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for member in tar:
        if not member.isfile():
          continue
        key, ext = _split_name(member.name)
        sample = samples.setdefault(key, {})
        if ext in IMAGE_EXTENSIONS and "image" not in sample:
          sample["image"] = (member.offset_data, member.size)
        elif ext in CAPTION_EXTENSIONS:
          sample[ext] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise UserError(f"cannot read tar shard {os.fspath(shard)}: {e}; re-download it or "
                    "leave it out of the pattern") from e
  index = {"format": INDEX_FORMAT, "shard": fingerprint(shard), "keys": [],
           "image_offsets": [], "image_sizes": [], "captions": [],
           "skipped": {"no_image": 0, "no_caption": 0}}
  for key, sample in samples.items():  # tar order
    caption = next((sample[e] for e in CAPTION_EXTENSIONS if sample.get(e)), "")
    if "image" not in sample:
      index["skipped"]["no_image"] += 1
    elif not caption:
      index["skipped"]["no_caption"] += 1
    else:
      index["keys"].append(key)
      index["image_offsets"].append(sample["image"][0])
      index["image_sizes"].append(sample["image"][1])
      index["captions"].append(caption)
  return index


def _read_index(path: epath.Path, shard: dict) -> dict | None:
  try:
    index = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  if index.get("format") != INDEX_FORMAT or index.get("shard") != shard:
    return None  # another format, or the shard changed since: rebuild
  return index


def load_index(shard: epath.Path) -> dict[str, Any]:
  """The shard's index: read from the sidecar or the cache, else built and saved."""
  if not shard.exists():
    raise UserError(f"tar shard {os.fspath(shard)} does not exist")
  current = fingerprint(shard)
  candidates = index_paths(shard)
  for path in candidates:
    index = _read_index(path, current)
    if index is not None:
      return index
  index = build_index(shard)
  for path in candidates:
    try:
      write_atomic(path, json.dumps(index))  # replaces a stale index
      return index
    except OSError as e:  # a read-only folder or bucket: try the cache
      log.info("cannot write tar index %s (%s)", os.fspath(path), e)
  log.warning("tar index of %s could not be saved; it is rebuilt on every start",
              os.fspath(shard))
  return index


class WebDatasetSource(sources.BaseSource):
  """Tar shards matching PATTERN (sorted), as one random-access sequence of full samples."""

  def __init__(self, pattern: str, *, progress: bool = False, allow_empty: bool = False):
    shards = sources.expand_pattern(pattern)
    if not shards:
      raise UserError(f"no tar shards match {pattern!r}; fix the pattern (braces such as "
                      "{00000..00099} and globs are allowed)")
    self.pattern, self.shards = pattern, shards
    if progress and len(shards) > 1:
      from tqdm import tqdm
      shards = tqdm(shards, desc="indexing tar shards", unit="shard")
    self._indexes = [load_index(shard) for shard in shards]
    self.skipped = {reason: sum(ix["skipped"][reason] for ix in self._indexes)
                    for reason in ("no_image", "no_caption")}
    self._starts = np.cumsum([0] + [len(ix["keys"]) for ix in self._indexes])
    if self._starts[-1] == 0 and not allow_empty:
      raise UserError(f"the tar shards matching {pattern!r} hold no sample with both an "
                      f"image and a caption (skipped: {self.skipped})")

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _locate(self, index: int) -> tuple[int, int]:
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return shard, index - int(self._starts[shard])

  def key(self, index: int) -> str:
    shard, row = self._locate(index)
    return self._indexes[shard]["keys"][row]

  def encoded(self, index: int) -> tuple[bytes, str]:
    """The image bytes as stored in the tar, and the caption."""
    shard, row = self._locate(index)
    ix = self._indexes[shard]
    offset, size = ix["image_offsets"][row], ix["image_sizes"][row]
    with self.shards[shard].open("rb") as f:
      f.seek(offset)
      data = f.read(size)
    if len(data) != size:
      raise UserError(f"tar shard {os.fspath(self.shards[shard])} is shorter than its "
                      "index says; delete the index next to it (or in the cache) to rebuild")
    return data, ix["captions"][row]

  def _raw(self, index):
    data, caption = self.encoded(index)
    shard, row = self._locate(index)
    where = f"sample {self._indexes[shard]['keys'][row]} of {os.fspath(self.shards[shard])}"
    return {"image": sources.decode_image(data, where), "caption": caption}

  def captions(self):
    for ix in self._indexes:
      yield from ix["captions"]

  def shard_bounds(self) -> list[tuple[int, int]]:
    """[start, stop) of each tar shard's samples in this source's index space."""
    return [(int(a), int(b)) for a, b in zip(self._starts[:-1], self._starts[1:])]
