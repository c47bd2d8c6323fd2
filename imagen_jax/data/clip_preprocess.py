"""Images -> CLIP's input, as a Hugging Face `preprocessor_config.json` says.

transformers' `CLIPImageProcessor` (PIL backend), step by step:

1. resize so that the shortest side is `size.shortest_edge` (the long side is
   `int(shortest_edge * long / short)`, truncated), with PIL's resize and the config's
   `resample` filter (3 = bicubic; PIL antialiases when shrinking);
2. centre-crop to `crop_size` (top = (H - h) // 2, left = (W - w) // 2);
3. multiply by `rescale_factor` (1/255) and normalise with `image_mean` / `image_std`.

The output is float32 NHWC, the layout of `imagen_jax.nn.clip`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from imagen_jax import weights as weight_io
from imagen_jax.errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"


def _side(value: Any, keys: Sequence[str], what: str) -> int:
  """An int, or the first of `keys` in a size dict ({"shortest_edge": 224} ...)."""
  if isinstance(value, Mapping):
    found = [value[k] for k in keys if value.get(k) is not None]
    if not found:
      raise UserError(f"{PREPROCESSOR_FILE} {what}={dict(value)} has none of {list(keys)}")
    if "height" in value and "width" in value and value["height"] != value["width"]:
      raise UserError(f"{PREPROCESSOR_FILE} {what}={dict(value)} is not square; CLIP crops "
                      "square images")
    value = found[0]
  if not isinstance(value, int) or value <= 0:
    raise UserError(f"{PREPROCESSOR_FILE} {what}={value!r} must be a positive integer")
  return value


@dataclasses.dataclass(frozen=True)
class ClipImageProcessor:
  """The steps of transformers' CLIPImageProcessor that CLIP checkpoints use."""
  shortest_edge: int = 224
  crop_size: int = 224
  resample: int = 3  # PIL's BICUBIC
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD

  @classmethod
  def from_hf_json(cls, config: Mapping[str, Any]) -> "ClipImageProcessor":
    size = config.get("size", 224)
    crop = config.get("crop_size", size)
    try:
      out = cls(
          shortest_edge=_side(size, ("shortest_edge", "height"), "size"),
          crop_size=_side(crop, ("height", "shortest_edge"), "crop_size"),
          resample=int(config.get("resample", 3)),
          **{k: bool(config[k]) for k in ("do_resize", "do_center_crop", "do_rescale",
                                          "do_normalize") if k in config},
          rescale_factor=float(config.get("rescale_factor", 1 / 255)),
          image_mean=tuple(float(x) for x in config.get("image_mean", OPENAI_CLIP_MEAN)),
          image_std=tuple(float(x) for x in config.get("image_std", OPENAI_CLIP_STD)))
      Image.Resampling(out.resample)
    except (TypeError, ValueError) as e:
      if isinstance(e, UserError):
        raise
      raise UserError(f"{PREPROCESSOR_FILE} has an invalid value: {e}") from e
    if len(out.image_mean) != 3 or len(out.image_std) != 3:
      raise UserError(f"{PREPROCESSOR_FILE} image_mean/image_std need 3 values (RGB); got "
                      f"{out.image_mean} and {out.image_std}")
    return out

  @classmethod
  def load(cls, path: str | os.PathLike) -> "ClipImageProcessor":
    """From `path/preprocessor_config.json` (a Hugging Face CLIP directory)."""
    return cls.from_hf_json(weight_io.read_json(epath.Path(path) / PREPROCESSOR_FILE,
                                                "CLIP's image preprocessing config"))

  def to_hf_json(self) -> dict[str, Any]:
    return {"image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": self.shortest_edge},
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "resample": self.resample, "do_resize": self.do_resize,
            "do_center_crop": self.do_center_crop, "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
            "do_convert_rgb": True, "image_mean": list(self.image_mean),
            "image_std": list(self.image_std)}

  def save(self, path: str | os.PathLike) -> str:
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / PREPROCESSOR_FILE).write_text(json.dumps(self.to_hf_json(), indent=2) + "\n")
    return os.fspath(path / PREPROCESSOR_FILE)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [crop, crop, 3]."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise UserError(f"CLIP preprocessing takes uint8 [H, W, 3] images; got {image.dtype} "
                      f"{image.shape}")
    if self.do_resize:
      h, w = image.shape[:2]
      short, long = min(h, w), max(h, w)
      new_long = int(self.shortest_edge * long / short)
      # PIL takes (width, height).
      size = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)
      resized = Image.fromarray(image).resize(size, Image.Resampling(self.resample))
      image = np.asarray(resized)
    if self.do_center_crop:
      image = _centre_crop(image, self.crop_size)
    out = image.astype(np.float32)
    if self.do_rescale:
      out = out * np.float32(self.rescale_factor)
    if self.do_normalize:
      out = (out - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std,
                                                                         np.float32)
    return out

  def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([self(image) for image in images]) if images else np.zeros(
        (0, self.crop_size, self.crop_size, 3), np.float32)


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
  """transformers' center_crop: zero-pads (centred) first when the image is smaller."""
  h, w = image.shape[:2]
  if h < size or w < size:
    ph, pw = max(size, h), max(size, w)
    padded = np.zeros((ph, pw, image.shape[2]), image.dtype)
    top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)
    padded[top:top + h, left:left + w] = image
    image, h, w = padded, ph, pw
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]
