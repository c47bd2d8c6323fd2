"""Any source -> filtered ArrayRecord shards (`imagen-data convert`), and dataset statistics.

Input shards: one per file for `records:`, `webdataset:` and `parquet:` specs (each file is
opened on its own, so a process indexes only its share); other sources are cut into
chunks of `examples_per_shard` examples. Input shard k becomes output shard
`DIR/data-{k:05d}-of-{K:05d}.array_record` (possibly empty); process p of P converts the
shards k with k % P == p, in increasing k.

Each example goes through, in order: caption present and within the length limits, image
decodes completely, shortest side >= min_size, aspect ratio <= max_aspect_ratio, image not
an exact duplicate (sha256 of its bytes) of one kept before. The first failed check is its
skip reason; sources that drop samples while indexing (no image, no caption) add theirs.
Duplicates are found within one process's share (all its shards, in order): with P
processes, copies of an image that fall in two processes' shares are both kept.

Resumable and safe to kill: a shard is written under a temporary name, its sidecar
`SHARD.json` (counts, options, the sha256 of its kept images) is saved, then the shard is
renamed. A rerun keeps finished shards (reloading their hashes, so deduplication continues
exactly as in an uninterrupted run) and redoes the rest. The process that finishes last
sums the sidecars into `DIR/manifest.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import uuid
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from imagen_jax.data import preprocess
from imagen_jax.data import sources as sources_lib
from imagen_jax.errors import UserError
from imagen_jax.files import write_atomic

SKIP_REASONS = ("no_image", "no_caption", "caption_too_short", "caption_too_long",
                "undecodable", "too_small", "aspect_ratio", "duplicate")
MANIFEST = "manifest.json"
SIDECAR_SUFFIX = ".json"
DEDUP_SCOPE = "process share"
_JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class Filters:
  """What convert keeps. 0 turns a limit off; `resize` > 0 shrinks the shortest side to it."""
  min_size: int = 0
  max_aspect_ratio: float = 0.0
  min_caption_chars: int = 1
  max_caption_chars: int = 0
  dedup: bool = True
  resize: int = 0

  def __post_init__(self):
    for name in ("min_size", "max_caption_chars", "resize", "min_caption_chars"):
      if getattr(self, name) < 0:
        raise UserError(f"--{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
    if self.max_aspect_ratio and self.max_aspect_ratio < 1:
      raise UserError(f"--max_aspect_ratio={self.max_aspect_ratio} must be >= 1 (long side "
                      "over short side) or 0 for no limit")
    if self.max_caption_chars and self.max_caption_chars < self.min_caption_chars:
      raise UserError(f"--max_caption_chars={self.max_caption_chars} is below "
                      f"--min_caption_chars={self.min_caption_chars}")


# ---------------------------------------------------------------------------------------
# Input shards


def _split_spec(spec: str) -> tuple[str, str]:
  if not isinstance(spec, str) or ":" not in spec:
    return spec, ""
  kind, _, body = spec.strip().partition(":")
  return kind, body


def input_shards(spec: str, examples_per_shard: int) -> tuple[list, Any]:
  """([(file spec, None)] per file, None) for file kinds; else ([(spec, (start, stop))]
  per chunk, the source), so that a source that is not files is opened once."""
  if examples_per_shard < 1:
    raise UserError(f"--examples_per_shard={examples_per_shard} must be at least 1")
  kind, body = _split_spec(spec)
  if kind in sources_lib.FILE_KINDS and body:
    files = sources_lib.expand_pattern(body)
    if not files:
      raise UserError(f"no files match {spec!r}; fix the pattern")
    return [(f"{kind}:{os.fspath(f)}", None) for f in files], None
  source = sources_lib.get_source(spec)
  n = len(source)
  return [(spec, (a, min(a + examples_per_shard, n)))
          for a in range(0, n, examples_per_shard)], source


def open_input(file_spec: str):
  """The source of one input file (empty allowed: all its samples may be bad)."""
  kind, body = _split_spec(file_spec)
  if kind == "webdataset":
    from imagen_jax.data import webdataset
    return webdataset.WebDatasetSource(body, allow_empty=True)
  if kind == "parquet":
    from imagen_jax.data import parquet
    return parquet.ParquetSource(body, allow_empty=True)
  if kind == "records":
    return sources_lib.RecordsSource(body, allow_empty=True)
  return sources_lib.get_source(file_spec)


def encoded_example(source, index: int) -> tuple[bytes, str]:
  """(encoded image, caption): stored bytes where the source has them, else PNG."""
  if hasattr(source, "encoded"):
    return source.encoded(index)
  example = source[index]
  return sources_lib.encode_png(example["image"]), example["caption"]


# ---------------------------------------------------------------------------------------
# One example


def _target_size(width: int, height: int, side: int) -> tuple[int, int]:
  scale = side / min(width, height)
  return max(side, round(width * scale)), max(side, round(height * scale))


def _resized(image: Image.Image, data: bytes, side: int, size: tuple[int, int]) -> bytes:
  """Bytes with the shortest side of an image of (original) `size` shrunk to `side`, aspect
  kept; `data` as given if already that small. JPEGs stay JPEG (quality 95), others PNG."""
  if min(size) <= side:
    return data
  small = Image.fromarray(preprocess.to_rgb_uint8(image)).resize(
      _target_size(*size, side), Image.Resampling.BICUBIC)
  buffer = io.BytesIO()
  if image.format == "JPEG":
    small.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  else:
    small.save(buffer, format="PNG")
  return buffer.getvalue()


def check_example(data: bytes, caption: str, filters: Filters,
                  seen: set[str]) -> tuple[str | None, bytes | None, str | None]:
  """(skip reason or None, bytes to store, sha256) of one example; adds kept hashes to seen."""
  caption = caption.strip()
  if not caption:
    return "no_caption", None, None
  if len(caption) < filters.min_caption_chars:
    return "caption_too_short", None, None
  if filters.max_caption_chars and len(caption) > filters.max_caption_chars:
    return "caption_too_long", None, None
  try:
    image = Image.open(io.BytesIO(data))
    width, height = image.size  # from the header: the original size
    if filters.resize and image.format == "JPEG" and min(width, height) >= 2 * filters.resize:
      # DCT-domain downscale while decoding (never below the target; as preprocess does).
      image.draft("RGB", _target_size(width, height, filters.resize))
    image.load()  # the whole body: a truncated file fails here
  except Exception:  # PIL raises many types for corrupt data; all mean "undecodable"
    return "undecodable", None, None
  if min(width, height) < filters.min_size:
    return "too_small", None, None
  if filters.max_aspect_ratio and max(width, height) / min(width, height) > \
      filters.max_aspect_ratio:
    return "aspect_ratio", None, None
  digest = hashlib.sha256(data).hexdigest()
  if filters.dedup:
    if digest in seen:
      return "duplicate", None, None
    seen.add(digest)
  stored = _resized(image, data, filters.resize, (width, height)) if filters.resize else data
  return None, stored, digest


# ---------------------------------------------------------------------------------------
# Shards


def shard_path(output: epath.Path, k: int, count: int) -> epath.Path:
  return output / f"data-{k:05d}-of-{count:05d}.array_record"


def _sidecar(path: epath.Path) -> epath.Path:
  return path.parent / (path.name + SIDECAR_SUFFIX)


def _write_json(path: epath.Path, value: Any) -> None:
  # Replaces an existing file: every process that finishes the last shards writes the same
  # manifest, and two can do so at once.
  write_atomic(path, json.dumps(value, indent=1, sort_keys=True))


def finished_shard(path: epath.Path, options: dict) -> dict | None:
  """The sidecar of a finished output shard, or None; UserError if made with other options."""
  if not (path.exists() and _sidecar(path).exists()):
    return None
  info = json.loads(_sidecar(path).read_text())
  if info["options"] != options:
    raise UserError(f"{os.fspath(path)} was converted with other options "
                    f"({info['options']}); convert into a new --output folder")
  return info


def convert_shard(file_spec: str, bounds, path: epath.Path, filters: Filters,
                  seen: set[str], options: dict, source=None) -> dict:
  """Converts one input shard into `path` (temp name, sidecar, rename); returns the sidecar.
  `source`: the opened source of a chunk (`bounds` set), else `file_spec` is opened."""
  if source is None:
    source = open_input(file_spec)
  start, stop = bounds if bounds is not None else (0, len(source))
  skipped = dict.fromkeys(SKIP_REASONS, 0)
  indexing_skips = getattr(source, "skipped", {}) if bounds is None else {}
  for reason, count in indexing_skips.items():
    skipped[reason] += count
  kept = []
  for stale in path.parent.glob(f".{path.name}*.tmp*"):  # shard or sidecar of a killed run
    stale.unlink()
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  writer = sources_lib.RecordWriter(tmp, "array_record")
  try:
    for index in range(start, stop):
      data, caption = encoded_example(source, index)
      reason, stored, digest = check_example(data, caption, filters, seen)
      if reason is None:
        writer.write(stored, caption.strip())
        kept.append(digest)
      else:
        skipped[reason] += 1
  finally:
    writer.close()
  info = {"options": options, "input": file_spec, "bounds": bounds,
          "input_examples": (stop - start) + sum(indexing_skips.values()),
          "examples": len(kept), "skipped": skipped, "sha256": kept}
  _write_json(_sidecar(path), info)
  tmp.rename(path)
  return info


def merge_manifest(output: epath.Path, count: int, options: dict) -> dict | None:
  """Sums every shard's sidecar into DIR/manifest.json once all `count` shards are done."""
  infos = []
  for k in range(count):
    info = finished_shard(shard_path(output, k, count), options)
    if info is None:
      return None
    infos.append(info)
  manifest = {"options": options, "shards": count, "dedup_scope": DEDUP_SCOPE,
              "input_examples": sum(i["input_examples"] for i in infos),
              "examples": sum(i["examples"] for i in infos),
              "skipped": {r: sum(i["skipped"][r] for i in infos) for r in SKIP_REASONS},
              "files": [shard_path(output, k, count).name for k in range(count)]}
  _write_json(output / MANIFEST, manifest)
  return manifest


