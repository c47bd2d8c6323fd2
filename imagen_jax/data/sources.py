"""Random-access image-caption sources, chosen by the `DATASET` spec string.

A source is a finite sequence of examples:

  len(src)             number of examples
  src[i]               {"image": uint8 [H,W,3], "caption": str}, i in [0, len(src))
  src.captions()       iterator over every caption (cheap: no image decoding), for
                       imagen-embed
  src.raw(i)           like src[i], but the image may still be an undecoded PIL image,
                       so that preprocessing can shrink large JPEGs while decoding
  src.encoded(i)       (image bytes as stored, caption), where the source stores encoded
                       images (files, records, tar, parquet): `imagen-data convert` copies
                       them without re-encoding
  src.shard_bounds()   [start, stop) of each input file's examples (record, tar and parquet
                       sources): the units `imagen-data convert` shares between processes

Specs (`get_source(spec)`):

  shapes                              the built-in shapes data, train split
  shapes:held_out                     its held-out split (compositional generalisation)
  folder:PATH                         images (png/jpg/jpeg/webp) with PATH/x.txt captions
  jsonl:PATH                          lines {"image": path, "caption": text}
  tfds:NAME:SPLIT?image=K&text=K      any TFDS dataset, prepared as ArrayRecord
  records:PATTERN                     ArrayRecord or TFRecord shards of tf.train.Example
                                      {"image": encoded bytes, "caption": bytes}
  webdataset:PATTERN                  img2dataset tar shards (KEY.jpg + KEY.txt), indexed once
                                      (`imagen_jax.data.webdataset`)
  parquet:PATTERN                     img2dataset parquet files (columns jpg, caption)
                                      (`imagen_jax.data.parquet`)
  seqio:TASK?split=S&image=K&text=K   a registered seqio Task, written once to ArrayRecord
                                      (`imagen_jax.data.seqio_source`)

A PATTERN is a path with globs (`*`, `?`, `[..]`) and brace ranges (`{00000..00099}`,
`{a,b}`), expanded by `expand_pattern`.

Every path goes through `etils.epath`, so `gs://bucket/...` works where a local path does.
Random access everywhere is what makes the pipeline index-addressable (example i of the
stream is a pure function of the seed and i), so the stream resumes exactly and each host
reads only its own rows.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from etils import epath
from PIL import Image

from imagen_jax.data import preprocess
from imagen_jax.data import tf_example
from imagen_jax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SPEC_FORMS = ("shapes", "shapes:held_out", "folder:PATH", "jsonl:PATH",
              "tfds:NAME:SPLIT?image=KEY&text=KEY", "records:PATTERN", "webdataset:PATTERN",
              "parquet:PATTERN", "seqio:TASK?split=S&image=KEY&text=KEY")
# Kinds whose PATTERN names files: one input shard per file (`imagen-data convert`).
FILE_KINDS = ("records", "webdataset", "parquet")
DEFAULT_SHAPES_LENGTH = 1_000_000
CACHE_ENV = "IMAGEN_JAX_CACHE"  # where sources keep what they derive (tar indexes, seqio)


def cache_root() -> epath.Path:
  """$IMAGEN_JAX_CACHE, default ~/.cache/imagen_jax."""
  return epath.Path(os.environ.get(CACHE_ENV) or
                    os.path.join(os.path.expanduser("~"), ".cache", "imagen_jax"))


class Source(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict[str, Any]: ...
  def captions(self) -> Iterator[str]: ...


class BaseSource:
  """`src[i]` from `raw(i)`, with bounds checks; subclasses implement `_raw` and `captions`."""

  def __len__(self) -> int:
    raise NotImplementedError

  def _raw(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def raw(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for a source of {len(self)} examples")
    return self._raw(index)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self.raw(index)
    return {"image": preprocess.to_rgb_uint8(example["image"]), "caption": example["caption"]}


class ImageDecodeError(UserError):
  """An image's bytes are not a readable image (the pipeline replaces such examples)."""


