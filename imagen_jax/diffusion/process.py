"""Forward process, regression targets and conversions between eps, v and x0 predictions.

x_t = alpha x0 + sigma eps (VDM eq. 1; Ho et al. 2020 eq. 4), alpha^2 + sigma^2 = 1, and
v = alpha eps - sigma x0 (Salimans & Ho 2022, "Progressive Distillation", section 4 and
appendix D). Given x_t, each of eps, v, x0 determines the others, and the maps are affine in
the prediction:
  x0 = (x_t - sigma eps) / alpha       eps = (x_t - alpha x0) / sigma
  x0 = alpha x_t - sigma v             eps = sigma x_t + alpha v
`log_snr` is a scalar or [B]; a [B] vector broadcasts over the non-batch dimensions.
"""

import jax.numpy as jnp

from imagen_jax.diffusion.schedules import alpha_sigma
from imagen_jax.errors import UserError

OBJECTIVES = ("eps", "v", "x0")


def check_objective(objective: str) -> None:
  """Raise UserError unless objective is one of OBJECTIVES."""
  if objective not in OBJECTIVES:
    raise UserError(f"unknown objective {objective!r}; valid objectives: {list(OBJECTIVES)}")


def broadcast_to_batch(values, ndim: int):
  """A scalar, or a per-example [B] vector reshaped to [B, 1, ...] with `ndim` dimensions."""
  values = jnp.asarray(values, jnp.float32)
  if values.ndim == 0:
    return values
  if values.ndim != 1:
    raise UserError(f"log_snr must be a scalar or a [batch] vector, got shape {values.shape}")
  return values.reshape(values.shape + (1,) * (ndim - 1))


def _alpha_sigma_like(log_snr, x):
  return alpha_sigma(broadcast_to_batch(log_snr, x.ndim))


def q_sample(x0, log_snr, noise):
  """Sample of q(x_t | x0) = N(alpha x0, sigma^2 I): alpha * x0 + sigma * noise (VDM eq. 1)."""
  alpha, sigma = _alpha_sigma_like(log_snr, x0)
  return alpha * x0 + sigma * noise


def target(x0, noise, log_snr, objective: str):
  """Regression target of `objective` for x_t = q_sample(x0, log_snr, noise).

  eps: the noise (Ho et al. 2020 eq. 14); x0: the data; v: alpha eps - sigma x0 (Salimans & Ho
  2022, section 4).
  """
  check_objective(objective)
  if objective == "eps":
    return noise
  if objective == "x0":
    return x0
  alpha, sigma = _alpha_sigma_like(log_snr, x0)
  return alpha * noise - sigma * x0


def to_x0(pred, x_t, log_snr, objective: str):
  """x0 implied by a prediction of `objective` at x_t (Ho et al. 2020 eq. 15; Salimans & Ho
  2022 appendix D: x0 = alpha x_t - sigma v)."""
  check_objective(objective)
  if objective == "x0":
    return pred
  alpha, sigma = _alpha_sigma_like(log_snr, x_t)
  if objective == "eps":
    return (x_t - sigma * pred) / alpha
  return alpha * x_t - sigma * pred


def to_eps(pred, x_t, log_snr, objective: str):
  """eps implied by a prediction of `objective` at x_t (inverse of VDM eq. 1; Salimans & Ho
  2022 appendix D: eps = sigma x_t + alpha v)."""
  check_objective(objective)
  if objective == "eps":
    return pred
  alpha, sigma = _alpha_sigma_like(log_snr, x_t)
  if objective == "x0":
    return (x_t - alpha * pred) / sigma
  return sigma * x_t + alpha * pred


def convert(pred, x_t, log_snr, src: str, dst: str):
  """A prediction of objective `src` at x_t expressed as objective `dst` (Salimans & Ho 2022,
  section 4 and appendix D); affine in `pred`."""
  check_objective(src)
  check_objective(dst)
  if src == dst:
    return pred
  if dst == "x0":
    return to_x0(pred, x_t, log_snr, src)
  if dst == "eps":
    return to_eps(pred, x_t, log_snr, src)
  # v = alpha eps - sigma x0 from the two others.
  alpha, sigma = _alpha_sigma_like(log_snr, x_t)
  return (alpha * to_eps(pred, x_t, log_snr, src)
          - sigma * to_x0(pred, x_t, log_snr, src))