# ---------------------------------------------------------------------------------------
# The command


def convert(spec: str, output: str | os.PathLike, filters: Filters, *,
            examples_per_shard: int = 10_000, process_index: int = 0,
            process_count: int = 1, max_shards: int | None = None,
            progress: bool = True) -> dict:
  """Converts this process's share of `spec`'s input shards into `output` (module doc).

  `max_shards` stops after converting that many shards (the rest on a later run).
  Returns {"shards", "converted", "reused", "skipped", "examples", "manifest"}: this
  process's counts, and the merged manifest when every shard of `output` is finished.
  """
  if not 0 <= process_index < process_count:
    raise UserError(f"--process_index={process_index} must be in 0 ... {process_count - 1}")
  output = epath.Path(output)
  shards, source = input_shards(spec, examples_per_shard)
  count = len(shards)
  options = {"input": spec, "filters": dataclasses.asdict(filters),
             "examples_per_shard": examples_per_shard}
  output.mkdir(parents=True, exist_ok=True)
  other = sorted({p.name for p in output.glob("data-*-of-*.array_record")} -
                 {shard_path(output, k, count).name for k in range(count)})
  if other:
    raise UserError(f"{os.fspath(output)} holds {other[0]} from a conversion of another "
                    f"input ({count} input shards now); convert into a new --output folder")
  mine = [k for k in range(count) if k % process_count == process_index]
  bar = None
  if progress and process_index == 0:
    from tqdm import tqdm
    bar = tqdm(total=len(mine), desc=f"converting (process {process_index})", unit="shard")
  seen: set[str] = set()
  totals = {"shards": len(mine), "converted": 0, "reused": 0, "examples": 0,
            "skipped": dict.fromkeys(SKIP_REASONS, 0)}
  for k in mine:
    path = shard_path(output, k, count)
    info = finished_shard(path, options)
    if info is not None:
      totals["reused"] += 1
    elif max_shards is not None and totals["converted"] >= max_shards:
      break
    else:
      info = convert_shard(*shards[k], path, filters, seen, options, source)
      totals["converted"] += 1
    seen.update(info["sha256"])  # what an uninterrupted run would have seen by now
    totals["examples"] += info["examples"]
    for reason in SKIP_REASONS:
      totals["skipped"][reason] += info["skipped"][reason]
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  totals["manifest"] = merge_manifest(output, count, options)
  return totals


