"""Random inpainting masks for training a dedicated inpainting model (GLIDE, Nichol et al.
2021, section 4: "we fine-tune ... with random regions of training examples erased") and the
model's extra input: the masked image and the mask.

Mask convention (as sampling-time inpainting, `guidance.inpaint_transform`): 1 (white) where
the image is regenerated, 0 (black) where it is kept.

Each example's mask is drawn from its own key, inside the jitted train step: one of
- all-known (nothing to regenerate: the model learns to copy the masked image),
- all-unknown (everything regenerated: plain text-to-image, the masked image all zeros),
- a rectangle whose sides are uniform fractions of the image side in [rect_min, rect_max],
  placed uniformly inside the image,
- free-form strokes: thick random polylines (the free-form masks of Yu et al. 2019,
  "Free-Form Image Inpainting with Gated Convolution", and LaMa's "thick" masks, Suvorov
  et al. 2022): 1 to `max_strokes` strokes, each a random walk of `stroke_vertices`
  vertices starting anywhere, segment lengths up to `stroke_length` of the side, width
  `stroke_width` (fractions of the side) drawn per stroke.
with probabilities `known_share`, `unknown_share`, `rect_share` and the rest for strokes.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from imagen_jax.errors import UserError

KINDS = ("known", "unknown", "rect", "stroke")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """The shares and shapes of random training masks (gin: `MaskConfig.rect_share = 0.5`)."""
  known_share: float = 0.1        # all-known masks (nothing regenerated)
  unknown_share: float = 0.1      # all-unknown masks (plain text-to-image)
  rect_share: float = 0.4         # rectangles; strokes take 1 - the three shares
  rect_min: float = 0.25          # rectangle sides: fractions of the image side
  rect_max: float = 1.0
  max_strokes: int = 3
  stroke_vertices: int = 5
  stroke_length: float = 0.5      # longest segment, a fraction of the image side
  stroke_width: tuple[float, float] = (0.1, 0.3)   # stroke width range, fractions of the side

  def __post_init__(self):
    shares = (self.known_share, self.unknown_share, self.rect_share)
    if min(shares) < 0 or sum(shares) > 1 + 1e-6:
      raise UserError(f"MaskConfig shares known={self.known_share}, unknown="
                      f"{self.unknown_share}, rect={self.rect_share} must be >= 0 and sum "
                      "to at most 1 (strokes take the rest)")
    if not 0 < self.rect_min <= self.rect_max <= 1:
      raise UserError(f"MaskConfig rect_min={self.rect_min}, rect_max={self.rect_max}: need "
                      "0 < rect_min <= rect_max <= 1 (fractions of the image side)")
    lo, hi = self.stroke_width
    if self.max_strokes < 1 or self.stroke_vertices < 2 or not 0 < lo <= hi:
      raise UserError(f"MaskConfig max_strokes={self.max_strokes}, stroke_vertices="
                      f"{self.stroke_vertices}, stroke_width={self.stroke_width}: need at "
                      "least 1 stroke of 2 vertices and 0 < width_lo <= width_hi")

  @property
  def probs(self) -> tuple[float, float, float, float]:
    """The probabilities of KINDS."""
    stroke = max(0.0, 1.0 - self.known_share - self.unknown_share - self.rect_share)
    return self.known_share, self.unknown_share, self.rect_share, stroke


def _rect(key, size: int, cfg: MaskConfig):
  k_h, k_w, k_y, k_x = jax.random.split(key, 4)
  side = lambda k: jnp.clip(jnp.round(size * jax.random.uniform(
      k, (), minval=cfg.rect_min, maxval=cfg.rect_max)), 1, size)
  h, w = side(k_h), side(k_w)
  y0 = jnp.floor(jax.random.uniform(k_y, ()) * (size - h + 1))
  x0 = jnp.floor(jax.random.uniform(k_x, ()) * (size - w + 1))
  r = jnp.arange(size, dtype=jnp.float32)
  rows = (r >= y0) & (r < y0 + h)
  cols = (r >= x0) & (r < x0 + w)
  return rows[:, None] & cols[None, :]


def _segment_distance(points, a, b):
  """Distance from points [P, 2] to the segment a-b ([2] each)."""
  ab = b - a
  t = jnp.clip(jnp.sum((points - a) * ab, -1) / jnp.maximum(jnp.sum(ab * ab), 1e-12), 0, 1)
  return jnp.linalg.norm(points - (a + t[:, None] * ab), axis=-1)


def _strokes(key, size: int, cfg: MaskConfig):
  k_n, k_start, k_angle, k_len, k_width = jax.random.split(key, 5)
  s, v = cfg.max_strokes, cfg.stroke_vertices
  count = jax.random.randint(k_n, (), 1, s + 1)
  start = jax.random.uniform(k_start, (s, 1, 2)) * size
  angle = jax.random.uniform(k_angle, (s, v - 1), maxval=2 * jnp.pi)
  length = jax.random.uniform(k_len, (s, v - 1)) * cfg.stroke_length * size
  steps = jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1) * length[..., None]
  vertices = jnp.clip(jnp.concatenate([start, start + jnp.cumsum(steps, 1)], 1), 0, size)
  width = jax.random.uniform(k_width, (s,), minval=cfg.stroke_width[0],
                             maxval=cfg.stroke_width[1]) * size
  grid = jnp.stack(jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij"), -1)
  centres = grid.reshape(-1, 2).astype(jnp.float32) + 0.5
  dist = jax.vmap(jax.vmap(lambda a, b: _segment_distance(centres, a, b)))(
      vertices[:, :-1], vertices[:, 1:])                        # [S, V-1, P]
  inside = jnp.any(dist <= width[:, None, None] / 2, axis=1)   # [S, P]
  inside = inside & (jnp.arange(s) < count)[:, None]
  return jnp.any(inside, axis=0).reshape(size, size)


def random_mask(key, size: int, cfg: MaskConfig):
  """One random mask, float32 [size, size, 1] (1 = regenerate). -> (mask, kind index)."""
  k_kind, k_rect, k_stroke = jax.random.split(key, 3)
  kind = jax.random.choice(k_kind, len(KINDS), p=jnp.asarray(cfg.probs, jnp.float32))
  masks = jnp.stack([jnp.zeros((size, size), bool), jnp.ones((size, size), bool),
                     _rect(k_rect, size, cfg), _strokes(k_stroke, size, cfg)])
  return masks[kind].astype(jnp.float32)[..., None], kind


def random_masks(keys, size: int, cfg: MaskConfig):
  """One mask per key: float32 [B, size, size, 1]."""
  if size < 1:
    raise UserError(f"mask size {size} must be positive")
  return jax.vmap(lambda k: random_mask(k, size, cfg)[0])(keys)


def inpaint_input(image, mask):
  """The inpainting model's extra input [B, H, W, C + 1]: the masked image
  image * (1 - mask) (zero where regenerated) and the mask. `image` is in [-1, 1], [B, H, W,
  C]; `mask` [B, H, W, 1] is 1 where regenerated."""
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.concatenate([jnp.asarray(image, jnp.float32) * (1.0 - mask), mask], axis=-1)
