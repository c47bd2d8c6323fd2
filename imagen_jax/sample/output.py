"""Files that sampling reads and writes: prompts, start images, PNGs, the grid, index.jsonl.

Layout of an output directory (issue 6):

  DIR/stage{k}/{prompt_index:05d}_{sample}.png   one PNG per sample per stage (k = 0: base)
  DIR/grid.png                                   the last stage's images with their prompts
  DIR/index.jsonl                                one JSON object per line and per image
  DIR/config.gin                                 the operative gin config (the CLI writes it)

Every file is written to a temporary name and renamed, so a killed job never leaves a
truncated PNG behind, and a rerun that finds a file can trust it. All paths go through
`etils.epath`, so `gs://` works wherever a local path does.
"""

from __future__ import annotations

import io
import json
import os
import textwrap
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from imagen_jax.errors import UserError

INDEX_FILE = "index.jsonl"
GRID_FILE = "grid.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------------------------------
# Inputs.


DRAWBENCH = "drawbench"  # the name that selects the packaged DrawBench prompts


def read_prompts(path: str | os.PathLike) -> list[str]:
  """One prompt per line; surrounding whitespace is stripped and blank lines are skipped.

  `prompt_index` in the outputs counts the non-blank lines from 0. The name `drawbench`
  gives DrawBench's 200 prompts (`imagen_jax.eval.drawbench`); a file of that name is
  read as `./drawbench`.
  """
  if os.fspath(path) == DRAWBENCH:
    from imagen_jax.eval import drawbench
    return drawbench.prompts()
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


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Any image file as uint8 [H, W, 3] RGB."""
  with epath.Path(path).open("rb") as f:
    return np.asarray(Image.open(f).convert("RGB"))


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
# PNGs, written atomically.


def image_file(stage: int, prompt_index: int, sample: int) -> str:
  """The path of one image relative to the output directory."""
  return f"stage{stage}/{prompt_index:05d}_{sample}.png"


def _write_atomic(path: epath.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  tmp.write_bytes(data)
  tmp.replace(path)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes uint8 [H, W, 3] as PNG through a temporary file and a rename."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  _write_atomic(epath.Path(path), buf.getvalue())


def read_png(path: str | os.PathLike) -> np.ndarray:
  return read_image(path)


# ---------------------------------------------------------------------------------------
# The grid.


def make_grid(images: Sequence[np.ndarray], captions: Sequence[str], *,
              cell_size: int | None = None, columns: int | None = None,
              max_lines: int = 6) -> Image.Image:
  """Images in rows, each with its caption (wrapped) in a white band under it.

  Cells are the image size clamped to [128, 256] px (so a caption fits under a 16 px image):
  small images are enlarged with nearest-neighbour sampling (pixels stay visible), large
  ones shrunk.
  """
  if not images:
    raise ValueError("make_grid needs at least one image")
  size = images[0].shape[0]
  cell = min(max(size, 128), 256) if cell_size is None else cell_size
  columns = columns or int(np.ceil(np.sqrt(len(images))))
  rows = int(np.ceil(len(images) / columns))
  font = ImageFont.load_default(size=max(11, cell // 12))
  chars_per_line = max(8, int(cell / (font.size * 0.55)))
  wrapped = []
  for caption in captions:
    lines = textwrap.wrap(caption, chars_per_line) or [""]
    if len(lines) > max_lines:
      lines = lines[:max_lines - 1] + [lines[max_lines - 1][:chars_per_line - 3] + "..."]
    wrapped.append(lines)
  line_h = font.size + 3
  band = 6 + line_h * max(len(w) for w in wrapped)
  pad = 4
  grid = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + band + pad) + pad),
                   "white")
  draw = ImageDraw.Draw(grid)
  for i, (image, lines) in enumerate(zip(images, wrapped)):
    r, c = divmod(i, columns)
    x, y = pad + c * (cell + pad), pad + r * (cell + band + pad)
    tile = Image.fromarray(np.asarray(image, np.uint8))
    if tile.size != (cell, cell):
      tile = tile.resize((cell, cell), Image.NEAREST if cell > tile.size[0] else Image.BICUBIC)
    grid.paste(tile, (x, y))
    for j, line in enumerate(lines):
      draw.text((x + 2, y + cell + 3 + j * line_h), line, fill="black", font=font)
  return grid


def write_grid(path: str | os.PathLike, grid: Image.Image) -> None:
  buf = io.BytesIO()
  grid.save(buf, format="PNG")
  _write_atomic(epath.Path(path), buf.getvalue())


# ---------------------------------------------------------------------------------------
# index.jsonl.


def row_key(row: dict) -> tuple[int, int, int]:
  return (int(row["stage"]), int(row["prompt_index"]), int(row["sample"]))


def _read_rows(path: epath.Path) -> tuple[list[dict], bool]:
  """Rows of a JSONL file; the flag says whether a torn last line was dropped."""
  if not path.exists():
    return [], False
  text = path.read_text()
  rows, torn = [], False
  for line in text.splitlines(keepends=True):
    if not line.endswith("\n"):  # a write cut short by a kill
      torn = True
      break
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        torn = True
  return rows, torn


def _write_rows(path: epath.Path, rows: Iterable[dict]) -> None:
  _write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def part_file(process_index: int, process_count: int) -> str:
  return f"index.part-{process_index:05d}-of-{process_count:05d}.jsonl"


class IndexWriter:
  """Appends index rows, each once, to `index.jsonl` (or a per-process part file).

  With one process, rows go straight into DIR/index.jsonl. With several (issue 7), each
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
      rows, torn = _read_rows(path)
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
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in new)
    if "://" in os.fspath(self.path):
      # Object stores have no append: rewrite the file (sampling writes few, large batches).
      old, _ = _read_rows(self.path)
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
    for row in _read_rows(path)[0]:
      merged.setdefault(row_key(row), row)
  _write_rows(out_dir / INDEX_FILE, [merged[k] for k in sorted(merged)])
  for path in parts:
    path.unlink()
  return len(merged)


def read_index(out_dir: str | os.PathLike) -> list[dict]:
  return _read_rows(epath.Path(out_dir) / INDEX_FILE)[0]
