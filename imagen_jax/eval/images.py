"""Image sets that evaluations read: a folder of images, or an `imagen-sample` output.

  images, prompts = load_image_set("runs/samples")           # last stage, with prompts
  images, prompts = load_image_set("coco_val_256/")          # every image, prompts None

- A directory with `index.jsonl` is an `imagen-sample` output: its rows of one stage (the
  last by default, or `stage=K`) in index order, with their prompts.
- Any other directory is a folder of images (png, jpg, ...), searched recursively and
  sorted by path; it has no prompts.

`images` is a lazy sequence: `images[i]` reads the file as uint8 [H, W, 3] RGB, so a set
of 30,000 images is never held in memory at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from imagen_jax.errors import UserError
from imagen_jax.eval import samples
from imagen_jax.sample import output


class ImageFiles(Sequence):
  """A list of image files that reads each one (uint8 [H, W, 3]) when indexed."""

  def __init__(self, files: Sequence[epath.Path]):
    self.files = list(files)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self._subset(self.files[i])
    try:
      return self._read(self.files[i])
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
      raise UserError(f"cannot read image {os.fspath(self.files[i])}: {e}") from e

  def _subset(self, files: Sequence[epath.Path]) -> "ImageFiles":
    return ImageFiles(files)

  def _read(self, file: epath.Path) -> np.ndarray:
    return output.read_image(file)


def _image_files(folder: epath.Path) -> list[epath.Path]:
  """Image files under `folder`, recursively (epath has no rglob for object stores)."""
  found = []
  for p in folder.iterdir():
    if p.is_dir():
      found.extend(_image_files(p))
    elif p.suffix.lower() in output.IMAGE_SUFFIXES:
      found.append(p)
  return found


def load_image_set(path: str | os.PathLike, stage: int | None = None
                   ) -> tuple[ImageFiles, list[str] | None]:
  """(images, prompts) of an `imagen-sample` output (prompts from index.jsonl) or of a
  folder of images (prompts None). `stage` picks a cascade stage of a sample output."""
  path = epath.Path(path)
  if not path.is_dir():
    raise UserError(f"{os.fspath(path)} is not a directory; give a folder of images or "
                    "an imagen-sample output directory")
  if (path / output.INDEX_FILE).exists():
    _, rows = samples.stage_rows(path, stage)
    return ImageFiles([path / r["file"] for r in rows]), [r["prompt"] for r in rows]
  if stage is not None:
    raise UserError(f"--stage={stage} needs an imagen-sample output, but "
                    f"{os.fspath(path)} has no {output.INDEX_FILE}")
  files = sorted(_image_files(path), key=os.fspath)
  if not files:
    raise UserError(f"{os.fspath(path)} holds no images ({', '.join(output.IMAGE_SUFFIXES)},"
                    " searched recursively)")
  return ImageFiles(files), None


def stack(images: Sequence[np.ndarray], where: str) -> np.ndarray:
  """uint8 [N, H, W, 3] from images that must share one size (`where` names the set)."""
  shapes = {np.shape(im) for im in images}
  if len(shapes) > 1:
    raise UserError(f"images of {where} have different sizes {sorted(shapes)[:3]}; "
                    "resize them to one size first")
  return np.stack(images).astype(np.uint8)
