"""`imagen-eval`: evaluations of sampled images.

  imagen-eval shapesbench --samples=out/

`shapesbench` scores every image listed in DIR/index.jsonl (the layout `imagen-sample`
writes) against its prompt with the ShapesBench checker, prints one table per stage and
writes DIR/shapesbench.json. Prompts outside the shapes grammar are skipped and counted.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from imagen_jax.cli import gin_utils


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="imagen-eval", description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  bench = commands.add_parser(
      "shapesbench", help="score samples of shapes prompts (colour, relation, shape)",
      description="Scores DIR/index.jsonl's images against their prompts; writes "
      "DIR/shapesbench.json.")
  bench.add_argument("--samples", required=True, metavar="DIR",
                     help="a directory written by imagen-sample (with index.jsonl)")
  bench.add_argument("--no_progress", action="store_true", help="hide the progress bar")
  return parser


def _main(argv: Sequence[str] | None = None) -> int:
  args = gin_utils.parse_args(_parser(), argv)
  if args.command == "shapesbench":
    from imagen_jax.eval import shapesbench
    results = shapesbench.evaluate_dir(args.samples, progress=not args.no_progress)
    print(shapesbench.format_table(results), end="")
    print(f"wrote {os.path.join(args.samples, 'shapesbench.json')}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return gin_utils.run(_main, argv)


if __name__ == "__main__":
  raise SystemExit(main())
