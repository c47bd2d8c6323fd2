r"""imagen-sample: prompts in, images out, through every stage of a trained cascade.

  imagen-sample --gin_file=runs/sample.gin --prompts=prompts.txt --out_dir=out/
  imagen-sample --gin_file=runs/sample.gin --prompts=prompts.txt --out_dir=out/ \
      --num_samples=4 --seed=1 --stop_at_stage=1 --gin.base/Stage.num_steps=50
  imagen-sample --gin_file=runs/sample.gin --start_image=lowres/ --out_dir=sr/
  imagen-sample --gin_file=runs/sample.gin --edits=edits.jsonl --out_dir=edited/
  imagen-sample --gin_file=runs/sample.gin --prompts=prompts.txt --out_dir=out/ \
      --init_image=photo.png --mask=mask.png --negative_prompt="blurry"

Writes out_dir/stage{k}/{prompt:05d}_{sample}.png for every stage, out_dir/grid.png (the last
stage with its prompts), out_dir/index.jsonl (one row per image: prompt, prompt_index,
seed, sample, stage, file, sampler) and out_dir/config.gin. A rerun with the same out_dir
skips the images already there, so a killed job resumes. See docs/sample.md.

--start_image (a file, or a folder read in name order) super-resolves given images with the
SR stages alone. Each image's prompt is its caption file (cat.png + cat.txt) if there is
one, else line i of --prompts goes with image i.

Multi-process: with --coordinator_address/--process_count/--process_index (or a
detected cluster), each process samples its share of the images on its own devices; process
0 then merges index.jsonl and writes the grid. out_dir must be shared (e.g. gs://).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import gin
from etils import epath

from imagen_jax.cli import gin_utils
from imagen_jax.errors import UserError
from imagen_jax.parallel import hosts


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="imagen-sample", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--prompts", default=None,
                      help="text file, one prompt per line (blank lines are skipped), or "
                      "'drawbench' for DrawBench's 200 prompts")
  parser.add_argument("--out_dir", required=True, help="output directory (local or gs://)")
  parser.add_argument("--num_samples", type=int, default=1, help="images per prompt")
  parser.add_argument("--seed", type=int, default=0, help="root seed")
  parser.add_argument("--stop_at_stage", type=int, default=None,
                      help="run only the first N stages (1 = the base alone)")
  parser.add_argument("--start_image", default=None,
                      help="an image or a folder of images to super-resolve with the SR "
                      "stages alone")
  parser.add_argument("--edits", default=None,
                      help="a JSON-lines file of edits, one per line: prompt, image and "
                      "optional mask, strength, negative_prompt (paths relative to the file)")
  parser.add_argument("--init_image", default=None,
                      help="an image to edit for every prompt (with --mask and/or --strength)")
  parser.add_argument("--mask", default=None,
                      help="inpainting mask of --init_image's size: white = regenerate, "
                      "black = keep")
  parser.add_argument("--strength", type=float, default=None,
                      help="image-to-image (SDEdit): noise --init_image to this time in (0, 1]")
  parser.add_argument("--negative_prompt", default=None,
                      help="negative prompt for every prompt (CFG's unconditional half)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="images per batch (load_cascade.batch_size; rounded up to a "
                      "multiple of the device count)")
  parser.add_argument("--cache_dir", default=None,
                      help="an embedding cache (imagen-embed) to read prompts from")
  parser.add_argument("--grid_max_images", type=int, default=64,
                      help="at most this many images in grid.png")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  hosts.add_distributed_flags(parser)
  return parser


def read_prompts_arg(value: str) -> list[str]:
  """--prompts: a file, or `drawbench` for DrawBench's 200 prompts (a file of that name is
  read as `./drawbench`)."""
  if value == "drawbench":
    from imagen_jax.eval import drawbench
    return drawbench.prompts()
  from imagen_jax.sample import output
  return output.read_prompts(value)


def _main(argv: Sequence[str] | None) -> int:
  args = gin_utils.parse_args(build_parser(), argv)
  dist = hosts.initialize(args)  # before any JAX computation
  # Imported after initialize: these register the gin configurables the configs bind.
  import imagen_jax.nn  # noqa: F401
  import imagen_jax.text.encode  # noqa: F401
  from imagen_jax.sample import cascade as cascade_lib
  from imagen_jax.sample import output

  if args.num_samples < 1:
    raise UserError(f"--num_samples={args.num_samples} must be at least 1")
  bindings = list(args.gin_bindings)
  if args.batch_size is not None:
    if args.batch_size < 1:
      raise UserError(f"--batch_size={args.batch_size} must be at least 1")
    bindings.append(f"load_cascade.batch_size = {args.batch_size}")
  if args.cache_dir is not None:
    bindings.append(f"load_cascade.cache_dir = {args.cache_dir!r}")
  gin.clear_config()  # a fresh config per call, so main() can run twice in one process
  gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_paths)

  # Inputs first: a bad prompts or edits file fails before any checkpoint is loaded.
  prompts = read_prompts_arg(args.prompts) if args.prompts else None
  start_images, edits = None, None
  if args.edits:
    if prompts is not None or args.start_image:
      raise UserError("--edits holds its prompts; drop --prompts and --start_image")
    prompts, edits = cascade_lib.load_edits(args.edits)
  elif args.start_image:
    start_images, prompts = output.load_start_images(args.start_image, prompts)
  elif prompts is None:
    raise UserError("no prompts: pass --prompts=FILE (one prompt per line)")
  one_edit = (args.init_image, args.mask, args.strength, args.negative_prompt)
  if any(v is not None for v in one_edit):
    if edits is not None:
      raise UserError("--init_image/--mask/--strength/--negative_prompt apply one edit to "
                      "every prompt; put per-edit values in the --edits file instead")
    edit = cascade_lib.Edit(
        image=cascade_lib.read_edit_image(args.init_image) if args.init_image else None,
        mask=cascade_lib.read_edit_image(args.mask) if args.mask else None,
        strength=args.strength, negative_prompt=args.negative_prompt,
        source={k: v for k, v in (("image", args.init_image), ("mask", args.mask)) if v})
    edits = [edit] * len(prompts)

  cascade = cascade_lib.load_cascade()
  out_dir = epath.Path(args.out_dir)
  if dist.process_index == 0:
    gin_utils.write_operative_config(out_dir)
  summary = cascade_lib.sample_to_dir(
      cascade, prompts, out_dir, num_samples=args.num_samples, seed=args.seed,
      stop_at_stage=args.stop_at_stage, start_images=start_images, edits=edits,
      grid_max_images=args.grid_max_images, process_index=dist.process_index,
      process_count=dist.process_count, barrier=hosts.sync_global_devices,
      progress=not args.no_progress)
  if dist.process_index == 0:
    share = " (process 0's share)" if dist.process_count > 1 else ""
    print(summary.line() + share, flush=True)
    print(f"wrote {out_dir / output.GRID_FILE} and {out_dir / output.INDEX_FILE}", flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  return gin_utils.run(_main, argv)
