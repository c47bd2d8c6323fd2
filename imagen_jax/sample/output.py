"""Files that sampling reads and writes: prompts, start images, PNGs, the grid, index.jsonl.

Layout of an output directory:

  DIR/stage{k}/{prompt_index:05d}_{sample}.png   one PNG per sample per stage (k = 0: base)
  DIR/grid.png                                   the last stage's images with their prompts
  DIR/index.jsonl                                one JSON object per line and per image
  DIR/config.gin                                 the operative gin config (the CLI writes it)

Every file is written to a temporary name and renamed, so a killed job never leaves a
truncated PNG behind, and a rerun that finds a file can trust it. All paths go through
`etils.epath`, so `gs://` works wherever a local path does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
from etils import epath
from PIL import Image

from imagen_jax import files as files_lib
from imagen_jax.errors import UserError
from imagen_jax.images import make_grid, read_image, write_png  # noqa: F401 (sampling's API)

INDEX_FILE = "index.jsonl"
GRID_FILE = "grid.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------------------------------
# Inputs.



def read_prompts(path: str | os.PathLike) -> list[str]:
  """One prompt per line; surrounding whitespace is stripped and blank lines are skipped.

  `prompt_index` in the outputs counts the non-blank lines from 0.
  """
  path = epath.Path(path)
  if not path.exists():
    raise UserError(f"prompts file {os.fspath(path)!r} does not exist")
  prompts = [line.strip() for line in path.read_text().splitlines()]
  prompts = [p for p in prompts if p]
  if not prompts:
    raise UserError(f"prompts file {os.fspath(path)!r} is empty; write one prompt per line")
  return prompts


def list_images(path: str | os.PathLike) -> list[epath.Path]:
  """An image file, or the image files of a folder sorted by name."""
  path = epath.Path(path)
  if not path.exists():
    raise UserError(f"start image {os.fspath(path)!r} does not exist")
  if path.is_dir():
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.name)
    if not files:
      raise UserError(f"start image folder {os.fspath(path)!r} holds no image "
                      f"({', '.join(IMAGE_SUFFIXES)})")
    return files
  return [path]


def load_start_images(path: str | os.PathLike,
                      prompts: Sequence[str] | None) -> tuple[list[np.ndarray], list[str]]:
  """Start images for super-resolution and the prompt that goes with each.

  Pairing: a caption file beside an image (`cat.png` + `cat.txt`) gives its prompt;
  otherwise the i-th non-blank line of the prompts file goes with the i-th image in name
  order. Returns (images, prompts), one prompt per image.
  """
  files = list_images(path)
  captions = []
  for f in files:
    txt = f.with_suffix(".txt")
    captions.append(txt.read_text().strip() if txt.exists() else None)
  if all(c is not None for c in captions):
    paired = captions
  elif prompts is None:
    missing = [f.name for f, c in zip(files, captions) if c is None]
    raise UserError(f"no prompt for start image(s) {missing[:3]}: pass --prompts=FILE "
                    "(line i goes with the i-th image by name) or put a caption file "
                    "NAME.txt beside each image")
  else:
    if len(prompts) != len(files):
      raise UserError(f"{len(prompts)} prompts for {len(files)} start images; the prompts "
                      "file must have one line per image (line i goes with the i-th image "
                      "sorted by name)")
    paired = [c if c is not None else p for c, p in zip(captions, prompts)]
  return [read_image(f) for f in files], paired


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops to a square and resizes to `size` (bicubic, antialiased) if needed."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise UserError(f"start images must be uint8 [H, W, 3]; got {image.dtype} "
                    f"{image.shape}")
  h, w = image.shape[:2]
  if h != w:
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = image[top:top + s, left:left + s]
  if image.shape[0] != size:
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
  return image


# ---------------------------------------------------------------------------------------
# PNGs (written atomically by images.write_png) and the grid (images.make_grid).


def image_file(stage: int, prompt_index: int, sample: int) -> str:
  """The path of one image relative to the output directory."""
  return f"stage{stage}/{prompt_index:05d}_{sample}.png"


# ---------------------------------------------------------------------------------------
# index.jsonl.


def row_key(row: dict) -> tuple[int, int, int]:
  return (int(row["stage"]), int(row["prompt_index"]), int(row["sample"]))


def _write_rows(path: epath.Path, rows: Iterable[dict]) -> None:
  files_lib.write_atomic(path, files_lib.jsonl_text(rows))


def part_file(process_index: int, process_count: int) -> str:
  return f"index.part-{process_index:05d}-of-{process_count:05d}.jsonl"


class IndexWriter:
  """Appends index rows, each once, to `index.jsonl` (or a per-process part file).

  With one process, rows go straight into DIR/index.jsonl. With several, each
  process appends to its own part file, and process 0 merges them with `merge_index` after
  a barrier. Rows already in the index or any part file are never written twice, so a
  resumed job completes the index without duplicates.
  """

  def __init__(self, out_dir: str | os.PathLike, process_index: int = 0,
               process_count: int = 1):
    self.out_dir = epath.Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    name = INDEX_FILE if process_count == 1 else part_file(process_index, process_count)
    self.path = self.out_dir / name
    self._keys = set()
    for path in [self.out_dir / INDEX_FILE, *self._part_files()]:
      rows, torn = files_lib.read_jsonl(path)
      self._keys.update(row_key(r) for r in rows)
      if torn and path == self.path:
        _write_rows(path, rows)  # drop the torn line before appending after it

  def _part_files(self) -> list[epath.Path]:
    return sorted(self.out_dir.glob("index.part-*.jsonl"))

  def __contains__(self, key: tuple[int, int, int]) -> bool:
    return key in self._keys

  def add(self, rows: Sequence[dict]) -> int:
    """Appends the rows not yet present; returns how many were written."""
    new = [r for r in rows if row_key(r) not in self._keys]
    if not new:
      return 0
    text = files_lib.jsonl_text(new)
    if "://" in os.fspath(self.path):
      # Object stores have no append: rewrite the file (sampling writes few, large batches).
      old = files_lib.read_jsonl(self.path).rows
      _write_rows(self.path, [*old, *new])
    else:
      with open(self.path, "a") as f:
        f.write(text)
        f.flush()
    self._keys.update(row_key(r) for r in new)
    return len(new)


def merge_index(out_dir: str | os.PathLike) -> int:
  """Merges index.jsonl and every part file into index.jsonl, sorted and without duplicates.

  Run by one process only (process 0), after every process has finished writing. Returns
  the number of rows.
  """
  out_dir = epath.Path(out_dir)
  parts = sorted(out_dir.glob("index.part-*.jsonl"))
  merged = {}
  for path in [out_dir / INDEX_FILE, *parts]:
    for row in files_lib.read_jsonl(path).rows:
      merged.setdefault(row_key(row), row)
  _write_rows(out_dir / INDEX_FILE, [merged[k] for k in sorted(merged)])
  for path in parts:
    path.unlink()
  return len(merged)


def read_index(out_dir: str | os.PathLike) -> list[dict]:
  """The rows of out_dir/index.jsonl, in file order.

  UserError when the file is missing or has a line that is not JSON (a job cut short:
  rerunning imagen-sample with the same --out_dir completes it).
  """
  path = epath.Path(out_dir) / INDEX_FILE
  if not path.exists():
    raise UserError(f"{os.fspath(path)!r} is missing; imagen-sample writes it next to the "
                    "images (one row per image: prompt, stage, file)")
  rows, torn = files_lib.read_jsonl(path)
  if torn:
    raise UserError(f"{os.fspath(path)!r} has a line that is not JSON (a sampling job cut "
                    "short?); rerun imagen-sample with the same --out_dir to complete it")
  return rows
