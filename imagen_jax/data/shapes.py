"""The built-in `shapes` dataset: a fixed caption grammar and an anti-aliased renderer.

Imagen's DrawBench in miniature: captions test colour binding and spatial relations
("a red square above a blue circle", after Imagen's "a red cube on top of a blue cube"),
and a program can check the images (`imagen_jax.eval.shapesbench`). The grammar is fixed;
tests and evaluations rely on it (docs/shapes.md):

- 6 colours (`COLORS`) on white, 3 shapes (`SHAPES`), always the article "a";
- one object:  "a {color} {shape}", size 35-55% of the canvas side, anywhere it fits;
- two objects: "a {color1} {shape1} {relation} a {color2} {shape2}", different colours,
  sizes 25-40%, each object entirely inside the half of the canvas its role names
  ("A above B": A in the top half, B in the bottom half), so they never overlap; along the
  other axis the centres are at most `MAX_CROSS_OFFSET` times the main-axis distance
  apart, so the named direction is also the dominant one;
- about 40% one-object and 60% two-object captions in the training split.

An object's `size` is the side of its bounding square as a fraction of the canvas side;
`cx`, `cy` are the centre of that square (x to the right, y down). A circle fills its
square, a square is the square, and a triangle points up with its base on the bottom
side of the square (so it covers half of it).

Held-out split: `HELD_OUT` pairs 9 objects with 9 others (each of the 18 colour-shape
objects appears in exactly one pair; the partners differ in colour and shape). Every
two-object caption whose two objects form one of these pairs, in either order and with
any relation (9 x 2 x 4 = 72 of the 1080 two-object captions, 6.7%), is held out of
training. Training still has every colour, shape and relation, every object alone, and
every object with 14 of its 15 possible partners, so the held-out split measures
composition of known objects, not unseen words.

Scenes are deterministic functions of (seed, index) through
`np.random.default_rng([seed, index])`. Rendering supersamples each pixel on a 4x4 grid
(equivalent to drawing at 4x and box-downsampling) with vectorized numpy over each
object's bounding box, so a 64 px scene takes tens of microseconds.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import NamedTuple

import numpy as np

from imagen_jax.errors import UserError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (30, 165, 60),
    "blue": (30, 70, 225),
    "purple": (140, 50, 190),
}
BACKGROUND = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "held_out")

ONE_OBJECT_SIZE = (0.35, 0.55)
TWO_OBJECT_SIZE = (0.25, 0.40)
ONE_OBJECT_FRACTION = 0.4  # of training-split captions; the rest have two objects
# Two-object scenes: |offset across the named axis| <= this * |offset along it|.
MAX_CROSS_OFFSET = 0.75
SUPERSAMPLE = 4  # anti-aliasing: a 4x4 grid of samples per pixel

# Held-out object pairs (unordered): any two-object caption with exactly these two objects,
# in either order and with any relation, is in the held_out split and never in train.
# Colour i of (red, orange, yellow) pairs with colour i+3 of (green, blue, purple), and
# shape j with shape j+1, so each object is in exactly one pair.
HELD_OUT: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("red", "circle"), ("green", "square")),
    (("red", "square"), ("green", "triangle")),
    (("red", "triangle"), ("green", "circle")),
    (("orange", "circle"), ("blue", "square")),
    (("orange", "square"), ("blue", "triangle")),
    (("orange", "triangle"), ("blue", "circle")),
    (("yellow", "circle"), ("purple", "square")),
    (("yellow", "square"), ("purple", "triangle")),
    (("yellow", "triangle"), ("purple", "circle")),
)
_HELD_OUT_SET = frozenset(frozenset(pair) for pair in HELD_OUT)


class ParsedCaption(NamedTuple):
  """A caption's content: ((color, shape), ...) for 1 or 2 objects, and the relation."""
  objects: tuple[tuple[str, str], ...]
  relation: str | None


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object; geometry in canvas fractions (x right, y down)."""
  color: str
  shape: str
  cx: float  # centre of the bounding square
  cy: float
  size: float  # side of the bounding square


@dataclasses.dataclass(frozen=True)
class Scene:
  caption: str
  objects: tuple[SceneObject, ...]
  relation: str | None  # None for one-object scenes


def format_caption(parsed: ParsedCaption) -> str:
  """The grammar's text for a caption's content (the inverse of `parse_caption`)."""
  (c1, s1), *rest = parsed.objects
  if not rest:
    return f"a {c1} {s1}"
  (c2, s2), = rest
  return f"a {c1} {s1} {parsed.relation} a {c2} {s2}"


def swap_objects(caption: str) -> str:
  """"A rel B" -> "B rel A": the same objects and relation, the other layout."""
  parsed = parse_caption(caption)
  return format_caption(parsed._replace(objects=parsed.objects[::-1]))


def other_axis(caption: str) -> str:
  """"A above B" -> "A to the left of B" (and so on): the same order, the other axis."""
  parsed = parse_caption(caption)
  if parsed.relation is None:
    raise UserError(f"{caption!r} names one object; other_axis needs a relation")
  other = {"above": "to the left of", "below": "to the right of",
           "to the left of": "above", "to the right of": "below"}[parsed.relation]
  return format_caption(parsed._replace(relation=other))


def mean_render(caption: str, resolution: int, n: int = 32) -> np.ndarray:
  """The mean of n renders of a caption (layouts from seeds 0..n-1), float32 in [-1, 1]:
  E[image | caption], the best prediction of the image from the caption alone."""
  return np.mean([render(make_scene(caption, np.random.default_rng(i)), resolution)
                  / np.float32(127.5) - 1 for i in range(n)], axis=0, dtype=np.float32)


def _objects() -> list[tuple[str, str]]:
  return [(c, s) for c in COLORS for s in SHAPES]


@functools.cache
def _grammar() -> dict[str, ParsedCaption]:
  """Every caption of the grammar (1098 of them), in a fixed order."""
  out = {}
  for obj in _objects():
    parsed = ParsedCaption((obj,), None)
    out[format_caption(parsed)] = parsed
  for a, rel, b in itertools.product(_objects(), RELATIONS, _objects()):
    if a[0] != b[0]:
      parsed = ParsedCaption((a, b), rel)
      out[format_caption(parsed)] = parsed
  return out


def _normalize(caption: str) -> str:
  return " ".join(caption.lower().split())


def parse_caption(caption: str) -> ParsedCaption:
  """Inverts the grammar (case and extra whitespace ignored); UserError outside it."""
  parsed = _grammar().get(_normalize(caption)) if isinstance(caption, str) else None
  if parsed is None:
    raise UserError(
        f"caption {caption!r} is not in the shapes grammar; captions are 'a {{color}} "
        f"{{shape}}' or 'a {{color}} {{shape}} {{relation}} a {{color}} {{shape}}' with "
        f"two different colours, colors {list(COLORS)}, shapes {list(SHAPES)}, relations "
        f"{list(RELATIONS)} (see docs/shapes.md)")
  return parsed


def _parsed_held_out(parsed: ParsedCaption) -> bool:
  return len(parsed.objects) == 2 and frozenset(parsed.objects) in _HELD_OUT_SET


def is_held_out(caption: str) -> bool:
  """Whether a caption of the grammar belongs to the held-out split."""
  return _parsed_held_out(parse_caption(caption))


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise UserError(f"shapes split {split!r} is unknown; use one of {list(SPLITS)}")


@functools.cache
def _split_captions(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(one-object captions, two-object captions) of a split."""
  want_held_out = split == "held_out"
  one, two = [], []
  for caption, parsed in _grammar().items():
    if _parsed_held_out(parsed) != want_held_out:
      continue
    (one if len(parsed.objects) == 1 else two).append(caption)
  return tuple(one), tuple(two)


