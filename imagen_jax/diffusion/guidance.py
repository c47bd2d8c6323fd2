"""Classifier-free guidance and x0 thresholding (Saharia et al. 2022, Imagen, section 2.2-2.3)."""

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.process import broadcast_to_batch
from imagen_jax.errors import UserError

# Conditioning dropped for the unconditional half; everything else is shared by both halves.
TEXT_KWARGS = ("text_emb", "text_mask")


def _is_one(value) -> bool:
  try:
    return float(value) == 1.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False  # traced or per-example: guide


def classifier_free_guidance(model_fn, guidance_scale):
  """Wraps model_fn(x, log_snr, **cond) with classifier-free guidance (Ho & Salimans 2022,
  eq. 6; Imagen section 2.2):  pred = pred(uncond) + s * (pred(cond) - pred(uncond)).

  The two predictions come from ONE batched call on [cond; uncond]: the uncond half has
  `text_emb` zeroed and `text_mask` all false (the dropped caption the model was trained
  with); all other conditioning (`lowres`, `lowres_log_snr`, ...) is the same in both halves.
  Arrays with the batch as leading axis are doubled; other keyword values (flags, scalars)
  pass through. s = 1 is the conditional model and skips the doubled call (when s is a known
  Python/NumPy scalar); s = 0 is the unconditional model. `guidance_scale` is a scalar or
  per-example [B].

  Mixing raw model outputs is valid for eps, v and x0 objectives alike: at a fixed (x_t,
  lambda) the conversions between them are affine in the prediction (see process.py), and an
  affine map f satisfies f(u + s (c - u)) = f(u) + s (f(c) - f(u)); so guiding the v or x0
  prediction gives exactly the x0 and eps of guiding the eps prediction.
  """
  def guided(x, log_snr, **cond):
    if _is_one(guidance_scale):
      return model_fn(x, log_snr, **cond)
    if "text_emb" not in cond:
      raise UserError("classifier_free_guidance needs the keyword argument text_emb to drop; "
                      "use guidance_scale=1 for a model without text conditioning")
    batch = x.shape[0]
    doubled = {}
    for name, value in cond.items():
      is_batched = (isinstance(value, (jax.Array, np.ndarray)) and value.ndim >= 1
                    and value.shape[0] == batch)
      if name in TEXT_KWARGS:
        doubled[name] = jnp.concatenate([value, jnp.zeros_like(value)], axis=0)
      elif is_batched:
        doubled[name] = jnp.concatenate([value, value], axis=0)
      else:
        doubled[name] = value
    log_snr = jnp.broadcast_to(jnp.asarray(log_snr), (batch,))
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([log_snr, log_snr]),
                   **doubled)
    cond_out, uncond_out = out[:batch], out[batch:]
    scale = broadcast_to_batch(guidance_scale, out.ndim).astype(out.dtype)
    return uncond_out + scale * (cond_out - uncond_out)
  return guided


def dynamic_threshold(x0, percentile: float = 99.5):
  """Dynamic thresholding (Imagen section 2.3): s = max(1, percentile(|x0|, p)) per sample over
  all its pixels, then x0 <- clip(x0, -s, s) / s. p is in percent (Imagen uses 99.5).
  """
  if isinstance(percentile, (int, float)) and not 0.0 <= percentile <= 100.0:
    raise UserError(f"percentile must be in [0, 100] (percent), got {percentile!r}")
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.maximum(1.0, jnp.percentile(flat, percentile, axis=1))
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return jnp.clip(x0, -s, s) / s


def static_threshold(x0):
  """Static thresholding (Imagen section 2.3): clip x0 to [-1, 1], the data range."""
  return jnp.clip(x0, -1.0, 1.0)