def decode_image(data: bytes, where: str) -> Image.Image:
  """Encoded bytes -> a lazily decoded PIL image; ImageDecodeError naming `where` if its
  header is unreadable (a truncated body fails later, with OSError, when pixels decode)."""
  try:
    return Image.open(io.BytesIO(data))  # parses the header; pixels decode on use
  except Exception as e:  # PIL raises several types for corrupt data
    raise ImageDecodeError(f"cannot decode the image in {where}: {e}") from e


def encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(preprocess.to_rgb_uint8(image)).save(buffer, format="PNG")
  return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# In memory


class ArraySource(BaseSource):
  """Images and captions held in memory (tests, small experiments)."""

  def __init__(self, images: Sequence[np.ndarray], captions: Sequence[str]):
    if len(images) != len(captions):
      raise UserError(f"{len(images)} images but {len(captions)} captions")
    self._images, self._captions = list(images), [str(c) for c in captions]

  def __len__(self) -> int:
    return len(self._images)

  def _raw(self, index):
    return {"image": self._images[index], "caption": self._captions[index]}

  def captions(self):
    return iter(self._captions)


# ---------------------------------------------------------------------------------------
# shapes


class ShapesSource(BaseSource):
  """The built-in shapes data (`imagen_jax.data.shapes`), rendered on the fly.

  Infinite in principle; `length` is its nominal size (one "epoch"). Scene i is
  `shapes.sample_scene(scene_seed, i, split)`; the scene seed names the data set and stays
  fixed, while the pipeline's seed only orders it. Renders directly at `resolution`, so the
  pipeline asks for the stage's side (the high-resolution side for SR stages) through
  `at_resolution`. `captions()` is the split's whole finite caption set.
  """

  def __init__(self, split: str = "train", *, resolution: int = 64,
               length: int = DEFAULT_SHAPES_LENGTH, scene_seed: int = 0):
    if split not in ("train", "held_out"):
      raise UserError(f"shapes split {split!r} unknown; use 'shapes' or 'shapes:held_out'")
    if length <= 0:
      raise UserError(f"shapes length={length} must be positive")
    self.split, self.resolution, self.length, self.scene_seed = (
        split, int(resolution), int(length), int(scene_seed))

  def at_resolution(self, resolution: int) -> "ShapesSource":
    return ShapesSource(self.split, resolution=resolution, length=self.length,
                        scene_seed=self.scene_seed)

  def __len__(self) -> int:
    return self.length

  def _raw(self, index):
    from imagen_jax.data import shapes  # written alongside; imported on use
    scene = shapes.sample_scene(self.scene_seed, index, self.split)
    return {"image": shapes.render(scene, self.resolution), "caption": scene.caption}

  def captions(self):
    from imagen_jax.data import shapes
    return iter(shapes.all_captions(self.split))


# ---------------------------------------------------------------------------------------
# folder and jsonl


class FileListSource(BaseSource):
  """Image files with captions, in a fixed order (folder:PATH and jsonl:PATH).

  Captions are given (`captions`) or read from a text file per image on use
  (`caption_paths`), so opening a large folder on GCS lists it without reading every file.
  """

  def __init__(self, image_paths: Sequence[epath.Path], name: str, *,
               captions: Sequence[str] | None = None,
               caption_paths: Sequence[epath.Path] | None = None):
    if not image_paths:
      raise UserError(f"{name} holds no examples; add images with captions or fix the path")
    self._paths, self.name = list(image_paths), name
    self._captions = None if captions is None else list(captions)
    self._caption_paths = None if caption_paths is None else list(caption_paths)

  def __len__(self) -> int:
    return len(self._paths)

  def caption(self, index: int) -> str:
    if self._captions is not None:
      return self._captions[index]
    return self._caption_paths[index].read_text().strip()

  def encoded(self, index: int) -> tuple[bytes, str]:
    path = self._paths[index]
    try:
      data = path.read_bytes()
    except FileNotFoundError as e:
      raise UserError(f"image {os.fspath(path)} (example {index} of {self.name}) is "
                      "missing") from e
    return data, self.caption(index)

  def _raw(self, index):
    data, caption = self.encoded(index)
    return {"image": decode_image(data, os.fspath(self._paths[index])), "caption": caption}

  def captions(self):
    return (self.caption(index) for index in range(len(self)))


