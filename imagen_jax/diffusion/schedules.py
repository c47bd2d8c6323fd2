"""Noise schedules in continuous time t in [0, 1], written as log signal-to-noise ratios.

A schedule maps t to lambda(t) = log(alpha^2 / sigma^2) (Kingma et al. 2021, "Variational
Diffusion Models", VDM, eq. 2-3). The process is variance preserving: alpha^2 = sigmoid(lambda)
and sigma^2 = sigmoid(-lambda), so alpha^2 + sigma^2 = 1. t = 0 is (almost) clean data, t = 1
is (almost) pure noise; lambda decreases in t.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.errors import UserError

ScheduleFn = Callable[[jax.Array], jax.Array]

_COSINE_OFFSET = 0.008
# tan^2 theta is clipped inside the log: at t = 1 theta = pi/2 and tan^2 diverges (in float32
# pi/2 rounds up, so tan is huge and negative). The clip makes lambda(1) = -log(1e14) ~ -32.2:
# alpha ~ 1e-7, pure noise for any practical purpose, and finite.
_TAN2_MIN, _TAN2_MAX = 1e-20, 1e14


def cosine_log_snr(t):
  """Cosine schedule of Nichol & Dhariwal 2021 (eq. 17) as a log-SNR, not normalised.

  alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2) with s = 0.008, so
  lambda(t) = log(alpha_bar / (1 - alpha_bar)) = -log(cos(theta)^-2 - 1), theta = (t + s)/(1 + s)
  * pi/2 (DESIGN.md section 4). Computed as -log(tan(theta)^2), which is the same quantity
  (cos^-2 - 1 = tan^2) without the cancellation of cos^-2 - 1 near t = 0. About 8.77 at t = 0
  and about -32.2 at t = 1 (clipped inside the log, see _TAN2_MAX).

  Args:
    t: time in [0, 1], any shape.

  Returns:
    float32 log-SNR of the shape of t.
  """
  t = jnp.asarray(t, jnp.float32)
  theta = (t + _COSINE_OFFSET) / (1.0 + _COSINE_OFFSET) * (math.pi / 2)
  return -jnp.log(jnp.clip(jnp.square(jnp.tan(theta)), _TAN2_MIN, _TAN2_MAX))


def linear_log_snr(t):
  """Continuous-time counterpart of DDPM's linear betas (Ho et al. 2020, section 4).

  lambda(t) = -log(expm1(1e-4 + 10 t^2)), i.e. alpha_bar(t) = exp(-(1e-4 + 10 t^2)): the
  t^2 term is DDPM's 1000 betas 1e-4 ... 0.02 summed (sum beta ~ 0.1 t + 10 t^2), the small
  constant keeps lambda(0) finite (as in the "linear" log-SNR of lucidrains' imagen-pytorch
  and of VDM's baselines). About 9.21 at t = 0 and -10.0 at t = 1; expm1 keeps it exact near
  t = 0.

  Args:
    t: time in [0, 1], any shape.

  Returns:
    float32 log-SNR of the shape of t.
  """
  t = jnp.asarray(t, jnp.float32)
  return -jnp.log(jnp.expm1(1e-4 + 10.0 * jnp.square(t)))


def alpha_sigma(log_snr):
  """(alpha, sigma) of a variance-preserving process at log-SNR lambda (VDM eq. 2-3).

  alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda). Computed as exp(log_sigmoid / 2), which
  is exact for |lambda| large (no 1 - sigmoid cancellation) and gives alpha = 1, sigma = 0 at
  lambda = +inf.
  """
  log_snr = jnp.asarray(log_snr, jnp.float32)
  alpha = jnp.exp(0.5 * jax.nn.log_sigmoid(log_snr))
  sigma = jnp.exp(0.5 * jax.nn.log_sigmoid(-log_snr))
  return alpha, sigma


def log_snr_grid(schedule_fn: ScheduleFn, num_steps: int):
  """Sampling grid: schedule_fn at t = 1 - i/num_steps, i = 0 ... num_steps (uniform steps in
  continuous time, as in VDM section 3.3 and Imagen's sampler).

  Runs from noisy to clean (increasing log-SNR), as `sample` expects, and ends at
  schedule_fn(0), finite. Append +inf to make the last sampler step return x0-hat.

  Returns:
    float32 array [num_steps + 1].
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise UserError(f"num_steps must be a positive integer, got {num_steps!r}")
  t = 1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
  return schedule_fn(t)


_SCHEDULES = {"cosine": cosine_log_snr, "linear": linear_log_snr}


def get_schedule(name: str) -> ScheduleFn:
  """Schedule function by name, for configs: "cosine" (Nichol & Dhariwal 2021) or "linear"."""
  try:
    return _SCHEDULES[name]
  except (KeyError, TypeError):
    raise UserError(
        f"unknown noise schedule {name!r}; valid names: {sorted(_SCHEDULES)}") from None
