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
import json
import os

import numpy as np
from etils import epath

from imagen_jax import weights
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