def _walk(root: epath.Path) -> Iterator[epath.Path]:
  """Every file under root (epath's rglob refuses '**' on GCS; this lists folder by folder)."""
  for path in root.iterdir():
    if path.is_dir():
      yield from _walk(path)
    else:
      yield path


def folder_source(path: str | os.PathLike) -> FileListSource:
  """Every image under `path` (recursively, sorted) with the caption in `NAME.txt` beside it."""
  root = epath.Path(path)
  if not root.is_dir():
    raise UserError(f"folder {os.fspath(root)!r} does not exist or is not a directory")
  files = {os.fspath(p): p for p in _walk(root)}  # one listing; no per-file requests
  images = sorted(name for name, p in files.items() if p.suffix.lower() in IMAGE_EXTENSIONS)
  caption_paths = []
  for image in images:
    caption_path = files[image].with_suffix(".txt")
    if os.fspath(caption_path) not in files:
      raise UserError(f"image {image} has no caption file {os.fspath(caption_path)}; "
                      "write its caption there or remove the image")
    caption_paths.append(caption_path)
  return FileListSource([files[image] for image in images], f"folder {os.fspath(root)}",
                        caption_paths=caption_paths)


def jsonl_source(path: str | os.PathLike) -> FileListSource:
  """Lines of {"image": path relative to the JSONL's folder or absolute, "caption": text}."""
  path = epath.Path(path)
  if not path.is_file():
    raise UserError(f"JSONL file {os.fspath(path)!r} does not exist")
  images, captions = [], []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      image, caption = row["image"], row["caption"]
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"{os.fspath(path)} line {number} is not a JSON object with 'image' "
                      f"and 'caption': {line[:200]!r}") from e
    image_path = epath.Path(image)
    if not (image_path.is_absolute() or "://" in image):
      image_path = path.parent / image
    images.append(image_path)
    captions.append(str(caption).strip())
  return FileListSource(images, f"JSONL {os.fspath(path)}", captions=captions)


# ---------------------------------------------------------------------------------------
# TFDS


def _get_feature(example: dict, key: str):
  value = example
  for part in key.split("/"):
    value = value[part]
  return value


def _as_text(value) -> str:
  value = np.asarray(value)
  if value.ndim > 0:  # a sequence of captions (e.g. COCO): the first one
    value = value.reshape(-1)[0]
  value = value.item()
  return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()


class TfdsSource(BaseSource):
  """A TFDS split through `builder.as_data_source` (ArrayRecord-backed random access).

  The dataset must be prepared with `file_format="array_record"` (TFDS's default for new
  builds is TFRecord, which has no random access). Feature keys may be nested with '/';
  a text feature that is a sequence yields its first element.
  """

  def __init__(self, name: str, split: str, *, image_key: str = "image",
               text_key: str = "caption", data_dir: str | None = None):
    import tensorflow_datasets as tfds  # heavy; only for this source
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      self._data = builder.as_data_source(split=split)
    except Exception as e:  # TFDS raises many types; all mean "cannot read this"
      raise UserError(f"cannot open TFDS dataset {name!r} split {split!r} "
                      f"(data_dir={data_dir!r}) as a random-access data source: {e}. "
                      "Prepare it with file_format='array_record'.") from e
    features = builder.info.features
    for key in (image_key, text_key):
      try:
        _get_feature(features, key)
      except (KeyError, TypeError) as e:
        raise UserError(f"TFDS dataset {name!r} has no feature {key!r}; its features are "
                        f"{list(features.keys())}; set ?image=KEY&text=KEY") from e
    self.name, self.split, self.image_key, self.text_key = name, split, image_key, text_key

  def __len__(self) -> int:
    return len(self._data)

  def _raw(self, index):
    example = self._data[index]
    return {"image": np.asarray(_get_feature(example, self.image_key)),
            "caption": _as_text(_get_feature(example, self.text_key))}

  def captions(self):
    # Decodes images too; TFDS offers no per-feature random access without a decoder
    # override, and the captions pass runs once per dataset.
    for index in range(len(self)):
      yield self._raw(index)["caption"]


