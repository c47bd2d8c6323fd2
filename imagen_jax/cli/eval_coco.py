"""`imagen-eval` subcommands of the zero-shot COCO protocol (docs/eval.md):

  imagen-eval coco_prompts --annotations=captions_val2014.json --out=coco30k.txt [--num=30000]
  imagen-eval reference --images=val2014/ --annotations=captions_val2014.json \
      --resolution=64 --weights=pt_inception.pth --out=coco_val_64.npz
  imagen-eval sweep --gin_file=runs/sample.gin --prompts=coco30k.txt --guidance=1,3,5,7 \
      --reference=coco_val_64.npz --weights=pt_inception.pth --clip=clip/ --out_dir=sweep/
"""

from __future__ import annotations

import argparse
import json

from imagen_jax.cli import gin_utils
from imagen_jax.errors import UserError


def add_parsers(commands) -> None:
  prompts = commands.add_parser(
      "coco_prompts", help="draw N captions of a COCO captions file (the FID-30K prompts)",
      description="Draws --num captions with a fixed seed and writes them one per line "
      "(for imagen-sample --prompts), with OUT.json holding their COCO ids.")
  prompts.add_argument("--annotations", required=True, metavar="FILE",
                       help="COCO captions_val2014.json (or captions_val2017.json)")
  prompts.add_argument("--out", required=True, metavar="FILE", help="the prompts file")
  prompts.add_argument("--num", type=int, default=30000, help="captions to draw (30000)")
  prompts.add_argument("--seed", type=int, default=0, help="seed of the draw")

  ref = commands.add_parser(
      "reference", help="FID statistics of real images at the samples' resolution, cached",
      description="Centre-crops and resizes every image of --images (with --annotations: "
      "the ones it names) to --resolution, and writes their pytorch-fid statistics to "
      "--out; an --out already holding the same resolution and count is reused.")
  ref.add_argument("--images", required=True, metavar="DIR", help="the real images")
  ref.add_argument("--annotations", metavar="FILE",
                   help="use only the images this COCO captions file names")
  ref.add_argument("--resolution", type=int, required=True,
                   help="the side of the sampled images (e.g. 64 or 256)")
  ref.add_argument("--weights", required=True, metavar="FILE",
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  ref.add_argument("--out", required=True, metavar="FILE.npz", help="the statistics")
  ref.add_argument("--batch_size", type=int, default=50, help="images per batch")
  ref.add_argument("--no_progress", action="store_true", help="hide the progress bar")

  sweep = commands.add_parser(
      "sweep", help="sample one prompt set at several guidance weights; FID vs CLIP score",
      description="For each --guidance weight: imagen-sample into OUT/w{w}/, then FID "
      "against --reference and the CLIP score; writes OUT/sweep.json, OUT/sweep.md and "
      "OUT/fid_vs_clip.png. Resumable. Gin flags go to imagen-sample.")
  gin_utils.add_gin_flags(sweep)
  sweep.add_argument("--prompts", required=True, metavar="FILE")
  sweep.add_argument("--guidance", required=True, metavar="W,W,...",
                     help="guidance weights, e.g. 1,3,5,7,10")
  sweep.add_argument("--guidance_param", default="base/Stage.guidance_scale",
                     help="the gin parameter each weight sets (default: the base stage's)")
  sweep.add_argument("--reference", required=True, metavar="FILE.npz",
                     help="statistics of the real images (imagen-eval reference)")
  sweep.add_argument("--weights", required=True, metavar="FILE",
                     help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  sweep.add_argument("--clip", required=True, metavar="DIR", help="a Hugging Face CLIP dir")
  sweep.add_argument("--out_dir", required=True, metavar="DIR")
  sweep.add_argument("--stage", type=int, default=None, metavar="K",
                     help="the cascade stage to score (default: the last)")
  sweep.add_argument("--seed", type=int, default=0, help="imagen-sample's root seed")
  sweep.add_argument("--batch_size", type=int, default=50,
                     help="images per Inception/CLIP batch")
  sweep.add_argument("--no_progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> None:
  {"coco_prompts": _coco_prompts, "reference": _reference, "sweep": _sweep}[args.command](args)


def _coco_prompts(args) -> None:
  from imagen_jax.eval import coco
  drawn = coco.draw_captions(coco.read_captions(args.annotations), args.num, args.seed)
  coco.write_prompts(args.out, drawn)
  print(f"wrote {len(drawn)} captions to {args.out} (seed {args.seed}) and their COCO ids "
        f"to {args.out}.json")


def _reference(args) -> None:
  from imagen_jax.eval import coco, fid, inception
  images = coco.reference_images(args.images, args.resolution, args.annotations)
  if len(images) < 2:
    raise UserError(f"{args.images} holds {len(images)} image(s); FID needs 2+")

  def compute(images):
    extractor = fid.FeatureExtractor(inception.load_inception(args.weights),
                                     batch_size=args.batch_size)
    features = extractor(images, progress=not args.no_progress, desc="reference")
    return fid.feature_statistics(features)

  _, cached = coco.cached_statistics(args.out, images, compute)
  print(f"{'reused' if cached else 'wrote'} the statistics of {len(images)} images at "
        f"{args.resolution} px: {args.out}")


def _sweep(args) -> None:
  from imagen_jax.cli import sample as sample_cli
  from imagen_jax.eval import clip_score, fid, inception, sweep
  weights = sweep.parse_weights(args.guidance)
  reference = fid.load_statistics(args.reference)
  progress = not args.no_progress
  extractor = fid.FeatureExtractor(inception.load_inception(args.weights),
                                   batch_size=args.batch_size)
  scorer = clip_score.ClipScorer(args.clip, batch_size=args.batch_size, progress=progress)
  gin_argv = ([f"--gin_file={f}" for f in args.gin_file]
              + [f"--gin_bindings={b}" for b in args.gin_bindings]
              + [f"--gin_search_paths={p}" for p in args.gin_search_paths])

  def sample(w, directory):
    argv = gin_argv + [f"--gin_bindings={args.guidance_param} = {w}",
                       f"--prompts={args.prompts}", f"--out_dir={directory}",
                       f"--seed={args.seed}"] + (["--no_progress"] if not progress else [])
    sample_cli._main(argv)  # pylint: disable=protected-access

  def evaluate(directory):
    stats, _ = fid.statistics_of(directory, extractor, stage=args.stage, progress=progress)
    value = fid.frechet_distance(*stats, *reference)
    return value, clip_score.score_samples(directory, scorer, args.stage)["clip_score"]

  points = sweep.run_sweep(weights, sample, evaluate, args.out_dir)
  sweep.write_report(points, args.out_dir)
  print(sweep.table(points), end="")
  print(f"wrote {args.out_dir}/sweep.json, sweep.md and fid_vs_clip.png")
  print(json.dumps({"points": [p.__dict__ for p in points]}))
