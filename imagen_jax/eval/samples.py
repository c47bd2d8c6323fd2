"""Reading an `imagen-sample` output directory: its index.jsonl rows and their images.

`stage_rows(dir, stage=None)` gives the rows of one stage (the last one, the full
resolution, by default), sorted by (prompt_index, sample); `load_image` reads one image.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from etils import epath

from imagen_jax.errors import UserError
from imagen_jax.sample import output


def stage_rows(samples_dir: str | os.PathLike, stage: int | None = None
               ) -> tuple[int, list[dict[str, Any]]]:
  """(stage, rows of index.jsonl at that stage); `stage=None` means the last stage."""
  samples_dir = epath.Path(samples_dir)
  if not samples_dir.is_dir():
    raise UserError(f"samples directory {os.fspath(samples_dir)!r} does not exist; pass the "
                    "--out_dir of imagen-sample")
  rows = output.read_index(samples_dir)
  if not rows:
    raise UserError(f"{os.fspath(samples_dir / output.INDEX_FILE)!r} is missing or empty; "
                    "pass a directory written by imagen-sample")
  stages = sorted({int(row["stage"]) for row in rows})
  if stage is None:
    stage = stages[-1]
  if stage not in stages:
    raise UserError(f"--stage={stage} is not in {os.fspath(samples_dir)!r}; it has stages "
                    f"{stages}")
  chosen = [row for row in rows if int(row["stage"]) == stage]
  return stage, sorted(chosen, key=output.row_key)


def load_image(samples_dir: str | os.PathLike, row: dict[str, Any]) -> np.ndarray:
  """The uint8 [H, W, 3] image of one index row."""
  path = epath.Path(samples_dir) / row["file"]
  try:
    return output.read_image(path)
  except (OSError, ValueError) as e:  # missing file, or PIL cannot identify it
    raise UserError(f"cannot read image {os.fspath(path)!r} listed in index.jsonl: {e}") from e
