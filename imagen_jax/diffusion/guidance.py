"""Guidance and x0 transforms: classifier-free guidance (Saharia et al. 2022, Imagen, section
2.2) with negative prompts, a scale schedule, a guidance interval and CFG rescale; classifier
guidance (Dhariwal & Nichol 2021); thresholding (Imagen section 2.3) and inpainting's
known-region replacement (GLIDE, Nichol et al. 2021)."""

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import process
from imagen_jax.diffusion.process import broadcast_to_batch
from imagen_jax.diffusion.schedules import alpha_sigma
from imagen_jax.errors import UserError

# Conditioning dropped for the unconditional half; everything else is shared by both halves.
TEXT_KWARGS = ("text_emb", "text_mask")


def _is_one(value) -> bool:
  try:
    return float(value) == 1.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False  # traced or per-example: guide


# Per-example negative prompts: these fill the unconditional half instead of zeros.
NEGATIVE_KWARGS = {"text_emb": "negative_text_emb", "text_mask": "negative_text_mask"}


def guidance_scale_at(guidance_scale, log_snr, *, interval=None):
  """The guidance weight at `log_snr` [B]: `guidance_scale` is a scalar, a per-example [B]
  vector or a function of log_snr (a schedule over the steps). With `interval` = (lo, hi),
  guidance applies only for lo <= log_snr <= hi and the weight is 1 (the conditional
  model) outside (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval")."""
  scale = guidance_scale(log_snr) if callable(guidance_scale) else guidance_scale
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), jnp.shape(log_snr))
  if interval is not None:
    lo, hi = interval
    scale = jnp.where((log_snr >= lo) & (log_snr <= hi), scale, 1.0)
  return scale


def rescale_guided(guided, cond_out, phi):
  """CFG rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", section 3.4, eq. 15-17): the guided prediction scaled to the per-example standard
  deviation of the conditional one, mixed with the unscaled guided prediction by `phi`."""
  axes = tuple(range(1, guided.ndim))
  ratio = jnp.std(cond_out, axis=axes, keepdims=True) / jnp.maximum(
      jnp.std(guided, axis=axes, keepdims=True), 1e-12)
  return phi * guided * ratio + (1.0 - phi) * guided


def classifier_free_guidance(model_fn, guidance_scale, *, interval=None, rescale=0.0):
  """Wraps model_fn(x, log_snr, **cond) with classifier-free guidance (Ho & Salimans 2022,
  eq. 6; Imagen section 2.2):  pred = pred(uncond) + s * (pred(cond) - pred(uncond)).

  The two predictions come from ONE batched call on [cond; uncond]: the uncond half has
  `text_emb` zeroed and `text_mask` all false (the dropped caption the model was trained
  with), or, if cond holds `negative_text_emb` and `negative_text_mask`, those (negative
  prompts, per example; an all-false mask with a zero embedding is the dropped caption). All
  other conditioning (`lowres`, `lowres_log_snr`, ...) is the same in both halves.
  Arrays with the batch as leading axis are doubled; other keyword values (flags, scalars)
  pass through. s = 1 is the conditional model and skips the doubled call (when s is a known
  Python/NumPy scalar); s = 0 is the unconditional model. `guidance_scale` is a scalar,
  per-example [B] or a function of log_snr; `interval` and `rescale` (phi) are the options
  of `guidance_scale_at` and `rescale_guided`.

  Mixing raw model outputs is valid for eps, v and x0 objectives alike: at a fixed (x_t,
  lambda) the conversions between them are affine in the prediction (see process.py), and an
  affine map f satisfies f(u + s (c - u)) = f(u) + s (f(c) - f(u)); so guiding the v or x0
  prediction gives exactly the x0 and eps of guiding the eps prediction.
  """
  def guided(x, log_snr, **cond):
    negative = {k: cond.pop(v) for k, v in NEGATIVE_KWARGS.items() if v in cond}
    if negative and len(negative) != len(NEGATIVE_KWARGS):
      raise UserError(f"negative prompts need both {sorted(NEGATIVE_KWARGS.values())}")
    if _is_one(guidance_scale) and interval is None:
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
        uncond = negative.get(name, jnp.zeros_like(value))
        doubled[name] = jnp.concatenate([value, jnp.asarray(uncond, value.dtype)], axis=0)
      elif is_batched:
        doubled[name] = jnp.concatenate([value, value], axis=0)
      else:
        doubled[name] = value
    log_snr = jnp.broadcast_to(jnp.asarray(log_snr, jnp.float32), (batch,))
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([log_snr, log_snr]),
                   **doubled)
    cond_out, uncond_out = out[:batch], out[batch:]
    scale = guidance_scale_at(guidance_scale, log_snr, interval=interval)
    scale = broadcast_to_batch(scale, out.ndim).astype(out.dtype)
    result = uncond_out + scale * (cond_out - uncond_out)
    if _is_zero(rescale):
      return result
    return rescale_guided(result, cond_out, rescale)
  return guided


def classifier_guidance(model_fn, log_prob_fn, scale, *, objective: str = "eps"):
  """Wraps model_fn(x_t, log_snr, **cond) -> prediction of `objective` with classifier
  guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", section 4, eq. 14):
    eps' = eps_hat - scale * sigma * grad_x log p(y | x_t),
  returned as the same objective (the conversions are affine in the prediction at fixed
  x_t, process.py). `log_prob_fn(x_t, log_snr [B]) -> [B]` is log p(y | x_t) of each
  example's own label y (close over y). Composes with `classifier_free_guidance` (wrap the
  guided model) and with every sampler. `scale` is a scalar or per-example [B].
  """
  process.check_objective(objective)

  def guided(x, log_snr, **cond):
    pred = model_fn(x, log_snr, **cond)
    log_snr = jnp.broadcast_to(jnp.asarray(log_snr, jnp.float32), x.shape[:1])
    grad = jax.grad(lambda z: jnp.sum(log_prob_fn(z, log_snr)))(jnp.asarray(x, jnp.float32))
    _, sigma = alpha_sigma(broadcast_to_batch(log_snr, x.ndim))
    eps = process.to_eps(pred, x, log_snr, objective)
    eps = eps - broadcast_to_batch(scale, x.ndim) * sigma * grad
    return process.convert(eps, x, log_snr, "eps", objective)
  return guided


def _is_zero(value) -> bool:
  try:
    return float(value) == 0.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False


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


def inpaint_transform(image, mask, inner=None):
  """An x0_transform for sampling-time inpainting (GLIDE, Nichol et al. 2021, section 4;
  DESIGN.md section 8): x0 <- mask * inner(x0) + (1 - mask) * image. mask is 1 (white)
  where the image is regenerated and 0 (black) where it is kept; `inner` (e.g.
  thresholding) is applied first. With a grid ending at +inf the last step returns this, so
  the known region of the output is the image."""
  def transform(x0):
    x0 = x0 if inner is None else inner(x0)
    return mask * x0 + (1.0 - mask) * image
  return transform