# ---------------------------------------------------------------------------------------
# Sharded records


def serialize_example(image, caption: str) -> bytes:
  """A tf.train.Example with bytes features `image` (PNG/JPEG) and `caption` (UTF-8)."""
  data = image if isinstance(image, bytes) else encode_png(np.asarray(image))
  return tf_example.encode({"image": data, "caption": caption.encode("utf-8")})


def parse_example(record: bytes, where: str) -> tuple[bytes, str]:
  try:
    features = tf_example.decode(record)
    return features["image"][0], features["caption"][0].decode("utf-8")
  except (tf_example.DecodeError, KeyError, IndexError, UnicodeDecodeError) as e:
    raise UserError(f"record in {where} is not a tf.train.Example with bytes features "
                    f"'image' and 'caption': {e!r}") from e


def _record_format(path: str) -> str:
  name = os.path.basename(path).lower()
  if "array_record" in name or "arrayrecord" in name:
    return "array_record"
  if "tfrecord" in name:
    return "tfrecord"
  raise UserError(f"cannot tell the record format of {path!r}: its name must contain "
                  "'array_record' or 'tfrecord' (e.g. train-00000-of-00004.array_record)")


class RecordWriter:
  """Appends tf.train.Examples (see `serialize_example`) to one ArrayRecord or TFRecord file.

  `fmt` is "array_record" or "tfrecord" (default: told by the file name)."""

  def __init__(self, path: str | os.PathLike, fmt: str | None = None):
    path = os.fspath(path)
    self.format = fmt or _record_format(path)
    if self.format == "array_record":
      from array_record.python import array_record_module
      # group_size:1 makes every record independently addressable (fast random reads).
      self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    else:
      import tensorflow as tf
      self._writer = tf.io.TFRecordWriter(path)

  def write(self, image, caption: str) -> None:
    self._writer.write(serialize_example(image, caption))

  def close(self) -> None:
    self._writer.close()


def write_records(path: str | os.PathLike, examples: Iterable[dict],
                  num_shards: int = 1) -> list[str]:
  """Writes examples {"image": uint8 array or encoded bytes, "caption": str} as shards.

  `path` names the data set, e.g. `out/train.array_record` or `out/train.tfrecord`; shards
  are `out/train-00000-of-00004.array_record`, ..., and `records:out/train-*.array_record`
  reads them back. Example k goes to shard k % num_shards (streaming; the source reads
  shards in order, so its order is shard-major). Returns the shard paths.
  """
  path = epath.Path(path)
  fmt = _record_format(os.fspath(path))
  if num_shards < 1:
    raise UserError(f"num_shards={num_shards} must be at least 1")
  path.parent.mkdir(parents=True, exist_ok=True)
  stem, suffix = path.name.split(".", 1) if "." in path.name else (path.name, "")
  suffix = "." + suffix if suffix else ""
  paths = [path.parent / f"{stem}-{k:05d}-of-{num_shards:05d}{suffix}"
           for k in range(num_shards)]
  writers = [RecordWriter(p, fmt) for p in paths]
  try:
    for k, example in enumerate(examples):
      writers[k % num_shards].write(example["image"], str(example["caption"]))
  finally:
    for writer in writers:
      writer.close()
  return [os.fspath(p) for p in paths]


