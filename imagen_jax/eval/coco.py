"""The zero-shot COCO protocol's captions: N captions drawn once, with a fixed seed.

Imagen (Saharia et al. 2022, §4.1) and GLIDE, DALL-E 2 and DeepFloyd IF report zero-shot
FID-30K on MS-COCO: 30,000 captions drawn at random from the validation set, one image
sampled per caption, compared against the real validation images at the same resolution.
The draw is a pure function of (annotation file, N, seed): annotations are put in the
order of their `id` before a `numpy.random.default_rng(seed)` permutation picks N of
them, so every host and every rerun draws the same captions.

The annotation file is COCO's `captions_val2014.json` (or 2017), given by path:
`{"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}]}`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath

from imagen_jax import files, weights
from imagen_jax.data import preprocess
from imagen_jax.eval import images as images_lib
from imagen_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Caption:
  annotation_id: int
  image_id: int
  file_name: str
  caption: str


def read_captions(annotations: str | os.PathLike) -> list[Caption]:
  """Every caption of a COCO captions file, ordered by annotation id."""
  data = weights.read_json(annotations, "a COCO captions file (captions_val2014.json)")
  try:
    files = {image["id"]: image.get("file_name", "") for image in data["images"]}
    rows = [Caption(int(a["id"]), int(a["image_id"]), files.get(a["image_id"], ""),
                    " ".join(str(a["caption"]).split())) for a in data["annotations"]]
  except (KeyError, TypeError) as e:
    raise UserError(f"{os.fspath(annotations)} is not a COCO captions file (needs 'images' "
                    f"and 'annotations' with id, image_id, caption): missing {e}") from e
  rows = [row for row in rows if row.caption]
  if not rows:
    raise UserError(f"{os.fspath(annotations)} holds no captions")
  return sorted(rows, key=lambda row: row.annotation_id)


def draw_captions(captions: list[Caption], num: int, seed: int = 0) -> list[Caption]:
  """`num` captions without replacement, a pure function of (captions, num, seed)."""
  if not 1 <= num <= len(captions):
    raise UserError(f"--num={num}: the file has {len(captions)} captions; draw between 1 "
                    f"and {len(captions)}")
  order = np.random.default_rng(seed).permutation(len(captions))[:num]
  return [captions[i] for i in order]


def write_prompts(path: str | os.PathLike, drawn: list[Caption]) -> None:
  """The prompts file `imagen-sample --prompts` reads, plus PATH.json with the COCO ids."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(row.caption + "\n" for row in drawn))
  meta = [dataclasses.asdict(row) for row in drawn]
  epath.Path(os.fspath(path) + ".json").write_text(json.dumps(meta, indent=0) + "\n")


class CroppedImages(images_lib.ImageFiles):
  """Image files read as the training data is prepared: the central square, resized to
  `resolution` (`data.preprocess.resize_center_crop`), so real and sampled images are
  compared at the same resolution."""

  def __init__(self, files: Sequence[epath.Path], resolution: int):
    super().__init__(files)
    self.resolution = resolution

  def _subset(self, files):
    return CroppedImages(files, self.resolution)

  def _read(self, file):
    from PIL import Image
    with file.open("rb") as f:
      return preprocess.resize_center_crop(Image.open(f), self.resolution)


def reference_images(images_dir: str | os.PathLike, resolution: int,
                     annotations: str | os.PathLike | None = None) -> CroppedImages:
  """The real images of a folder (with `annotations`: only the files it names, such as
  COCO's validation images), centre-cropped and resized to `resolution`."""
  if resolution < 8:
    raise UserError(f"--resolution={resolution}: give the sampled images' side, e.g. 64")
  images, _ = images_lib.load_image_set(images_dir)
  files = images.files
  if annotations is not None:
    wanted = {row.file_name for row in read_captions(annotations)}
    files = [f for f in files if f.name in wanted]
    if len(files) < len(wanted):
      raise UserError(f"{os.fspath(images_dir)} holds {len(files)} of the {len(wanted)} "
                      f"images that {os.fspath(annotations)} names; point --images at "
                      "the matching COCO image folder (e.g. val2014/)")
  return CroppedImages(files, resolution)


def cached_statistics(out: str | os.PathLike, images: CroppedImages,
                      compute: Callable[[CroppedImages], tuple[np.ndarray, np.ndarray]]
                      ) -> tuple[tuple[np.ndarray, np.ndarray], bool]:
  """((mu, sigma), was_cached): the statistics in `out` when it holds those of the same
  resolution and image count, else `compute(images)` saved to `out` (pytorch-fid's
  `mu`, `sigma`, plus `resolution` and `count`, which pytorch-fid ignores)."""
  out = epath.Path(out)
  if out.exists():
    with out.open("rb") as f:
      saved = dict(np.load(f))
    found = (int(saved.get("resolution", -1)), int(saved.get("count", -1)))
    if found != (images.resolution, len(images)):
      raise UserError(f"{os.fspath(out)} holds statistics of {found[1]} images at "
                      f"{found[0]} px, not {len(images)} at {images.resolution} px; "
                      "delete it or pass another --out")
    return (saved["mu"], saved["sigma"]), True
  mu, sigma = compute(images)
  buf = io.BytesIO()
  np.savez(buf, mu=mu, sigma=sigma, resolution=images.resolution, count=len(images))
  files.write_atomic(out, buf.getvalue())
  return (mu, sigma), False
