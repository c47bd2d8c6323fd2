"""Training losses: mean squared error on the eps, v or x0 target, optionally min-SNR weighted.

All three objectives are the same x0-space loss with different weights (Salimans & Ho 2022,
section 4; Kingma et al. 2021, VDM eq. 13): with SNR = exp(lambda),
  ||eps - eps_hat||^2 = SNR       * ||x0 - x0_hat||^2
  ||v - v_hat||^2     = (SNR + 1) * ||x0 - x0_hat||^2
  ||x0 - x0_hat||^2   = 1         * ||x0 - x0_hat||^2
Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy", eq. 9-10 and section 3.4) makes the x0-space weight min(SNR, gamma) for every
objective, so the weight on the objective's own loss is min(SNR, gamma) / w_objective:
  eps: min(SNR, gamma) / SNR     v: min(SNR, gamma) / (SNR + 1)     x0: min(SNR, gamma).
Clamped-SNR weighting is min-SNR with a floor of 1: x0-space weight max(min(SNR, gamma), 1),
i.e. min-SNR-gamma at low noise and Salimans & Ho's "truncated SNR" max(SNR, 1) (section 4)
at high noise. Min-SNR's weight min(SNR, gamma) vanishes at high noise (SNR e^-10 at
log-SNR -10), where a text-to-image model decides the layout; the floor keeps weight there
(docs/diffusion.md).
"""

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import process
from imagen_jax.errors import UserError

WEIGHTINGS = ("none", "min_snr", "clamped_snr")


def loss_weight(log_snr, objective: str, weighting: str = "none", min_snr_gamma: float = 5.0):
  """Per-example weight on the squared error of `objective` (Hang et al. 2023, section 3.4).

  Written in log-SNR so that no SNR overflows: min(SNR, g)/SNR = min(1, g e^-lambda) and
  SNR/(SNR + 1) = sigmoid(lambda).
  """
  process.check_objective(objective)
  log_snr = jnp.asarray(log_snr, jnp.float32)
  if weighting == "none":
    return jnp.ones_like(log_snr)
  if weighting not in WEIGHTINGS:
    raise UserError(f"unknown loss weighting {weighting!r}; valid weightings: {list(WEIGHTINGS)}")
  gamma = jnp.float32(min_snr_gamma)
  # The x0-space weight, in log space: log min(SNR, g), floored at log 1 = 0 if clamped.
  log_w = jnp.minimum(log_snr, jnp.log(gamma))
  if weighting == "clamped_snr":
    log_w = jnp.maximum(log_w, 0.0)
  # Divided by the objective's own x0-space weight: SNR (eps), SNR + 1 (v), 1 (x0).
  if objective == "eps":
    return jnp.exp(log_w - log_snr)
  if objective == "v":
    return jnp.exp(log_w - log_snr) * jax.nn.sigmoid(log_snr)  # SNR+1 = SNR / sigmoid
  return jnp.exp(log_w)


def loss_at(model_fn, x0, log_snr, noise, *, objective: str = "eps", weighting: str = "none",
            min_snr_gamma: float = 5.0, **cond):
  """Per-example loss [B] at given log-SNRs [B] and noise (Ho et al. 2020 eq. 14, "L_simple",
  generalised to the v and x0 targets of Salimans & Ho 2022 and the weights above).

  model_fn(x_t, log_snr, **cond) predicts `objective`. The squared error is averaged over the
  non-batch dimensions.
  """
  process.check_objective(objective)
  x0 = jnp.asarray(x0, jnp.float32)
  log_snr = jnp.broadcast_to(jnp.asarray(log_snr, jnp.float32), x0.shape[:1])
  x_t = process.q_sample(x0, log_snr, noise)
  pred = jnp.asarray(model_fn(x_t, log_snr, **cond), jnp.float32)
  err = jnp.square(pred - process.target(x0, noise, log_snr, objective))
  mse = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  return loss_weight(log_snr, objective, weighting, min_snr_gamma) * mse


def diffusion_loss(model_fn, x0, rng, *, schedule_fn, objective: str = "eps",
                   weighting: str = "none", min_snr_gamma: float = 5.0, **cond):
  """Per-example training loss [B] with t ~ U[0, 1] per example, as Imagen trains
  (Saharia et al. 2022, appendix; continuous time as in VDM section 3.3), and eps ~ N(0, I).

  Args:
    model_fn: model_fn(x_t, log_snr [B], **cond) -> prediction of `objective`.
    x0: clean data [B, ...].
    rng: one PRNG key.
    schedule_fn: t -> log-SNR, e.g. `cosine_log_snr`.
    objective: "eps", "v" or "x0".
    weighting: "none", "min_snr" (Hang et al. 2023) or "clamped_snr" (min-SNR floored
      at 1), both with `min_snr_gamma`.
    **cond: passed to model_fn unchanged.
  """
  process.check_objective(objective)
  if weighting not in WEIGHTINGS:
    raise UserError(f"unknown loss weighting {weighting!r}; valid weightings: {list(WEIGHTINGS)}")
  x0 = jnp.asarray(x0, jnp.float32)
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.uniform(t_rng, x0.shape[:1], jnp.float32)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  return loss_at(model_fn, x0, schedule_fn(t), noise, objective=objective, weighting=weighting,
                 min_snr_gamma=min_snr_gamma, **cond)
