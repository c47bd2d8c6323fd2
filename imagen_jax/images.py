"""Image files and grids: PNG reading and (atomic) writing, and the grid of images that
sampling (grid.png, with captions) and training previews (without) both write."""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from imagen_jax import files


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Any image file as uint8 [H, W, 3] RGB."""
  with epath.Path(path).open("rb") as f:
    return np.asarray(Image.open(f).convert("RGB"))


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
  """uint8 [H, W, C] (C = 1, 3 or 4) or a PIL image, encoded as PNG."""
  if not isinstance(image, Image.Image):
    image = np.asarray(image, np.uint8)
    image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray | Image.Image) -> None:
  """Writes uint8 [H, W, 3] (or a PIL image) as PNG through a temporary file and a rename."""
  files.write_atomic(path, png_bytes(image))


def _wrap_captions(captions: Sequence[str], chars_per_line: int,
                   max_lines: int) -> list[list[str]]:
  wrapped = []
  for caption in captions:
    lines = textwrap.wrap(caption, chars_per_line) or [""]
    if len(lines) > max_lines:
      lines = lines[:max_lines - 1] + [lines[max_lines - 1][:chars_per_line - 3] + "..."]
    wrapped.append(lines)
  return wrapped


def make_grid(images: Sequence[np.ndarray], captions: Sequence[str] | None = None, *,
              cell_size: int | None = None, columns: int | None = None, pad: int = 4,
              max_lines: int = 6) -> Image.Image:
  """Images in rows on white, `pad` px apart, each with its caption (wrapped) in a band
  under it when `captions` is given.

  Cells are `cell_size` px, by default the image size clamped to [128, 256] px (so a
  caption fits under a 16 px image): smaller images are enlarged with nearest-neighbour
  sampling (pixels stay visible, an integer factor repeats each pixel exactly), larger ones
  shrunk. `columns` defaults to a square layout.
  """
  if not len(images):
    raise ValueError("make_grid needs at least one image")
  size = images[0].shape[0]
  cell = min(max(size, 128), 256) if cell_size is None else cell_size
  columns = columns or int(np.ceil(np.sqrt(len(images))))
  rows = int(np.ceil(len(images) / columns))
  font = line_h = None
  wrapped = [[] for _ in images]
  band = 0
  if captions is not None:
    font = ImageFont.load_default(size=max(11, cell // 12))
    wrapped = _wrap_captions(captions, max(8, int(cell / (font.size * 0.55))), max_lines)
    line_h = font.size + 3
    band = 6 + line_h * max(len(w) for w in wrapped)
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
