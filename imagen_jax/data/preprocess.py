"""Image preprocessing for every stage: pure numpy/PIL, deterministic.

- `resize_center_crop`: the central square of an image, resized with antialiasing to the
  stage's side (PIL's BICUBIC filter widens its support by the reduction factor, so
  downsampling is antialiased; no aliasing from plain striding).
- `downsample`: the low-resolution conditioning image of a super-resolution stage, made
  from the high-resolution image (Imagen §2.4 conditions SR stages on a downsampled copy
  of the same image).
- `sr_crop`: a random `crop x crop` window of the high-resolution image and the matching
  window of its low-resolution copy, for SR training on crops (Imagen trains 64->256 on
  256 crops of 1024 images, Appendix F.3).
- `hflip` / `swap_left_right`: optional horizontal flips that keep captions true.
No flips by default: a flip turns "a red circle to the left of a blue square" false.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from imagen_jax.errors import UserError

_RESAMPLE = Image.Resampling.BICUBIC


def to_rgb_uint8(image) -> np.ndarray:
  """Any PIL image or array [H,W], [H,W,1|3|4] -> uint8 [H,W,3]; alpha composited on white."""
  if isinstance(image, Image.Image):
    pil = image
  else:
    array = np.asarray(image)
    if array.dtype != np.uint8:
      raise UserError(f"image has dtype {array.dtype}; expected uint8 pixels in [0, 255]")
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
      raise UserError(f"image has shape {array.shape}; expected [H,W], [H,W,3] or [H,W,4]")
    if array.ndim == 3 and array.shape[-1] == 3:
      return array
    pil = Image.fromarray(array)
  if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
    pil = pil.convert("RGBA")
    background = Image.new("RGBA", pil.size, (255, 255, 255, 255))
    pil = Image.alpha_composite(background, pil)
  return np.asarray(pil.convert("RGB"))


def resize_center_crop(image, size: int) -> np.ndarray:
  """The central square of `image` (PIL image or uint8 array), resized to [size, size, 3].

  The square is cut out first (so no pixel outside it leaks in through the filter's
  support), then resized. An image already `size x size` is returned as is.
  """
  if isinstance(image, Image.Image):
    pil = image
    if pil.format == "JPEG" and min(pil.size) >= 2 * size:
      # DCT-domain downscale while decoding (by 1/2..1/8, never below `size`):
      # deterministic, and much faster for large photos.
      pil.draft("RGB", (size, size))
    array = to_rgb_uint8(pil)
  else:
    array = to_rgb_uint8(image)
  height, width = array.shape[:2]
  side = min(width, height)
  top, left = (height - side) // 2, (width - side) // 2
  square = array[top:top + side, left:left + side]
  if side == size:
    return square
  return np.asarray(Image.fromarray(square).resize((size, size), _RESAMPLE))


def downsample(image: np.ndarray, size: int) -> np.ndarray:
  """Antialiased resize of a square uint8 image [S,S,3] to [size,size,3]."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), _RESAMPLE))


def check_sr_sizes(image_size: int, lowres_size: int | None, crop_size: int | None) -> None:
  """Raises UserError unless the stage sizes fit together."""
  if image_size <= 0:
    raise UserError(f"image_size={image_size} must be positive")
  if lowres_size is not None and not 0 < lowres_size < image_size:
    raise UserError(f"lowres_size={lowres_size} must be in (0, image_size={image_size})")
  if crop_size is None:
    return
  if lowres_size is None:
    raise UserError(f"crop_size={crop_size} is for super-resolution stages; set lowres_size "
                    "or drop crop_size")
  if not 0 < crop_size <= image_size:
    raise UserError(f"crop_size={crop_size} must be in (0, image_size={image_size}]")
  if image_size % lowres_size:
    raise UserError(f"crop_size needs an integer ratio image_size/lowres_size, got "
                    f"{image_size}/{lowres_size}; choose sizes such as 64/16 or 256/64")
  ratio = image_size // lowres_size
  if crop_size % ratio:
    raise UserError(f"crop_size={crop_size} must be a multiple of image_size/lowres_size="
                    f"{ratio} so that the low-resolution window matches it exactly")


def sr_crop(image: np.ndarray, lowres: np.ndarray, crop_size: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A random `crop_size` window of `image` and the matching window of `lowres`.

  The window's corner is a multiple of r = S / s, so the low-resolution window
  [y/r, y/r + crop/r) covers exactly the same part of the scene. The low-resolution crop is a
  window of the downsampled whole image, as the model sees it when sampling at full size.
  """
  size, low = image.shape[0], lowres.shape[0]
  ratio = size // low
  positions = (size - crop_size) // ratio + 1
  y, x = (rng.integers(0, positions, size=2) * ratio).tolist()
  lc, ly, lx = crop_size // ratio, y // ratio, x // ratio
  return (image[y:y + crop_size, x:x + crop_size],
          lowres[ly:ly + lc, lx:lx + lc])


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(caption: str) -> str:
  """'left' <-> 'right' as whole words, so a caption stays true of a mirrored image."""
  return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


def hflip(image: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(image[:, ::-1])
