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

Parsing itself (files, search paths, the operative config) is `imagen_jax.config`; this
module only adds the command-line flags and `run`.

`run(main)` wraps a CLI entry point: `UserError` and gin's parse errors become one line on
stderr and exit status 2, never a bare traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from imagen_jax import config
from imagen_jax.errors import UserError

# The gin helpers live in the library (imagen_jax.config); CLIs may reach them from here.
parse_gin = config.parse_gin
require_macros = config.require_macros
write_operative_config = config.write_operative_config


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


def apply_gin_args(args: argparse.Namespace, *, finalize: bool = True) -> None:
  parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths, finalize=finalize)


def _exit_now_if_distributed(code: int) -> None:
  """With several processes, a normal exit waits at JAX's shutdown barrier for peers that
  are usually stuck in a collective with this one; exit at once instead. (Only when the
  multi-host module is loaded: importing it here would start jax in every CLI.)"""
  hosts = sys.modules.get("imagen_jax.parallel.hosts")
  if hosts is not None:
    hosts.fail_fast_exit(code)


_GIN_CALL_TRAILER = "\n  In call to configurable "


def one_line(message: str) -> str:
  """An error message as one line: without the trailer gin appends to any exception raised
  inside a configurable ("In call to configurable 'train' (<function ...>)", which names
  no fix), and with the lines of gin's parse errors (file, line, the text and a caret
  under it) joined by spaces."""
  message = message.split(_GIN_CALL_TRAILER, 1)[0]
  parts = [line.strip() for line in message.splitlines()]
  return " ".join(p for p in parts if p and set(p) != {"^"})


def run(main: Callable[[Sequence[str] | None], int | None],
        argv: Sequence[str] | None = None) -> int:
  """Runs a CLI main; expected errors print one line to stderr and return 2."""
  try:
    return main(argv) or 0
  except UserError as e:
    print(f"error: {one_line(str(e))}", file=sys.stderr)
    _exit_now_if_distributed(2)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
