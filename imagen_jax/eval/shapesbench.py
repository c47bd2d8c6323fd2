"""ShapesBench: a deterministic checker of images against captions of the shapes grammar.

Imagen's DrawBench in miniature: for a caption of `imagen_jax.data.shapes`, an
image is scored on colour, shape and (for two objects) relation, from pixels alone.
Images larger than `ANALYSIS_RESOLUTION` are box-downsampled to it first.

1. Segmentation by hue. Blending a colour with white (the renderer's anti-aliasing, or a
   blurry sample) keeps its hue and scales its chroma (max - min channel), so every pixel
   with chroma >= `MIN_CHROMA` gets the palette colour of nearest hue, and a coverage
   min(1, chroma / the palette colour's chroma). White, greys and black have no chroma:
   background. Palette hues: 0 red, 32 orange, 53 yellow, 133 green, 228 blue, 279 purple.
2. colour: every named colour covers at least `MIN_AREA` of the canvas, and the named
   colours hold at least `MIN_DOMINANCE` of the image's colour weight (a pixel's weight
   ramps from 0 at `MIN_CHROMA` to 1 at its palette chroma, so faint noise weighs little).
3. A named object is the 8-connected blob of its colour with the most coverage; it is
   found if its colour is present and the blob holds `MIN_COMPONENT_SHARE` of the colour
   (scattered specks, as in noise, are no object).
4. relation (two objects): with d = centroid(first) - centroid(second) in canvas fractions
   (x right, y down), the named axis must dominate (|d_main| > |d_cross|), point the named
   way ("above": d_y < 0) and be at least `MIN_SEPARATION` long. The grammar keeps
   |d_cross| <= 0.75 |d_main| and |d_main| >= 0.25, so renders pass with a margin.
5. shape: analysis by synthesis. For circle, square and triangle, the renderer draws a
   template whose centre and size are fitted so that its area and centroid match the
   blob's, at each Gaussian blur in `BLURS` (samples are blurry); the shape with the
   highest soft IoU (sum of min / sum of max) wins and passes if it is the named shape
   with IoU >= `MIN_SHAPE_IOU`. Every named shape must pass.

`overall` is true when every applicable check passes. The thresholds were tuned on renders
at 16-64 px under blur, pixel noise, tint and desaturation; docs/shapes.md has the figures
(100% on clean renders at 16, 32 and 64 px; 0% on noise and on flipped relations).
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
from typing import Any

import numpy as np
from etils import epath

from imagen_jax import files, images
from imagen_jax.data import shapes
from imagen_jax.errors import UserError

MIN_CHROMA = 24.0        # max-min channel, of 255: below it a pixel is background
MIN_AREA = 0.01          # a named colour's alpha must cover this fraction of the canvas
MIN_DOMINANCE = 0.7      # named colours' share of all chromatic alpha
MIN_COMPONENT_SHARE = 0.5  # an object's largest blob holds this share of its colour
MIN_SEPARATION = 0.1     # canvas fractions between the two centroids on the named axis
MIN_SHAPE_IOU = 0.5      # soft IoU of the mask with the best-fitting template
_FIT_ITERATIONS = 3
# Larger images are box-downsampled to this side first: objects are then still 8-18 px
# wide, plenty to tell the shapes apart, and the check costs the same at any resolution.
ANALYSIS_RESOLUTION = 32
# Gaussian blurs (sigma in pixels) tried for each template: samples are often blurry.
BLURS = (0.0, 0.5, 0.8, 1.1)

CATEGORIES = ("color", "relation", "shape", "overall")
# Why a two-object image passes or fails the relation check (`check_image`'s
# "relation_outcome"): both objects found and in the named direction; found, but the
# relation holds the other way round (the objects' roles swapped); found, but on the
# other axis or too close together; an object (a colour blob) not found.
RELATION_OUTCOMES = ("ok", "reversed", "wrong_axis_or_close", "not_found")
_OPPOSITE = {"above": "below", "below": "above", "to the left of": "to the right of",
             "to the right of": "to the left of"}
SPLITS = ("train", "held_out")


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """HSV hue in degrees [0, 360) and chroma (max - min) of float RGB [..., 3]."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  mx, mn = rgb.max(-1), rgb.min(-1)
  chroma = mx - mn
  safe = np.where(chroma > 0, chroma, 1.0)
  hue = np.where(mx == r, ((g - b) / safe) % 6.0,
                 np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  return (hue * 60.0) % 360.0, chroma


_COLOR_NAMES = tuple(shapes.COLORS)
_PALETTE_HUE, _PALETTE_CHROMA = _hue_chroma(
    np.array([shapes.COLORS[c] for c in _COLOR_NAMES], np.float64))


def segment(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-pixel palette label (index into COLORS, -1 for background) and chroma."""
  hue, chroma = _hue_chroma(image.astype(np.float64))
  diff = np.abs(hue[..., None] - _PALETTE_HUE)
  label = np.argmin(np.minimum(diff, 360.0 - diff), axis=-1)
  chromatic = chroma >= MIN_CHROMA
  return np.where(chromatic, label, -1), np.where(chromatic, chroma, 0.0)


def _box_downsample(image: np.ndarray, resolution: int) -> np.ndarray:
  """Area-averaging resize (what the renderer's anti-aliasing does)."""
  from PIL import Image
  return np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.BOX))


def _largest_component(mask: np.ndarray) -> np.ndarray:
  """The 8-connected component of mask > 0 holding the most alpha."""
  from scipy import ndimage  # a jax dependency
  components, n = ndimage.label(mask > 0, structure=np.ones((3, 3), bool))
  if n <= 1:
    return mask
  mass = ndimage.sum(mask, components, index=np.arange(1, n + 1))
  return np.where(components == 1 + int(np.argmax(mass)), mask, 0.0)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
  """Centre of mass (x, y) of a mask, in canvas fractions of pixel centres."""
  h, w = mask.shape
  total = mask.sum()
  ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
  return float(mask.sum(0) @ xs / total), float(mask.sum(1) @ ys / total)


@functools.cache
def _blur_matrix(sigma: float, n: int) -> np.ndarray:
  """A Gaussian blur of a length-n signal as a matrix (zero outside; a row sums to <= 1)."""
  kernel = lambda d: np.exp(-0.5 * (d / sigma) ** 2)
  norm = kernel(np.arange(-8 * math.ceil(sigma), 8 * math.ceil(sigma) + 1)).sum()
  return kernel(np.arange(n)[:, None] - np.arange(n)[None, :]) / norm


def _template(shape: str, cx: float, cy: float, size: float, resolution: int,
              min_alpha: float, blur: float) -> np.ndarray:
  """The renderer's coverage of one shape, blurred, as segment() would see it."""
  alpha, (y0, y1, x0, x1) = shapes.coverage(shape, cx, cy, size, resolution)
  full = np.zeros((resolution, resolution), np.float64)
  full[y0:y1, x0:x1] = alpha
  if blur > 0:
    g = _blur_matrix(blur, resolution)
    full = g @ full @ g.T
  return np.where(full >= min_alpha, full, 0.0)


def fit_shape(mask: np.ndarray, min_alpha: float = 0.0) -> dict[str, float]:
  """Soft IoU of a coverage mask with the best-fitting template of each shape.

  `min_alpha`: coverage below which segment() sees no colour (templates drop it too).
  """
  resolution = mask.shape[0]
  area = mask.sum() / resolution**2
  mx, my = _centroid(mask)
  unit_area = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
  scores = {}
  for shape in shapes.SHAPES:
    size = math.sqrt(area / unit_area[shape])
    # A triangle's centroid is 1/6 of its side below the centre of its bounding square.
    cx, cy = mx, (my - size / 6 if shape == "triangle" else my)
    scores[shape] = 0.0
    for blur in BLURS:
      # Match the template's area and centroid to the mask's (blur moves them little, so
      # each further blur starts from the previous fit).
      for _ in range(_FIT_ITERATIONS if blur == BLURS[0] else 1):
        t = _template(shape, cx, cy, size, resolution, min_alpha, blur)
        t_area = t.sum() / resolution**2
        if t_area <= 0:
          break
        tx, ty = _centroid(t)
        cx, cy = cx + mx - tx, cy + my - ty
        size *= math.sqrt(area / t_area)
      t = _template(shape, cx, cy, size, resolution, min_alpha, blur)
      union = np.maximum(mask, t).sum()
      iou = float(np.minimum(mask, t).sum() / union) if union > 0 else 0.0
      scores[shape] = max(scores[shape], iou)
  return scores


def _find_object(label: np.ndarray, chroma: np.ndarray, color: str) -> dict[str, Any]:
  """Measures the object of one colour: area, compactness, centroid and shape fits."""
  resolution = label.shape[0]
  selected = label == _COLOR_NAMES.index(color)
  obj: dict[str, Any] = {"color": color, "area": 0.0, "present": False, "found": False}
  if not selected.any():
    return obj
  palette_chroma = float(_PALETTE_CHROMA[_COLOR_NAMES.index(color)])
  mask = np.where(selected, np.minimum(1.0, chroma / palette_chroma), 0.0)
  mass = float(mask.sum())
  component = _largest_component(mask) > 0
  share = float(mask[component].sum()) / mass
  obj.update(area=mass / resolution**2, component_share=share,
             centroid=_centroid(np.where(component, mask, 0.0)))
  obj["present"] = obj["area"] >= MIN_AREA
  # An object is one compact blob holding most of its colour, not scattered specks.
  obj["found"] = obj["present"] and share >= MIN_COMPONENT_SHARE
  # Shape fits use coverage relative to the palette colour's chroma and relative to the
  # object's own (90th-percentile) chroma, which keeps the interior of a washed-out or
  # darker object solid; the better fit counts.
  own_chroma = max(2 * MIN_CHROMA, float(np.percentile(chroma[selected], 90)))
  scores: dict[str, float] = {}
  for reference in sorted({palette_chroma, min(own_chroma, palette_chroma)}):
    fit = fit_shape(np.where(component, np.minimum(1.0, chroma / reference), 0.0),
                    MIN_CHROMA / reference)
    scores = {k: max(v, scores.get(k, 0.0)) for k, v in fit.items()}
  obj.update(shape_scores=scores, best_shape=max(scores, key=scores.get))
  return obj


def _relation_holds(relation: str, first: dict[str, Any], second: dict[str, Any]) -> bool:
  """The first centroid lies in the named direction from the second, on a dominant axis."""
  (ax, ay), (bx, by) = first["centroid"], second["centroid"]
  dx, dy = ax - bx, ay - by  # canvas fractions, y down
  main, cross, sign = {"to the left of": (dx, dy, -1), "to the right of": (dx, dy, 1),
                       "above": (dy, dx, -1), "below": (dy, dx, 1)}[relation]
  return sign * main >= MIN_SEPARATION and abs(main) > abs(cross)


def check_image(image: np.ndarray, caption: str) -> dict[str, Any]:
  """Scores one image against a caption of the shapes grammar.

  Returns booleans `color`, `shape`, `relation` (None for one-object captions) and
  `overall`, `relation_outcome` (one of RELATION_OUTCOMES, None for one object), plus
  `detail` (the measured values, for debugging). UserError if the caption
  is outside the grammar or the image is not uint8 [H, H, 3] (RGBA: alpha is dropped).
  """
  parsed = shapes.parse_caption(caption)
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 4:
    image = image[..., :3]
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise UserError(f"ShapesBench needs a square RGB image [H, H, 3], got shape {image.shape}")
  if image.dtype != np.uint8:
    raise UserError(f"ShapesBench needs a uint8 image, got dtype {image.dtype}")
  if image.shape[0] > ANALYSIS_RESOLUTION:
    image = _box_downsample(image, ANALYSIS_RESOLUTION)
  label, chroma = segment(image)

  # Colour weight of a pixel for dominance: 0 at MIN_CHROMA rising to 1 at its palette
  # colour's chroma, so faint noise in the background weighs little.
  full = _PALETTE_CHROMA[np.maximum(label, 0)]
  weight = np.where(label >= 0, np.clip((chroma - MIN_CHROMA) / (full - MIN_CHROMA), 0, 1), 0)
  named = [_COLOR_NAMES.index(c) for c, _ in parsed.objects]
  total = float(weight.sum())
  dominance = sum(float(weight[label == i].sum()) for i in named) / total if total else 0.0
  objects = [_find_object(label, chroma, color) for color, _ in parsed.objects]

  color_ok = all(o["present"] for o in objects) and dominance >= MIN_DOMINANCE
  shape_ok = all(o["found"] and o["best_shape"] == shape
                 and o["shape_scores"][shape] >= MIN_SHAPE_IOU
                 for o, (_, shape) in zip(objects, parsed.objects))
  outcome = None
  if parsed.relation is not None:
    if not all(o["found"] for o in objects):
      outcome = "not_found"
    elif _relation_holds(parsed.relation, *objects):
      outcome = "ok"
    elif _relation_holds(_OPPOSITE[parsed.relation], *objects):
      outcome = "reversed"
    else:
      outcome = "wrong_axis_or_close"
  relation_ok = None if outcome is None else outcome == "ok"
  overall = color_ok and shape_ok and relation_ok is not False
  return {"color": bool(color_ok), "shape": bool(shape_ok), "relation": relation_ok,
          "relation_outcome": outcome, "overall": bool(overall),
          "detail": {"dominance": dominance, "objects": objects}}


def _read_index(samples_dir: epath.Path) -> list[dict[str, Any]]:
  from imagen_jax.sample import output  # imagen-sample's index format; imported on use
  if not samples_dir.is_dir():
    raise UserError(f"samples directory {os.fspath(samples_dir)!r} does not exist; pass the "
                    "--out_dir of imagen-sample")
  rows = output.read_index(samples_dir)
  index = os.fspath(samples_dir / output.INDEX_FILE)
  for n, row in enumerate(rows, start=1):
    missing = [k for k in ("prompt", "stage", "file") if not isinstance(row, dict) or k not in row]
    if missing:
      raise UserError(f"{index} row {n} lacks {missing}; rows need prompt, stage and file")
  if not rows:
    raise UserError(f"{index!r} is empty; nothing to score")
  return rows


def _load_image(path: epath.Path) -> np.ndarray:
  from PIL import UnidentifiedImageError
  try:
    return images.read_image(path)
  except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
    raise UserError(f"cannot read image {os.fspath(path)!r} listed in index.jsonl: {e}") from e


def accuracies(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Summary of `check_image` results: the accuracy of each category (None when no row
  applies), n, n_relation and the counts of each relation outcome."""
  out: dict[str, Any] = {"n": len(rows)}
  for cat in CATEGORIES:
    values = [r[cat] for r in rows if r[cat] is not None]
    out[cat] = sum(values) / len(values) if values else None
  out["n_relation"] = sum(r["relation"] is not None for r in rows)
  out["relation_outcomes"] = {k: sum(r["relation_outcome"] == k for r in rows)
                              for k in RELATION_OUTCOMES}
  return out


def evaluate_dir(samples_dir: str | os.PathLike, *, progress: bool = True) -> dict[str, Any]:
  """Scores every image in `samples_dir/index.jsonl`; writes `samples_dir/shapesbench.json`.

  Returns {"stages": {stage: {"train"|"held_out": {color, relation, shape, overall (accuracy
  in [0, 1], None when no image applies), n, n_relation, relation_outcomes (counts of
  RELATION_OUTCOMES)}}}, "n_scored", "n_skipped",
  "skipped_prompts", "images": [per-image results]}. Rows whose prompt is outside the
  shapes grammar are skipped and counted, not errors.
  """
  from tqdm import tqdm
  samples_dir = epath.Path(samples_dir)
  rows = _read_index(samples_dir)
  images, skipped = [], collections.Counter()
  for row in tqdm(rows, desc="shapesbench", unit="img", disable=not progress):
    try:
      held_out = shapes.is_held_out(row["prompt"])
    except UserError:
      skipped[str(row["prompt"])] += 1
      continue
    image = _load_image(samples_dir / row["file"])
    result = check_image(image, row["prompt"])
    images.append({
        "file": row["file"], "prompt": row["prompt"], "stage": str(row["stage"]),
        "prompt_index": row.get("prompt_index"), "seed": row.get("seed"),
        "sample": row.get("sample"), "resolution": int(image.shape[0]),
        "split": "held_out" if held_out else "train",
        **{k: result[k] for k in (*CATEGORIES, "relation_outcome")}})
  stages: dict[str, Any] = {}
  # Stages in cascade order (imagen-sample numbers them 0 = base, 1, ...).
  for stage in sorted({r["stage"] for r in images},
                      key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)):
    in_stage = [r for r in images if r["stage"] == stage]
    stages[stage] = {"resolution": sorted({r["resolution"] for r in in_stage})}
    for split in SPLITS:
      stages[stage][split] = accuracies([r for r in in_stage if r["split"] == split])
  results = {"samples_dir": os.fspath(samples_dir), "n_scored": len(images),
             "n_skipped": sum(skipped.values()), "skipped_prompts": sorted(skipped),
             "stages": stages, "images": images}
  files.write_atomic(samples_dir / "shapesbench.json", json.dumps(results, indent=1) + "\n")
  return results


def format_table(results: dict[str, Any]) -> str:
  """One text table per stage: rows train / held_out, columns colour..overall and n."""
  def pct(value):
    return "     -" if value is None else f"{100 * value:5.1f}%"

  lines = []
  for stage, by_split in results["stages"].items():
    res = "/".join(f"{r}px" for r in by_split.get("resolution", []))
    lines.append(f"ShapesBench, stage {stage}" + (f" ({res})" if res else ""))
    lines.append(f"{'split':<9} {'colour':>7} {'relation':>9} {'shape':>7} {'overall':>8} "
                 f"{'n':>5}")
    for split in SPLITS:
      acc = by_split[split]
      lines.append(f"{split:<9} {pct(acc['color']):>7} {pct(acc['relation']):>9} "
                   f"{pct(acc['shape']):>7} {pct(acc['overall']):>8} {acc['n']:>5}")
    train = by_split["train"]
    if train["n_relation"]:
      counts = train["relation_outcomes"]
      lines.append(f"train relations: {counts['ok']} ok, {counts['reversed']} reversed, "
                   f"{counts['wrong_axis_or_close']} wrong axis or too close, "
                   f"{counts['not_found']} with an object not found "
                   f"(of {train['n_relation']})")
    lines.append("")
  if not results["stages"]:
    lines.append("ShapesBench: no image had a prompt of the shapes grammar")
  if results["n_skipped"]:
    lines.append(f"skipped {results['n_skipped']} image(s) whose prompt is outside the shapes "
                 f"grammar ({len(results['skipped_prompts'])} distinct prompts)")
  return "\n".join(lines).rstrip() + "\n"
