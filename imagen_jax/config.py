"""Gin configuration helpers for library code and CLIs alike, as t5x keeps its gin_utils.py.

- `parse_gin(files, bindings, search_paths)`: files then bindings, t5x's order. A relative
  file is looked up in the current directory, then in every extra search path, then in the
  project's `gin_configs/`, so `models/tiny.gin` works from anywhere. An unknown or
  misspelled binding raises `UserError` with gin's message, which names the file and line.
- `write_operative_config(dir)`: every value a run actually used, to `dir/config.gin`.
- `model_gin_str()`: the model's part of the operative config (MODEL_DIR/model.gin).
- `require_macros(...)`, `macro(name)`, `binding(name)`: reading gin's state.

Command-line flags and `run()` live in `imagen_jax.cli.gin_utils`; nothing here touches
global logging beyond the duration of a parse.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import gin
from etils import epath

from imagen_jax.errors import UserError

# gin_configs/ sits next to the package in a checkout (and in an editable install).
GIN_CONFIGS_DIR = epath.Path(__file__).parent.parent / "gin_configs"


class _DropGinIncludeProbes(logging.Filter):
  """gin tries every include as a Python package path first, logging each probe on the
  root logger (INFO) and "Path not found" (ERROR) when it is not one, even though it then
  finds the file in the search paths. Those lines are noise; the second looks like a
  failure."""

  def filter(self, record: logging.LogRecord) -> bool:
    if not record.pathname.endswith(os.path.join("gin", "resource_reader.py")):
      return True
    return record.levelno >= logging.WARNING and not str(record.msg).startswith(
        "Path not found")


@contextlib.contextmanager
def _quiet_include_probes():
  """The probe filter on the root logger while gin parses, and only then."""
  root, quiet = logging.getLogger(), _DropGinIncludeProbes()
  root.addFilter(quiet)
  try:
    yield
  finally:
    root.removeFilter(quiet)


def search_paths(extra: Sequence[str] = ()) -> list[epath.Path]:
  return [epath.Path(os.getcwd()), *[epath.Path(p) for p in extra], GIN_CONFIGS_DIR]


def resolve_gin_file(name: str, extra_search_paths: Sequence[str] = ()) -> str:
  """Finds a gin file in the search paths; raises UserError naming where it looked."""
  path = epath.Path(name)
  if path.is_absolute() or "://" in name:
    if path.exists():
      return os.fspath(path)
    raise UserError(f"gin file {name!r} does not exist")
  tried = []
  for root in search_paths(extra_search_paths):
    candidate = root / name
    if candidate.exists():
      return os.fspath(candidate)
    tried.append(os.fspath(root))
  raise UserError(f"gin file {name!r} not found in {tried}; pass a full path or add "
                  "--gin_search_paths=DIR")


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
              gin_search_paths: Sequence[str] = (), *, finalize: bool = True) -> None:
  """Parses gin files then bindings, as t5x does. Errors become UserError with gin's text."""
  for root in search_paths(gin_search_paths):
    gin.add_config_file_search_path(os.fspath(root))
  files = [resolve_gin_file(f, gin_search_paths) for f in gin_files]
  try:
    with _quiet_include_probes():
      gin.parse_config_files_and_bindings(files, list(gin_bindings),
                                          finalize_config=finalize)
  except (ValueError, KeyError, SyntaxError, NameError, ImportError, IOError) as e:
    # gin's messages already carry the file and line ("In file foo.gin, line 3").
    raise UserError(f"gin config error: {e}") from e


def write_operative_config(directory: str | os.PathLike, name: str = "config.gin") -> str:
  """Writes gin's operative config (every value actually used) to directory/name."""
  path = epath.Path(directory) / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(gin.operative_config_str())
  return os.fspath(path)


def macro(name: str, default: Any = None) -> Any:
  """The value bound to gin macro `name`, or `default` when it is unbound."""
  try:
    return gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    return default


def binding(name: str, default: Any = None) -> Any:
  """The value bound to `configurable.parameter`, or `default` when it is unbound."""
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


def require_macros(*names: str) -> None:
  """Raises UserError unless every named gin macro is bound (e.g. MODEL_DIR)."""
  missing = []
  for name in names:
    try:
      gin.query_parameter(f"{name}/macro.value")
    except ValueError:
      missing.append(name)
  if missing:
    raise UserError("required gin macro(s) not set: " + ", ".join(missing) + "; set each "
                    "in a gin file or with --gin.NAME=VALUE (strings need quotes: "
                    "--gin.MODEL_DIR=\"'runs/x'\")")


# ----------------------------------------------------------------------------- model.gin

_BLOCK = re.compile(r"^# Parameters for (?P<name>[^:]+):$")


def _is_model_configurable(name: str) -> bool:
  selector = name.split("/")[-1]
  try:
    configurable = gin.config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
  except Exception:  # noqa: BLE001  (ambiguous or unknown names are not model settings)
    return False
  if configurable is None:
    return False
  module = getattr(configurable.wrapped, "__module__", "") or ""
  return module.startswith("imagen_jax.nn")


def model_gin_str(operative: str | None = None) -> str:
  """The model's part of the operative config: every `imagen_jax.nn` configurable's block,
  plus the macros those blocks use. Parsed on top of any config, it rebuilds the model."""
  operative = gin.operative_config_str() if operative is None else operative
  blocks, current, macros = [], None, {}
  section = None
  for line in operative.splitlines():
    m = _BLOCK.match(line)
    if m:
      section = "params"
      current = [m.group("name"), [line]]
      blocks.append(current)
      continue
    if line.startswith("# Macros:"):
      section = "macros"
      continue
    if section == "macros":
      mm = re.match(r"^([A-Za-z_][\w.]*)\s*=", line)
      if mm:
        macros[mm.group(1)] = line
      elif line.strip() and not line.startswith("#") and macros:
        last = list(macros)[-1]
        macros[last] += "\n" + line
    elif section == "params" and current is not None:
      current[1].append(line)
  kept = ["\n".join(lines).rstrip() for name, lines in blocks if _is_model_configurable(name)]
  body = "\n\n".join(kept)
  used = [text for name, text in macros.items() if re.search(r"%" + re.escape(name) + r"\b",
                                                             body)]
  header = "# The model's gin config, written by imagen-train.\nimport imagen_jax.nn\n\n"
  return header + ("\n".join(used) + "\n\n" if used else "") + body + "\n"