# ---------------------------------------------------------------------------------------
# Statistics

SIZE_EDGES = (0, 64, 128, 256, 512, 1024)  # shortest side, pixels
ASPECT_EDGES = (1.0, 1.25, 1.5, 2.0, 3.0)  # long side / short side
CAPTION_EDGES = (0, 20, 50, 100, 200, 400)  # characters


def histogram(values, edges) -> dict[str, int]:
  """Counts per bin [edges[i], edges[i+1]) and a last open bin [edges[-1], inf)."""
  values = np.asarray(values, dtype=float)
  labels = [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])] + [f">={edges[-1]:g}"]
  bins = np.searchsorted(np.asarray(edges, float), values, side="right") - 1
  return {label: int((bins == i).sum()) for i, label in enumerate(labels)}


def _image_size(source, index: int) -> tuple[int, int] | None:
  """(width, height) from the image header (no pixel decoding); None if unreadable."""
  try:
    if hasattr(source, "encoded"):
      return Image.open(io.BytesIO(source.encoded(index)[0])).size
    height, width = np.asarray(source[index]["image"]).shape[:2]
    return width, height
  except (sources_lib.ImageDecodeError, OSError, SyntaxError):
    return None


def stats(spec: str, *, max_examples: int | None = None, progress: bool = True) -> dict:
  """Counts and histograms of shortest side, aspect ratio and caption length.

  With `max_examples`, images are looked at for that many evenly spaced examples (captions
  are always all counted)."""
  source = sources_lib.get_source(spec)
  n = len(source)
  indices = np.arange(n)
  if max_examples is not None and max_examples < n:
    indices = np.unique(np.linspace(0, n - 1, max(1, max_examples)).astype(np.int64))
  if progress:
    from tqdm import tqdm
    indices = tqdm(indices, desc="reading image headers", unit="image")
  sizes = [_image_size(source, int(i)) for i in indices]
  good = np.array([s for s in sizes if s is not None], dtype=float).reshape(-1, 2)
  lengths = [len(c) for c in source.captions()]
  short, long = good.min(axis=1), good.max(axis=1)
  return {"spec": spec, "examples": n, "images_read": len(sizes),
          "undecodable_headers": len(sizes) - len(good),
          "skipped_when_indexing": dict(getattr(source, "skipped", {})),
          "shortest_side": histogram(short, SIZE_EDGES),
          "aspect_ratio": histogram(long / np.maximum(short, 1), ASPECT_EDGES),
          "caption_chars": histogram(lengths, CAPTION_EDGES),
          "caption_chars_mean": float(np.mean(lengths)) if lengths else 0.0}