class _TfRecordFile:
  """Random access into one TFRecord file through an offset index built by one scan.

  TFRecord framing: uint64 length, uint32 masked CRC of the length, data, uint32 CRC.
  """

  def __init__(self, path: epath.Path):
    self.path = path
    self._lock = threading.Lock()
    self._file = path.open("rb")
    self.offsets, self.lengths = [], []
    position = 0
    while True:
      self._file.seek(position)
      header = self._file.read(12)
      if not header:
        break
      if len(header) < 12:
        raise UserError(f"TFRecord file {os.fspath(path)} is truncated at byte {position}")
      (length,) = struct.unpack("<Q", header[:8])
      self.offsets.append(position + 12)
      self.lengths.append(length)
      position += 12 + length + 4

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, index: int) -> bytes:
    with self._lock:  # one file handle shared by the pipeline's threads
      self._file.seek(self.offsets[index])
      data = self._file.read(self.lengths[index])
    if len(data) != self.lengths[index]:
      raise UserError(f"TFRecord file {os.fspath(self.path)} is truncated")
    return data


class RecordsSource(BaseSource):
  """Shards matching a glob pattern, in sorted order, as one random-access sequence."""

  def __init__(self, pattern: str, *, allow_empty: bool = False):
    paths = expand_pattern(pattern)
    if not paths:
      raise UserError(f"no record files match {pattern!r}; write some with "
                      "imagen_jax.data.sources.write_records or fix the pattern")
    formats = {_record_format(os.fspath(p)) for p in paths}
    if len(formats) > 1:
      raise UserError(f"{pattern!r} matches both ArrayRecord and TFRecord files; narrow it")
    self.pattern, self.format = pattern, formats.pop()
    if self.format == "array_record":
      from array_record.python import array_record_data_source
      self._shards = [array_record_data_source.ArrayRecordDataSource([os.fspath(p)])
                      for p in paths]
    else:
      self._shards = [_TfRecordFile(p) for p in paths]
    self._starts = np.cumsum([0] + [len(s) for s in self._shards])
    if self._starts[-1] == 0 and not allow_empty:
      raise UserError(f"the record files matching {pattern!r} hold no examples")

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _record(self, index):
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._shards[shard][index - int(self._starts[shard])], shard

  def _encoded(self, index: int) -> tuple[bytes, str, str]:
    record, shard = self._record(index)
    where = f"shard {shard} of {self.pattern!r}"
    data, caption = parse_example(record, where)
    return data, caption.strip(), where

  def encoded(self, index: int) -> tuple[bytes, str]:
    return self._encoded(index)[:2]

  def _raw(self, index):
    data, caption, where = self._encoded(index)
    return {"image": decode_image(data, where), "caption": caption}

  def shard_bounds(self) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in zip(self._starts[:-1], self._starts[1:])]

  def captions(self):
    for index in range(len(self)):
      record, shard = self._record(index)
      yield parse_example(record, f"shard {shard} of {self.pattern!r}")[1].strip()


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
  """`a{00..02}b` -> a00b, a01b, a02b (zero padding kept); `{x,y}` -> x, y; nested in order."""
  match = _BRACE.search(pattern)
  if match is None:
    return [pattern]
  body, head, tail = match[1], pattern[:match.start()], pattern[match.end():]
  numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if numeric:
    first, last = numeric[1], numeric[2]
    if int(last) < int(first):
      raise UserError(f"brace range {{{body}}} in {pattern!r} runs backwards; write "
                      f"{{{last}..{first}}} with the smaller number first")
    width = len(first) if first.startswith("0") else 0
    options = [str(k).zfill(width) for k in range(int(first), int(last) + 1)]
  elif "," in body:
    options = body.split(",")
  else:
    raise UserError(f"brace expression {{{body}}} in {pattern!r} is neither a range "
                    "{00000..00099} nor a list {a,b}")
  return [out for option in options for out in expand_braces(head + option + tail)]


