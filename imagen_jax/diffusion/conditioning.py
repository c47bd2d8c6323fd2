"""Images to and from the model's range, and the low-resolution input of a super-resolution
stage: upsampling and noise conditioning augmentation.

Training (train/step.py) and sampling (diffusion/stage.py) both call these, so an SR stage sees
its low-resolution input the same way in both.
"""

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import process

# jax.image.resize methods, plus "none": the model resizes the noised input itself.
RESIZE_METHODS = ("none", "nearest", "linear", "bilinear", "cubic", "bicubic", "lanczos3",
                  "lanczos5")


def to_float_image(x):
  """uint8 [0, 255] -> float32 [-1, 1] (exactly: 0 -> -1, 255 -> 1)."""
  return (jnp.asarray(x, jnp.float32) - 127.5) / 127.5


def to_uint8_image(x):
  """float [-1, 1] -> uint8 [0, 255], rounded to the nearest level (clipped outside)."""
  return jnp.round((jnp.clip(jnp.asarray(x, jnp.float32), -1.0, 1.0) + 1.0) * 127.5
                   ).astype(jnp.uint8)


def upsample(lowres, size: int, method: str):
  """[B, s, s, C] -> [B, size, size, C] with `method`, or unchanged for method "none"."""
  if method == "none" or lowres.shape[1] == size:
    return lowres
  b, _, _, c = lowres.shape
  return jax.image.resize(lowres, (b, size, size, c), method=method)


def augment_lowres(lowres, size: int, resize: str, aug_log_snr, keys) -> dict:
  """Noise conditioning augmentation (Imagen, Saharia et al. 2022, section 2.5; Ho et al.
  2021, "Cascaded Diffusion Models", section 4.1): the low-resolution image, in [-1, 1],
  upsampled with `resize` and noised by the forward process at `aug_log_snr` [B] with
  noise drawn from `keys`, one PRNG key per example.

  Returns the model's conditioning {"lowres", "lowres_log_snr"}.
  """
  up = upsample(lowres, size, resize)
  aug_log_snr = jnp.broadcast_to(jnp.asarray(aug_log_snr, jnp.float32), up.shape[:1])
  noise = jax.vmap(lambda k: jax.random.normal(k, up.shape[1:], jnp.float32))(keys)
  return {"lowres": process.q_sample(up, aug_log_snr, noise), "lowres_log_snr": aug_log_snr}
