"""`imagen-eval`: evaluations of sampled images.

  imagen-eval shapesbench --samples=out/
  imagen-eval fid --samples=out/ --reference=coco_256.npz --weights=pt_inception.pth
  imagen-eval clip_score --samples=out/ --clip=ckpt/clip-vit-large-patch14 [--json]
  imagen-eval drawbench --samples=A/ --versus=B/ --clip=ckpt/clip [--out=rate.html]
  imagen-eval drawbench --ratings=drawbench_ratings.json
  imagen-eval coco_prompts | reference | sweep ...   (the zero-shot COCO protocol)

`shapesbench` scores every image listed in DIR/index.jsonl (the layout `imagen-sample`
writes) against its prompt with the ShapesBench checker, prints one table per stage and
writes DIR/shapesbench.json. Prompts outside the shapes grammar are skipped and counted.

`clip_score` and `drawbench` score images against their prompts with a Hugging Face CLIP
directory; `drawbench` also writes a page for rating two models side by side and tallies
the ratings downloaded from it. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from imagen_jax.cli import eval_coco, gin_utils


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
  _add_clip_score_parser(commands)
  _add_drawbench_parser(commands)
  eval_coco.add_parsers(commands)
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


def _add_clip_flags(parser: argparse.ArgumentParser, required: bool) -> None:
  parser.add_argument("--clip", required=required, metavar="DIR",
                      help="a Hugging Face CLIP directory (config.json, model.safetensors, "
                      "vocab.json + merges.txt or tokenizer.json, preprocessor_config.json)")
  parser.add_argument("--stage", type=int, default=None, metavar="K",
                      help="the cascade stage to score (default: the last one)")
  parser.add_argument("--batch_size", type=int, default=64,
                      help="images per batch (rounded up to a multiple of the device count)")
  parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")


def _add_clip_score_parser(commands) -> None:
  parser = commands.add_parser(
      "clip_score", help="CLIP score of samples against their prompts",
      description="100 * max(cos(image, prompt), 0) with a CLIP model, averaged over the "
      "images of DIR/index.jsonl; writes DIR/clip_score.json.")
  parser.add_argument("--samples", required=True, metavar="DIR",
                      help="a directory written by imagen-sample (with index.jsonl)")
  _add_clip_flags(parser, required=True)
  parser.add_argument("--json", action="store_true",
                      help="print the result as one JSON object on the last line")


def _add_drawbench_parser(commands) -> None:
  parser = commands.add_parser(
      "drawbench", help="DrawBench: CLIP score per category, a side-by-side rating page, "
      "and the tally of its ratings",
      description="With --samples: the CLIP score per DrawBench category (and of --versus), "
      "and with --versus a self-contained HTML page for rating A against B. With "
      "--ratings: the tally of a ratings file downloaded from that page.")
  parser.add_argument("--samples", metavar="A", help="imagen-sample output of model A")
  parser.add_argument("--versus", metavar="B", help="imagen-sample output of model B")
  parser.add_argument("--out", metavar="FILE.html",
                      help="the rating page (default: A/drawbench_rating.html)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the left/right order on the page (recorded in it)")
  parser.add_argument("--ratings", metavar="FILE",
                      help="a ratings JSON file downloaded from the page: print its tally")
  _add_clip_flags(parser, required=False)
  parser.add_argument("--json", action="store_true",
                      help="print the result as one JSON object on the last line")


def _scorer(args):
  from imagen_jax.errors import UserError
  from imagen_jax.eval import clip_score
  if args.batch_size < 1:
    raise UserError(f"--batch_size={args.batch_size} must be at least 1")
  return clip_score.ClipScorer(args.clip, batch_size=args.batch_size,
                               progress=not args.no_progress)


def _clip_score(args) -> None:
  from imagen_jax.eval import clip_score, samples
  from imagen_jax.files import write_atomic
  from etils import epath
  samples.stage_rows(args.samples, args.stage)  # a bad directory fails before CLIP loads
  result = clip_score.score_samples(args.samples, _scorer(args), args.stage)
  out = epath.Path(args.samples) / "clip_score.json"
  write_atomic(out, (json.dumps(result, indent=1) + "\n").encode())
  print(f"CLIP score {result['clip_score']:.4f} over {result['num_images']} images "
        f"(stage {result['stage']}); wrote {out}")
  if args.json:
    print(json.dumps({k: result[k] for k in ("clip_score", "num_images", "stage")}))


def _drawbench(args) -> None:
  from imagen_jax.errors import UserError
  from imagen_jax.eval import drawbench, samples
  if args.ratings:
    ratings = drawbench.read_ratings(args.ratings)
    result = drawbench.tally(ratings)
    print(drawbench.format_tally(result, ratings.get("models", {})), end="")
    if args.json:
      print(json.dumps(result))
    return
  if not args.samples or not args.clip:
    raise UserError("drawbench needs --samples=DIR and --clip=DIR (or --ratings=FILE to "
                    "tally ratings)")
  if args.out and not args.versus:
    raise UserError("--out writes the A-versus-B rating page; it needs --versus=DIR")
  dirs = [d for d in (args.samples, args.versus) if d]
  for d in dirs:  # bad directories fail before CLIP loads
    samples.stage_rows(d, args.stage)
  scorer = _scorer(args)
  results = [drawbench.score_dir(d, scorer, args.stage) for d in dirs]
  print(drawbench.format_scores(dirs, [r["categories"] for r in results]), end="")
  summary = {"clip_score": {d: r["categories"] for d, r in zip(dirs, results)}}
  if args.versus:
    out = args.out or os.path.join(args.samples, "drawbench_rating.html")
    n = drawbench.write_comparison_page(out, args.samples, results[0]["first"],
                                        args.versus, results[1]["first"], seed=args.seed)
    print(f"wrote {out} ({n} prompts to rate; seed {args.seed})")
    summary["rating_page"] = out
  if args.json:
    print(json.dumps(summary))


def _main(argv: Sequence[str] | None = None) -> int:
  args = gin_utils.parse_args(_parser(), argv)
  if args.command == "shapesbench":
    from imagen_jax.eval import shapesbench
    results = shapesbench.evaluate_dir(args.samples, progress=not args.no_progress)
    print(shapesbench.format_table(results), end="")
    print(f"wrote {os.path.join(args.samples, 'shapesbench.json')}")
  elif args.command == "fid":
    _run_fid(args)
  elif args.command == "clip_score":
    _clip_score(args)
  elif args.command == "drawbench":
    _drawbench(args)
  else:
    eval_coco.run(args)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return gin_utils.run(_main, argv)


if __name__ == "__main__":
  raise SystemExit(main())