def _glob_one(pattern: str) -> list[epath.Path]:
  path = epath.Path(pattern)
  if not any(ch in pattern for ch in "*?["):
    return [path] if path.exists() else []
  # Glob from the deepest folder without wildcards (epath globs relative to a folder).
  parts = pattern.split("/")
  fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
  root = epath.Path("/".join(parts[:fixed]) or ".")
  if not root.exists():
    return []
  return list(root.glob("/".join(parts[fixed:])))


def expand_pattern(pattern: str) -> list[epath.Path]:
  """The existing files a PATTERN names (braces, then globs), sorted, without repeats."""
  found = {os.fspath(p): p for part in expand_braces(pattern) for p in _glob_one(part)}
  return [found[name] for name in sorted(found)]


# ---------------------------------------------------------------------------------------
# The spec string


_TFDS_SPEC = re.compile(r"^(?P<name>[\w/.-]+?(?::\d+\.\d+\.\d+)?)(?::(?P<split>[^?]+))?"
                        r"(?:\?(?P<query>.*))?$")


def _bad_spec(spec: str, why: str = "") -> UserError:
  return UserError(f"DATASET {spec!r} is not valid{': ' + why if why else ''}; valid "
                   "forms: " + ", ".join(SPEC_FORMS))


def parse_tfds_spec(body: str) -> dict[str, Any]:
  """'NAME[:VERSION][:SPLIT][?image=K&text=K&data_dir=D]' -> builder arguments."""
  match = _TFDS_SPEC.match(body)
  if not match:
    raise _bad_spec("tfds:" + body)
  query = urllib.parse.parse_qs(match["query"] or "", keep_blank_values=True)
  unknown = set(query) - {"image", "text", "data_dir"}
  if unknown:
    raise _bad_spec("tfds:" + body, f"unknown option(s) {sorted(unknown)}; use image=, "
                    "text=, data_dir=")
  return {"name": match["name"], "split": match["split"] or "train",
          "image_key": query.get("image", ["image"])[0],
          "text_key": query.get("text", ["caption"])[0],
          "data_dir": query.get("data_dir", [None])[0]}


def get_source(spec: str, *, resolution: int = 64,
               shapes_length: int = DEFAULT_SHAPES_LENGTH, shapes_seed: int = 0):
  """The source named by a `DATASET` spec string (forms in the module docstring).

  `resolution` is the render side for `shapes` (other sources keep their own sizes and are
  resized by the pipeline); `shapes_length` its nominal length, `shapes_seed` its scene seed.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise _bad_spec(str(spec), "empty")
  spec = spec.strip()
  kind, _, body = spec.partition(":")
  if kind == "shapes":
    split = body or "train"
    if split not in ("train", "held_out"):
      raise _bad_spec(spec, f"unknown shapes split {split!r}")
    return ShapesSource(split, resolution=resolution, length=shapes_length,
                        scene_seed=shapes_seed)
  if not body:
    raise _bad_spec(spec, f"{kind!r} needs a path or name after ':'")
  if kind == "folder":
    return folder_source(body)
  if kind == "jsonl":
    return jsonl_source(body)
  if kind == "tfds":
    return TfdsSource(**parse_tfds_spec(body))
  if kind == "records":
    return RecordsSource(body)
  if kind == "webdataset":
    from imagen_jax.data import webdataset  # imported on use, like the other formats
    return webdataset.WebDatasetSource(body)
  if kind == "parquet":
    from imagen_jax.data import parquet
    return parquet.ParquetSource(body)
  if kind == "seqio":
    from imagen_jax.data import seqio_source
    return seqio_source.seqio_source(body)
  raise _bad_spec(spec, f"unknown kind {kind!r}")
