"""Editing on shapes, measured (issue 16, "What must show"): inpainting, image-to-image
(SDEdit) and negative prompts, through the real cascade (`Cascade.from_config` on the
quickstart's sampler config, the path of imagen-sample), scored with ShapesBench's checker
(`eval.shapesbench.check_image`) on the last stage's images.

    .venv/bin/python benchmarks/editing_eval.py --run=runs/quickstart \
        --inpaint_base=runs/quickstart/inpaint_base --inpaint_sr=runs/quickstart/inpaint_sr \
        --tables=inpaint,img2img,negative --n=32 --out=runs/quickstart/editing.json

`--run` holds the quickstart's base/, sr/, t5/ and cache/. Tables (docs/editing.md):
- inpaint: a two-object caption of the training split, rendered at the last stage's size;
  the half of the canvas that holds the second object (along the relation's axis, where the
  renderer keeps it whole) is masked and inpainted with the caption. Reported: whether the
  filled object's colour is present (`filled_color`), ShapesBench colour, shape and relation
  of the whole image, and how much of the kept half changed (must be ~0). Methods:
  sampling-time inpainting with the text-to-image models (known-region replacement,
  GLIDE section 4) and the fine-tuned inpainting models (--inpaint_base/--inpaint_sr).
- img2img: a one-object render and a prompt naming another colour (same shape); per
  strength, ShapesBench colour / overall accuracy for the prompt and the mean absolute
  distance to the input image (0-255).
- negative: prompt "a {shape}" with and without the negative prompt "a {colour} {shape}";
  how often the negated colour appears (covers >= shapesbench.MIN_AREA of the canvas).
Deterministic: captions, layouts and seeds come from --seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # noqa: E402

from imagen_jax.data import shapes  # noqa: E402
from imagen_jax.eval import shapesbench  # noqa: E402
from imagen_jax.sample import cascade as cascade_lib  # noqa: E402

SAMPLE_GIN = "experiments/quickstart_sample.gin"
STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def load(run: str, base: str, sr: str, stages: int, batch_size: int):
  """The quickstart cascade with the given stage directories (imagen-sample's config)."""
  gin.clear_config()
  bindings = [f"BASE_DIR = '{base}'", f"SR_DIR = '{sr}'",
              f"T5_PATH = '{os.path.join(run, 't5')}'",
              f"load_cascade.cache_dir = '{os.path.join(run, 'cache')}'",
              f"load_cascade.batch_size = {batch_size}"]
  if stages == 1:
    bindings.append("load_cascade.stages = [@base/Stage()]")
  cascade = cascade_lib.Cascade.from_config(SAMPLE_GIN, bindings)
  gin.clear_config()
  return cascade


def half_mask(scene: shapes.Scene, size: int) -> np.ndarray:
  """uint8 [size, size]: 255 on the half of the canvas that holds the scene's second
  object (the renderer keeps each object inside its half of the relation's axis)."""
  mask = np.zeros((size, size), np.uint8)
  horizontal = scene.relation in ("to the left of", "to the right of")
  second = scene.objects[1]
  centre = second.cx if horizontal else second.cy
  lo = centre >= 0.5
  sl = slice(size // 2, size) if lo else slice(0, size // 2)
  if horizontal:
    mask[:, sl] = 255
  else:
    mask[sl, :] = 255
  return mask


def two_object_scenes(n: int, seed: int) -> list[shapes.Scene]:
  rng = np.random.default_rng(seed)
  captions = [c for c in shapes.all_captions("train")
              if shapes.parse_caption(c).relation is not None]
  chosen = rng.choice(len(captions), n, replace=False)
  return [shapes.make_scene(captions[i], np.random.default_rng([seed, int(i)]))
          for i in chosen]


def _rate(values) -> float:
  values = [bool(v) for v in values]
  return float(np.mean(values)) if values else float("nan")


def inpaint_table(cascades: dict, n: int, seed: int) -> list[dict]:
  rows = []
  for name, cascade in cascades.items():
    size = cascade.stages[-1].image_size
    scenes = two_object_scenes(n, seed)
    images = [shapes.render(s, size) for s in scenes]
    masks = [half_mask(s, size) for s in scenes]
    t0 = time.perf_counter()
    out = cascade([s.caption for s in scenes], seed=seed, init_images=images,
                  masks=masks)[-1][:, 0]
    seconds = time.perf_counter() - t0
    checks, filled, kept = [], [], []
    for scene, image, mask, result in zip(scenes, images, masks, out):
      check = shapesbench.check_image(result, scene.caption)
      checks.append(check)
      filled.append(check["detail"]["objects"][1]["present"])
      keep = mask == 0
      kept.append(np.abs(result.astype(int) - image)[keep].max())
    rows.append({"method": name, "n": len(scenes), "filled_color": _rate(filled),
                 "color": _rate(c["color"] for c in checks),
                 "shape": _rate(c["shape"] for c in checks),
                 "relation": _rate(c["relation"] for c in checks),
                 "overall": _rate(c["overall"] for c in checks),
                 "kept_max_abs_diff": int(max(kept)), "seconds": round(seconds, 1)})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def img2img_table(cascade, n: int, seed: int) -> list[dict]:
  size = cascade.stages[-1].image_size
  rng = np.random.default_rng(seed)
  one = [c for c in shapes.all_captions("train") if shapes.parse_caption(c).relation is None]
  inputs, prompts = [], []
  for i in range(n):
    (color, shape), = shapes.parse_caption(one[rng.integers(len(one))]).objects
    other = [c for c in shapes.COLORS if c != color][rng.integers(len(shapes.COLORS) - 1)]
    inputs.append(shapes.render_caption(f"a {color} {shape}", size, seed, i))
    prompts.append(f"a {other} {shape}")
  rows = []
  for strength in STRENGTHS:
    t0 = time.perf_counter()
    out = cascade(prompts, seed=seed, init_images=inputs, strength=strength)[-1][:, 0]
    checks = [shapesbench.check_image(o, p) for o, p in zip(out, prompts)]
    rows.append({"strength": strength, "n": n, "color": _rate(c["color"] for c in checks),
                 "overall": _rate(c["overall"] for c in checks),
                 "distance": float(np.mean([np.abs(o.astype(float) - i).mean()
                                            for o, i in zip(out, inputs)])),
                 "seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def negative_table(cascade, n: int, seed: int) -> list[dict]:
  """Per colour: prompt "a {shape}" (shapes cycling), n samples each."""
  rows = []
  for color in shapes.COLORS:
    prompts = [f"a {shapes.SHAPES[i % len(shapes.SHAPES)]}" for i in range(n)]
    negatives = [f"a {color} {p[2:]}" for p in prompts]
    result = {"color": color, "n": n}
    for name, neg in (("without", None), ("with", negatives)):
      out = cascade(prompts, seed=seed, negative_prompts=neg)[-1][:, 0]
      result[name] = _rate(shapesbench.check_image(o, neg_p)["detail"]["objects"][0]["present"]
                           for o, neg_p in zip(out, negatives))
    rows.append(result)
    print(json.dumps(rows[-1]), flush=True)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", required=True, help="the quickstart run: base/ sr/ t5/ cache/")
  parser.add_argument("--inpaint_base", default="", help="fine-tuned inpainting base stage")
  parser.add_argument("--inpaint_sr", default="", help="fine-tuned inpainting SR stage")
  parser.add_argument("--tables", default="inpaint,img2img,negative")
  parser.add_argument("--stages", type=int, default=2, choices=(1, 2),
                      help="1: the base stage alone (16 px), 2: base + SR (64 px)")
  parser.add_argument("--n", type=int, default=32, help="examples per table row")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--out", default="", help="write the tables as JSON here")
  args = parser.parse_args(argv)
  base, sr = os.path.join(args.run, "base"), os.path.join(args.run, "sr")
  plain = load(args.run, base, sr, args.stages, args.batch_size)
  tables = {}
  wanted = args.tables.split(",")
  if "inpaint" in wanted:
    cascades = {"sampling-time (text-to-image models)": plain}
    if args.inpaint_base:
      cascades["fine-tuned inpainting models"] = load(
          args.run, args.inpaint_base, args.inpaint_sr or sr, args.stages, args.batch_size)
    tables["inpaint"] = inpaint_table(cascades, args.n, args.seed)
  if "img2img" in wanted:
    tables["img2img"] = img2img_table(plain, args.n, args.seed)
  if "negative" in wanted:
    tables["negative"] = negative_table(plain, args.n, args.seed)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "tables": tables}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
