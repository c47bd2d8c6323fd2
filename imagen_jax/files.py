"""File helpers every subpackage shares: atomic writes and JSON-lines files.

All paths go through `etils.epath`, so `gs://` works wherever a local path does.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from typing import NamedTuple

from etils import epath


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to a temporary file next to `path`, then renames it over `path`.

  A reader (or a job resumed after a kill) finds the old file or the new one, never a
  truncated one. The temporary name is unique, so processes writing the same path at once
  do not clobber each other's temporary file.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(path)


class JsonLines(NamedTuple):
  rows: list[dict]
  torn: bool  # a line was dropped: cut short by a kill, or not JSON


def read_jsonl(path: str | os.PathLike) -> JsonLines:
  """The JSON objects of a file with one per line; blank lines are skipped.

  A last line without its newline (a write cut short by a kill) and any line that is not
  JSON are dropped, and `torn` says so. A missing file reads as no rows.
  """
  path = epath.Path(path)
  if not path.exists():
    return JsonLines([], False)
  rows, torn = [], False
  for line in path.read_text().splitlines(keepends=True):
    if not line.endswith("\n"):
      torn = True
      break
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        torn = True
  return JsonLines(rows, torn)


def jsonl_text(rows: Iterable[dict]) -> str:
  """Rows as JSON lines (keys sorted, so equal rows give equal bytes)."""
  return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
