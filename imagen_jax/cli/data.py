"""imagen-data: convert any dataset to filtered ArrayRecord shards, or describe one.

  imagen-data convert --input='webdataset:/data/cc12m/{00000..01242}.tar' \\
      --output=/data/cc12m_records --min_size=64 --max_aspect_ratio=2 --resize=256
  launch/multiprocess_cpu.sh 4 -- imagen-data convert --input=... --output=...
  imagen-data stats 'records:/data/cc12m_records/*.array_record'

`convert` writes DIR/data-KKKKK-of-NNNNN.array_record (read them with
DATASET="'records:DIR/*.array_record'") and DIR/manifest.json with the count of every skip
reason. It is resumable (finished shards are kept) and runs as P processes, each
converting its share of the input shards: pass --process_index/--process_count (the
launchers do), or leave them unset under a detected cluster (Slurm, Cloud TPU,
Kubernetes), where jax.distributed supplies them. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from imagen_jax.cli import gin_utils
from imagen_jax.data import convert as convert_lib
from imagen_jax.errors import UserError


def _add_convert(subparsers) -> None:
  p = subparsers.add_parser("convert", help="any DATASET spec -> ArrayRecord shards")
  p.add_argument("--input", required=True, help="a DATASET spec, e.g. "
                 "'webdataset:/data/{00000..00099}.tar' (docs/data.md)")
  p.add_argument("--output", required=True, help="the output folder")
  p.add_argument("--min_size", type=int, default=0,
                 help="skip images whose shortest side is below this (pixels; 0: off)")
  p.add_argument("--max_aspect_ratio", type=float, default=0.0,
                 help="skip images whose long/short side ratio exceeds this (0: off)")
  p.add_argument("--min_caption_chars", type=int, default=1,
                 help="skip captions shorter than this many characters")
  p.add_argument("--max_caption_chars", type=int, default=0,
                 help="skip captions longer than this many characters (0: off)")
  p.add_argument("--no_dedup", action="store_true",
                 help="keep exact duplicate images (same sha256 of the bytes)")
  p.add_argument("--resize", type=int, default=0,
                 help="shrink the shortest side to this many pixels, keeping the aspect "
                 "ratio (JPEG stays JPEG, quality 95; others become PNG; 0: keep as is)")
  p.add_argument("--examples_per_shard", type=int, default=10_000,
                 help="output shard size for sources that are not files (folder, jsonl, "
                 "tfds, seqio, shapes); file sources keep one output shard per input file")
  p.add_argument("--max_shards", type=int, default=None,
                 help="stop after converting this many shards in this run (the rest on a "
                 "later run)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  # The launchers' flags (docs/multihost.md). convert needs no coordinator: processes
  # share nothing but the output folder, so the address is accepted and not used.
  p.add_argument("--process_index", type=int, default=None, help="this process, 0 ... P-1")
  p.add_argument("--process_count", type=int, default=None, help="P, the process count")
  p.add_argument("--coordinator_address", default=None, help="accepted, not needed")


def _process_info(args) -> tuple[int, int]:
  """(index, count): the flags when given, else a detected cluster's, else (0, 1).

  convert needs no collective, so explicit flags do not start jax.distributed (processes
  with uneven shares then never wait for each other at exit)."""
  if args.process_count is None and args.process_index is None:
    from imagen_jax.parallel import hosts  # imported on use: it imports jax
    if hosts.detect_cluster() is None:
      return 0, 1
    info = hosts.initialize(args)
    # Disconnect at once, while every process is at the same point: otherwise one that
    # finishes its share early would wait at JAX's exit barrier for the slowest.
    import jax
    jax.distributed.shutdown()
    return info.process_index, info.process_count
  if args.process_count is None or args.process_index is None:
    raise UserError("give both --process_index and --process_count, or neither")
  if args.process_count < 1 or not 0 <= args.process_index < args.process_count:
    raise UserError(f"--process_index={args.process_index} must be in 0 ... "
                    f"{args.process_count - 1} (--process_count={args.process_count})")
  return args.process_index, args.process_count


def _print_counts(title: str, counts: dict) -> None:
  print(title)
  for reason, count in counts.items():
    print(f"  skipped {reason}: {count}")


def run_convert(args) -> None:
  index, count = _process_info(args)
  filters = convert_lib.Filters(
      min_size=args.min_size, max_aspect_ratio=args.max_aspect_ratio,
      min_caption_chars=args.min_caption_chars, max_caption_chars=args.max_caption_chars,
      dedup=not args.no_dedup, resize=args.resize)
  result = convert_lib.convert(
      args.input, args.output, filters, examples_per_shard=args.examples_per_shard,
      process_index=index, process_count=count, max_shards=args.max_shards,
      progress=not args.no_progress)
  manifest = result["manifest"]
  if manifest is not None and manifest["examples"] == 0:
    raise UserError(f"no example of {args.input!r} passed the filters (skipped: "
                    f"{manifest['skipped']}); loosen --min_size/--max_aspect_ratio/caption "
                    "limits or check the input")
  _print_counts(f"process {index} of {count}: {result['shards']} shard(s) in its share, "
                f"{result['converted']} converted, {result['reused']} already done; "
                f"{result['examples']} examples kept", result["skipped"])
  if manifest is None:
    print(f"{args.output}: not every shard is done yet; rerun (or let the other processes "
          "finish) to complete it and write manifest.json")
    return
  _print_counts(f"{args.output}: {manifest['examples']} examples of "
                f"{manifest['input_examples']} in {manifest['shards']} shard(s); manifest "
                f"{args.output}/{convert_lib.MANIFEST}", manifest["skipped"])
  print(f"read it with DATASET=\"'records:{args.output}/*.array_record'\"")


def run_stats(args) -> None:
  result = convert_lib.stats(args.spec, max_examples=args.max_examples,
                             progress=not args.no_progress)
  if args.json:
    print(json.dumps(result, indent=1))
    return
  print(f"{result['spec']}: {result['examples']} examples; image headers read: "
        f"{result['images_read']} ({result['undecodable_headers']} undecodable)")
  if result["skipped_when_indexing"]:
    print(f"left out when indexing: {result['skipped_when_indexing']}")
  for name in ("shortest_side", "aspect_ratio", "caption_chars"):
    print(f"{name}:")
    for label, value in result[name].items():
      print(f"  {label:>12}  {value}")
  print(f"caption_chars mean: {result['caption_chars_mean']:.1f}")


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="imagen-data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  subparsers = parser.add_subparsers(dest="command", required=True)
  _add_convert(subparsers)
  p = subparsers.add_parser("stats", help="counts and histograms of a DATASET spec")
  p.add_argument("spec", help="a DATASET spec, e.g. 'parquet:/data/*.parquet'")
  p.add_argument("--max_examples", type=int, default=None,
                 help="read image headers of this many evenly spaced examples only")
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
  if args.command == "convert":
    run_convert(args)
  else:
    run_stats(args)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return gin_utils.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
