r"""ShapesBench of an unconditional base model steered by classifier guidance (issue 16).

  .venv/bin/python benchmarks/guidance_eval.py --base_dir=runs/uncond_base \
      --classifier_dir=runs/classifier --cache_dir=runs/quickstart/cache \
      --scales=0,1,3,10 --samples=16 --out=runs/guidance_eval.json

The prompts are the 18 one-object captions of the shapes grammar ("a red circle", ...),
each sampled `--samples` times with the same image seeds at every scale (imagen-sample's
seeds: image (p, s) of root seed `--seed`), so the rows differ only by the guidance. Each
image is scored by the ShapesBench checker (`eval.shapesbench.check_image`) against its
prompt: colour (the named colour is the object found), shape, and both.

Scale 0 is the unconditional model alone (no guidance: its colours and shapes are whatever
it draws, so chance is about 1/6 for colour and 1/3 for shape); scale s > 0 adds
classifier guidance, eps' = eps - s * sigma * grad log p(y | x_t) (Dhariwal & Nichol 2021),
with y the prompt's class, through the one stage sampler (`Stage.classifier_scale`,
`Stage.classifier_dir`: exactly what `imagen-sample` does with those settings). The
unconditional model is sampled with guidance_scale = 1 (no classifier-free guidance).
The text embeddings come from the cache only because the sampler passes them; the model
was trained with every caption dropped and never sees them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from imagen_jax.data import shapes
from imagen_jax.eval import shapesbench
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.text import cache as cache_lib


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--base_dir", required=True, help="the unconditional base MODEL_DIR")
  p.add_argument("--classifier_dir", required=True, help="the classifier MODEL_DIR")
  p.add_argument("--cache_dir", required=True, help="an imagen-embed cache of the captions")
  p.add_argument("--scales", default="0,1,3,10", help="classifier scales, comma-separated")
  p.add_argument("--samples", type=int, default=16, help="images per prompt")
  p.add_argument("--sampler", default="dpmpp_2m")
  p.add_argument("--num_steps", type=int, default=25)
  p.add_argument("--batch_size", type=int, default=48)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write the results as JSON here")
  return p.parse_args(argv)


def score(images: np.ndarray, prompts) -> dict:
  """images uint8 [P, S, H, W, 3] -> colour, shape and both accuracies (fractions)."""
  checks = [shapesbench.check_image(im, prompt) for prompt, row in zip(prompts, images)
            for im in row]
  color = np.mean([c["color"] for c in checks])
  shape = np.mean([c["shape"] for c in checks])
  both = np.mean([c["color"] and c["shape"] for c in checks])
  return {"color": float(color), "shape": float(shape), "both": float(both),
          "n": len(checks)}


def main(argv=None) -> int:
  args = _parse(argv)
  scales = [float(s) for s in args.scales.split(",")]
  prompts = [c for c in shapes.all_captions("train")
             if shapes.object_label(c) != shapes.NO_LABEL]
  text = cascade_lib.PromptEncoder(cache=cache_lib.EmbeddingCache.open(args.cache_dir))
  settings = dict(model_dir=args.base_dir, sampler=args.sampler, num_steps=args.num_steps,
                  guidance_scale=1.0, thresholding="static")
  base = cascade_lib.load_stage(cascade_lib.Stage(**settings))
  guide = cascade_lib.load_guide(
      cascade_lib.Stage(**settings, classifier_scale=1.0,
                        classifier_dir=args.classifier_dir), base.image_size)
  rows = []
  for scale in scales:
    config = cascade_lib.Stage(**settings, classifier_scale=scale,
                               classifier_dir=args.classifier_dir if scale else None)
    stage = cascade_lib.LoadedStage(config, base.model, base.info, guide if scale else None)
    cascade = cascade_lib.Cascade([stage], text, batch_size=args.batch_size)
    t0 = time.perf_counter()
    images = cascade(prompts, num_samples=args.samples, seed=args.seed)[0]
    row = {"classifier_scale": scale, **score(images, prompts),
           "seconds": time.perf_counter() - t0}
    rows.append(row)
    print(f"classifier_scale {scale:5g}: colour {100 * row['color']:5.1f}%  shape "
          f"{100 * row['shape']:5.1f}%  both {100 * row['both']:5.1f}%  (n={row['n']}, "
          f"{row['seconds']:.0f}s)", flush=True)
  print("\n| classifier scale | colour | shape | colour and shape | images |")
  print("|---|---|---|---|---|")
  for r in rows:
    name = "none (unconditional)" if r["classifier_scale"] == 0 else f"{r['classifier_scale']:g}"
    print(f"| {name} | {100 * r['color']:.1f}% | {100 * r['shape']:.1f}% | "
          f"{100 * r['both']:.1f}% | {r['n']} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "base_step": base.info.step,
                 "guide_step": getattr(guide.info, "step", None), "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
