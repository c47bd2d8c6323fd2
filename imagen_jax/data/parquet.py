"""`parquet:PATTERN`: img2dataset parquet files (image bytes in a column, one row a sample).

img2dataset's parquet output has a binary column `jpg` with the encoded image and the
columns `caption`, `key`, `width`, `height` (among others). A row is addressed as (file,
row group, row): opening the source reads only the `caption` and `key` columns (and the
image column's validity where the row group's statistics report nulls), so rows without an
image or a non-empty caption are left out and counted (`skipped`) without reading images.

Parquet's unit of reading is the row group: example i reads its row group's image column
(a few recently used row groups are kept in memory, so a sequential pass such as
`imagen-data convert` reads each once). Random access over large row groups is slow;
convert parquet to ArrayRecord (`imagen-data convert`) for training.
"""

from __future__ import annotations

import collections
import os
import threading

import numpy as np
from etils import epath

from imagen_jax.data import sources
from imagen_jax.errors import UserError

IMAGE_COLUMN, CAPTION_COLUMN, KEY_COLUMN = "jpg", "caption", "key"
_CACHED_ROW_GROUPS = 4


def _open(path: epath.Path):
  import pyarrow.parquet as pq  # imported on use
  try:
    return pq.ParquetFile(path.open("rb"))
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
    raise UserError(f"cannot read parquet file {os.fspath(path)}: {e}") from e


def _valid_rows(file, path: epath.Path, group: int) -> tuple:
  """(valid rows, has_image, has_caption, captions, keys) of a row group; a valid row has an
  image and a non-empty caption."""
  names = file.schema_arrow.names
  for column in (IMAGE_COLUMN, CAPTION_COLUMN):
    if column not in names:
      raise UserError(f"parquet file {os.fspath(path)} has no column {column!r} (columns: "
                      f"{names}); img2dataset writes 'jpg' and 'caption'")
  columns = [CAPTION_COLUMN] + ([KEY_COLUMN] if KEY_COLUMN in names else [])
  table = file.read_row_group(group, columns=columns)
  captions = [("" if c is None else str(c).strip())
              for c in table.column(CAPTION_COLUMN).to_pylist()]
  keys = (table.column(KEY_COLUMN).to_pylist() if KEY_COLUMN in names
          else [f"{os.path.basename(os.fspath(path))}/{group}/{r}" for r in range(len(captions))])
  has_image = np.ones(len(captions), bool)
  image_index = names.index(IMAGE_COLUMN)
  stats = file.metadata.row_group(group).column(image_index).statistics
  if stats is None or not stats.has_null_count or stats.null_count > 0:
    images = file.read_row_group(group, columns=[IMAGE_COLUMN]).column(0)
    has_image = ~np.asarray(images.is_null().to_numpy(zero_copy_only=False))
  has_caption = np.array([bool(c) for c in captions])
  rows = np.flatnonzero(has_image & has_caption)
  return rows, has_image, has_caption, captions, keys


class ParquetSource(sources.BaseSource):
  """Parquet files matching PATTERN (sorted), rows in file/row-group/row order."""

  def __init__(self, pattern: str, *, allow_empty: bool = False):
    paths = sources.expand_pattern(pattern)
    if not paths:
      raise UserError(f"no parquet files match {pattern!r}; fix the pattern (braces such "
                      "as {00000..00099} and globs are allowed)")
    self.pattern, self.paths = pattern, paths
    self._files = [_open(path) for path in paths]
    self.skipped = {"no_image": 0, "no_caption": 0}
    # One entry per (file, row group) with valid rows; examples are numbered through them.
    self._groups, self._captions, self._keys, counts, file_ends = [], [], [], [], []
    for f, (path, file) in enumerate(zip(paths, self._files)):
      for group in range(file.num_row_groups):
        rows, has_image, has_caption, captions, keys = _valid_rows(file, path, group)
        self.skipped["no_image"] += int((~has_image).sum())
        self.skipped["no_caption"] += int((has_image & ~has_caption).sum())
        self._groups.append((f, group, rows))
        self._captions.extend(captions[r] for r in rows)
        self._keys.extend(str(keys[r]) for r in rows)
        counts.append(len(rows))
      file_ends.append(len(counts))
    self._starts = np.cumsum([0] + counts)
    self._file_starts = [0] + [int(self._starts[end]) for end in file_ends]
    if self._starts[-1] == 0 and not allow_empty:
      raise UserError(f"the parquet files matching {pattern!r} hold no row with both an "
                      f"image and a caption (skipped: {self.skipped})")
    self._lock = threading.Lock()
    self._cache: collections.OrderedDict = collections.OrderedDict()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _images(self, entry: int):
    """The image column of row group entry `entry` (LRU-cached)."""
    with self._lock:
      if entry in self._cache:
        self._cache.move_to_end(entry)
        return self._cache[entry]
    f, group, _ = self._groups[entry]
    with self._lock:  # one pyarrow file object per file, shared by the pipeline's threads
      column = self._files[f].read_row_group(group, columns=[IMAGE_COLUMN]).column(0)
      self._cache[entry] = column
      while len(self._cache) > _CACHED_ROW_GROUPS:
        self._cache.popitem(last=False)
    return column

  def key(self, index: int) -> str:
    return self._keys[index]

  def encoded(self, index: int) -> tuple[bytes, str]:
    entry = int(np.searchsorted(self._starts, index, side="right")) - 1
    row = int(self._groups[entry][2][index - int(self._starts[entry])])
    return self._images(entry)[row].as_py(), self._captions[index]

  def _raw(self, index):
    data, caption = self.encoded(index)
    where = f"row {self._keys[index]!r} of parquet {self.pattern!r}"
    return {"image": sources.decode_image(data, where), "caption": caption}

  def captions(self):
    return iter(self._captions)

  def shard_bounds(self) -> list[tuple[int, int]]:
    return list(zip(self._file_starts[:-1], self._file_starts[1:]))