def all_captions(split: str = "train") -> list[str]:
  """The finite caption set of a split: train 18 + 1008 = 1026 captions, held_out 72."""
  _check_split(split)
  one, two = _split_captions(split)
  return list(one + two)


def _check_seed_index(seed, index) -> None:
  for name, value in (("seed", seed), ("index", index)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
      raise UserError(f"shapes {name} must be a non-negative integer, got {value!r}")


def sample_scene(seed: int, index: int, split: str = "train") -> Scene:
  """Scene `index` of the stream for `seed`: a pure function of (seed, index, split).

  Train: 40% one-object captions (uniform over the 18), 60% two-object captions
  (uniform over the 1008 that are not held out). held_out: uniform over its 72 captions
  (all two-object).
  """
  _check_split(split)
  _check_seed_index(seed, index)
  rng = np.random.default_rng([int(seed), int(index)])
  one, two = _split_captions(split)
  if one and rng.random() < ONE_OBJECT_FRACTION:
    caption = one[rng.integers(len(one))]
  else:
    caption = two[rng.integers(len(two))]
  return make_scene(caption, rng)


def make_scene(caption: str, rng: np.random.Generator) -> Scene:
  """Draws a layout for a caption of the grammar (sizes and positions as in the docs)."""
  parsed = parse_caption(caption)
  caption = format_caption(parsed)
  if parsed.relation is None:
    (color, shape), = parsed.objects
    size = rng.uniform(*ONE_OBJECT_SIZE)
    cx, cy = rng.uniform(size / 2, 1 - size / 2, size=2)
    return Scene(caption, (SceneObject(color, shape, float(cx), float(cy), float(size)),),
                 None)

  size_a, size_b = rng.uniform(*TWO_OBJECT_SIZE, size=2)
  # Along the named axis, object A is in the low half (left/top) when `a_first`.
  axis = 0 if parsed.relation in ("to the left of", "to the right of") else 1
  a_first = parsed.relation in ("to the left of", "above")
  lo, hi = (size_a, size_b) if a_first else (size_b, size_a)
  main_lo = rng.uniform(lo / 2, 0.5 - lo / 2)
  main_hi = rng.uniform(0.5 + hi / 2, 1 - hi / 2)
  main_a, main_b = (main_lo, main_hi) if a_first else (main_hi, main_lo)
  # Across the axis: A anywhere it fits, B within MAX_CROSS_OFFSET * main distance of A.
  # The interval is never empty: |main_a - main_b| >= 0.25, and A's centre is at most
  # 0.075 outside B's range [size_b/2, 1 - size_b/2].
  cross_a = rng.uniform(size_a / 2, 1 - size_a / 2)
  reach = MAX_CROSS_OFFSET * abs(main_a - main_b)
  cross_b = rng.uniform(max(size_b / 2, cross_a - reach), min(1 - size_b / 2, cross_a + reach))
  centres = []
  for main, cross in ((main_a, cross_a), (main_b, cross_b)):
    centres.append((main, cross) if axis == 0 else (cross, main))
  objects = tuple(
      SceneObject(color, shape, float(cx), float(cy), float(size))
      for (color, shape), (cx, cy), size in zip(parsed.objects, centres, (size_a, size_b)))
  return Scene(caption, objects, parsed.relation)


def coverage(shape: str, cx: float, cy: float, size: float, resolution: int,
             supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """Anti-aliased coverage of one shape: the fraction of each pixel inside it.

  Samples a `supersample` x `supersample` grid of points per pixel over the object's
  bounding box only. Returns (alpha float32 [y1-y0, x1-x0], (y0, y1, x0, x1)), the window
  of the canvas that alpha covers.
  """
  if shape not in SHAPES:
    raise UserError(f"shape {shape!r} is unknown; use one of {list(SHAPES)}")
  half = size / 2
  x0 = max(0, int(np.floor((cx - half) * resolution)))
  x1 = min(resolution, int(np.ceil((cx + half) * resolution)))
  y0 = max(0, int(np.floor((cy - half) * resolution)))
  y1 = min(resolution, int(np.ceil((cy + half) * resolution)))
  if x1 <= x0 or y1 <= y0:
    return np.zeros((0, 0), np.float32), (0, 0, 0, 0)
  n = resolution * supersample
  # Sample points at sub-pixel centres, in canvas fractions.
  u = (np.arange(x0 * supersample, x1 * supersample) + 0.5) / n - cx
  v = (np.arange(y0 * supersample, y1 * supersample) + 0.5) / n - cy
  u, v = u[None, :], v[:, None]
  if shape == "square":
    inside = (np.abs(u) <= half) & (np.abs(v) <= half)
  elif shape == "circle":
    inside = u * u + v * v <= half * half
  else:  # triangle, apex up: half-width grows from 0 at the apex to half at the base.
    inside = (v <= half) & (np.abs(u) <= (v + half) / 2)
  h, w = y1 - y0, x1 - x0
  alpha = inside.reshape(h, supersample, w, supersample).mean(axis=(1, 3), dtype=np.float32)
  return alpha, (y0, y1, x0, x1)


def render(scene: Scene, resolution: int) -> np.ndarray:
  """Renders a scene at `resolution` x `resolution`: uint8 [R, R, 3], objects on white."""
  if not isinstance(resolution, (int, np.integer)) or resolution < 1:
    raise UserError(f"resolution must be a positive integer, got {resolution!r}")
  image = np.full((resolution, resolution, 3), 255.0, np.float32)
  for obj in scene.objects:
    alpha, (y0, y1, x0, x1) = coverage(obj.shape, obj.cx, obj.cy, obj.size, resolution)
    if alpha.size == 0:
      continue
    a = alpha[..., None]
    color = np.asarray(COLORS[obj.color], np.float32)
    image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - a) + a * color
  return np.rint(image).astype(np.uint8)


def render_caption(caption: str, resolution: int, seed: int = 0, index: int = 0) -> np.ndarray:
  """One render of a given caption, with a layout drawn from (seed, index)."""
  _check_seed_index(seed, index)
  return render(make_scene(caption, np.random.default_rng([int(seed), int(index)])),
                resolution)


# ------------------------------------------------------------------ classifier labels
# The label of a one-object caption for a noise-aware classifier (classifier guidance,
# Dhariwal & Nichol 2021): one joint class per (colour, shape) object, 6 x 3 = 18 classes,
# in the order of `object_labels()`. Two-object captions have no such label.
NO_LABEL = -1


@functools.cache
def object_labels() -> tuple[str, ...]:
  """The 18 class names, "{color} {shape}", class i = colour i // 3, shape i % 3."""
  return tuple(f"{c} {s}" for c, s in _objects())


def object_label(caption: str) -> int:
  """The class of a one-object caption (`object_labels()` index), NO_LABEL for a
  two-object caption; UserError outside the grammar. Deterministic: the label is parsed
  from the caption, so the data pipeline gives it on every host and every run."""
  parsed = parse_caption(caption)
  if len(parsed.objects) != 1:
    return NO_LABEL
  return object_labels().index(" ".join(parsed.objects[0]))


def prompt_label(prompt: str) -> int:
  """The class of a prompt for classifier guidance; a prompt that is not a one-object
  caption of the grammar is a UserError (the classifier has no label for it)."""
  try:
    label = object_label(prompt)
  except UserError:
    label = NO_LABEL
  if label == NO_LABEL:
    raise UserError(
        f"prompt {prompt!r}: classifier guidance needs a classifier for labels that the "
        f"prompt does not have; the shapes object classifier knows one-object prompts "
        f"'a {{color}} {{shape}}' ({len(object_labels())} classes: colors {list(COLORS)}, "
        f"shapes {list(SHAPES)}); drop the prompt or set classifier_scale = 0")
  return label
