"""The gin launcher every CLI shares, in t5x's conventions (t5x/gin_utils.py).

  imagen-train --gin_file=a.gin --gin_file=b.gin --gin.TRAIN_STEPS=100 \
      --gin_bindings="UNet.dropout = 0.1" --gin_search_paths=my/configs

- `--gin_file` may repeat; later files override earlier ones. A relative path is looked up
  in the current directory, then in every `--gin_search_paths` entry, then in the
  project's `gin_configs/`, so `--gin_file=models/tiny.gin` works from anywhere.
- `--gin.NAME=VALUE` is shorthand for `--gin_bindings="NAME = VALUE"`; bindings apply after
  all files, in command-line order.
- An unknown or misspelled binding stops the run before any work with gin's message,
  which names the file and line.

`run(main)` wraps a CLI entry point: `UserError` and gin's parse errors become one line on
stderr and exit status 2, never a bare traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

import gin
from etils import epath

from imagen_jax.errors import UserError

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


logging.getLogger().addFilter(_DropGinIncludeProbes())

# gin_configs/ sits next to the package in a checkout (and in an editable install).
GIN_CONFIGS_DIR = epath.Path(__file__).parent.parent.parent / "gin_configs"


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
  """Adds --gin_file, --gin_bindings and --gin_search_paths to a parser."""
  group = parser.add_argument_group("gin")
  group.add_argument("--gin_file", action="append", default=[],
                     help="Gin config file; may repeat, later files override earlier.")
  group.add_argument("--gin_bindings", action="append", default=[],
                     help="A gin binding 'NAME = VALUE'; may repeat. --gin.NAME=VALUE "
                     "is the same.")
  group.add_argument("--gin_search_paths", action="append", default=[],
                     help="Extra directories in which to look for gin files and includes.")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Turns `--gin.NAME=VALUE` (or `--gin.NAME VALUE`) into `--gin_bindings=NAME = VALUE`."""
  out = []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--gin."):
      body = arg[len("--gin."):]
      if "=" in body:
        name, value = body.split("=", 1)
      else:
        name = body
        value = next(it, None)
        if value is None:
          raise UserError(f"{arg} has no value; write it as --gin.{name}=VALUE")
      out.append(f"--gin_bindings={name} = {value}")
    else:
      out.append(arg)
  return out


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
  """Parses argv (default sys.argv[1:]) after rewriting the --gin.NAME=VALUE shorthand."""
  argv = sys.argv[1:] if argv is None else list(argv)
  return parser.parse_args(rewrite_gin_args(argv))


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
    gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=finalize)
  except (ValueError, KeyError, SyntaxError, NameError, ImportError, IOError) as e:
    # gin's messages already carry the file and line ("In file foo.gin, line 3").
    raise UserError(f"gin config error: {e}") from e


def apply_gin_args(args: argparse.Namespace, *, finalize: bool = True) -> None:
  parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths, finalize=finalize)


def write_operative_config(directory: str | os.PathLike, name: str = "config.gin") -> str:
  """Writes gin's operative config (every value actually used) to directory/name."""
  path = epath.Path(directory) / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(gin.operative_config_str())
  return os.fspath(path)


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


def _exit_now_if_distributed(code: int) -> None:
  """With several processes, a normal exit waits at JAX's shutdown barrier for peers that
  are usually stuck in a collective with this one; exit at once instead. (Only when the
  multi-host module is loaded: importing it here would start jax in every CLI.)"""
  hosts = sys.modules.get("imagen_jax.parallel.hosts")
  if hosts is not None:
    hosts.fail_fast_exit(code)


def run(main: Callable[[Sequence[str] | None], int | None],
        argv: Sequence[str] | None = None) -> int:
  """Runs a CLI main; expected errors print one line to stderr and return 2."""
  try:
    return main(argv) or 0
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    _exit_now_if_distributed(2)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
