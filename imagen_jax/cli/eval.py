"""`imagen-eval`: evaluations of sampled images.

  imagen-eval shapesbench --samples=out/
  imagen-eval fid --samples=out/ --reference=coco_256.npz --weights=pt_inception.pth

`shapesbench` scores every image listed in DIR/index.jsonl (the layout `imagen-sample`
writes) against its prompt with the ShapesBench checker, prints one table per stage and
writes DIR/shapesbench.json. Prompts outside the shapes grammar are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
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
  _add_fid_parser(commands)
  return parser


def _add_fid_parser(commands) -> None:
  fid = commands.add_parser(
      "fid", help="Fréchet Inception Distance between two image sets (pytorch-fid's)",
      description="FID of --samples against --reference. Each PATH is a folder of images "
      "(searched recursively), an imagen-sample output directory (index.jsonl) or a "
      "pytorch-fid .npz statistics file.")
  fid.add_argument("--samples", required=True, metavar="PATH", help="the images to judge")
  fid.add_argument("--reference", required=True, metavar="PATH",
                   help="the real images, or their statistics (.npz)")
  fid.add_argument("--weights", metavar="FILE",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or the same "
                   "keys as safetensors); needed unless both PATHs are .npz")
  fid.add_argument("--save_stats", metavar="FILE",
                   help="write the statistics of --samples here (pytorch-fid's .npz)")
  fid.add_argument("--stage", type=int, default=None, metavar="K",
                   help="cascade stage of an imagen-sample output (default: the last)")
  fid.add_argument("--batch_size", type=int, default=50,
                   help="images per batch, over all devices (default 50)")
  fid.add_argument("--json", action="store_true",
                   help="end with one line of JSON holding fid and the image counts")
  fid.add_argument("--no_progress", action="store_true", help="hide the progress bars")


def _run_fid(args: argparse.Namespace) -> None:
  from imagen_jax.errors import UserError
  from imagen_jax.eval import fid as fid_lib
  from imagen_jax.eval import inception
  paths = [args.samples, args.reference]
  needs_network = not all(fid_lib.is_statistics_file(p) for p in paths)
  if args.save_stats and fid_lib.is_statistics_file(args.samples):
    raise UserError("--save_stats writes the statistics of image --samples, but --samples "
                    f"is already statistics ({args.samples})")
  if needs_network and not args.weights:
    raise UserError("--weights=FILE is required when a PATH is images: give pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)")
  # Every input is checked (files listed, statistics read) before the long work starts.
  samples = fid_lib.read_set(args.samples, args.stage)
  reference = fid_lib.read_set(args.reference)
  extractor = None
  if needs_network:
    model = inception.load_inception(args.weights)
    extractor = fid_lib.FeatureExtractor(model, batch_size=args.batch_size)
  progress = not args.no_progress
  (mu1, sigma1), n_samples = fid_lib.statistics_of(args.samples, extractor,
                                                   progress=progress, opened=samples)
  if args.save_stats:
    fid_lib.save_statistics(args.save_stats, mu1, sigma1)
    print(f"wrote the statistics of {args.samples} to {args.save_stats}")
  (mu2, sigma2), n_reference = fid_lib.statistics_of(args.reference, extractor,
                                                     progress=progress, opened=reference)
  value = fid_lib.frechet_distance(mu1, sigma1, mu2, sigma2)
  print(f"FID {value:.4f}  (samples: {n_samples or 'statistics'}, reference: "
        f"{n_reference or 'statistics'})")
  if args.json:
    print(json.dumps({"fid": value, "n_samples": n_samples, "n_reference": n_reference,
                      "samples": args.samples, "reference": args.reference}))


def _main(argv: Sequence[str] | None = None) -> int:
  args = gin_utils.parse_args(_parser(), argv)
  if args.command == "shapesbench":
    from imagen_jax.eval import shapesbench
    results = shapesbench.evaluate_dir(args.samples, progress=not args.no_progress)
    print(shapesbench.format_table(results), end="")
    print(f"wrote {os.path.join(args.samples, 'shapesbench.json')}")
  elif args.command == "fid":
    _run_fid(args)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return gin_utils.run(_main, argv)


if __name__ == "__main__":
  raise SystemExit(main())
