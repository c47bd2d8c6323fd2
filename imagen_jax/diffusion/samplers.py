"""Samplers: DDPM (ancestral), DDIM (with eta) and DPM-Solver++(2M), over a log-SNR grid.

Each sampler is one short function over the grid, in the manner of k-diffusion's
`sampling.py`: it takes a denoiser x -> (x0_hat, eps_hat) and loops with `jax.lax.fori_loop`,
so a whole run is one compiled program whatever the number of steps. `sample` checks the
input, adapts the model (eps, v or x0 prediction, optional x0 thresholding) and dispatches.

Grid convention: `log_snrs` [N + 1] increases from noisy to clean. Step i goes from lambda_t =
log_snrs[i] to lambda_s = log_snrs[i + 1]; the model is only ever called at log_snrs[0..N-1],
so a last entry of +inf (alpha = 1, sigma = 0) is never passed to it and that last step
returns x0_hat, as k-diffusion does with sigma = 0.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import process
from imagen_jax.diffusion.schedules import alpha_sigma
from imagen_jax.errors import UserError

METHODS = ("ddpm", "ddim", "dpmpp_2m")

# denoise(x, log_snr scalar) -> (x0_hat, eps_hat)
Denoiser = Callable[[jax.Array, jax.Array], tuple]
# noise(step) -> standard normal array of x's shape
NoiseFn = Callable[[jax.Array], jax.Array]


def _posterior_terms(lam_t, lam_s):
  """Shared terms of a step from lambda_t to lambda_s > lambda_t (VDM appendix A.1).

  Returns alpha_s, sigma_s, sigma_t, snr_ratio = SNR_t/SNR_s = exp(lambda_t - lambda_s), and
  c = 1 - SNR_t/SNR_s = -expm1(lambda_t - lambda_s) = sigma_{t|s}^2 / sigma_t^2. An infinite
  lambda_s is replaced by a finite one here; the caller returns x0_hat for that step.
  """
  lam_s = jnp.where(jnp.isfinite(lam_s), lam_s, lam_t + 1.0)
  alpha_s, sigma_s = alpha_sigma(lam_s)
  _, sigma_t = alpha_sigma(lam_t)
  return alpha_s, sigma_s, sigma_t, jnp.exp(lam_t - lam_s), -jnp.expm1(lam_t - lam_s)


def _first_step(start, num_steps: int):
  """The loop's first index: 0, or the earliest start, since the steps before it change no
  example (an SDEdit or a super-resolution stage that starts at t = 0.3 of a 25-step grid
  runs 7 model calls, not 25). An empty batch runs no step."""
  return 0 if start is None else jnp.min(start, initial=num_steps)


def _active(i, start, x):
  """Whether step i runs for each example: all examples without `start`, else those whose
  start index [B] is <= i (SDEdit, Meng et al. 2021: each starts on the tail of the grid);
  shaped to broadcast against x."""
  if start is None:
    return True
  return (i >= start).reshape((-1,) + (1,) * (x.ndim - 1))


def ddpm(denoise: Denoiser, x, log_snrs, noise: NoiseFn, start=None, resample_steps: int = 1):
  """Ancestral sampling (Ho et al. 2020, Algorithm 2) with the posterior q(x_s | x_t, x0)
  in log-SNR form (Kingma et al. 2021, VDM eq. 28-30 / appendix A.1):
    mu = (alpha_t / alpha_s) (sigma_s^2 / sigma_t^2) x_t + alpha_s c x0_hat
       = sqrt(SNR_t / SNR_s) (sigma_s / sigma_t) x_t + alpha_s c x0_hat,
    var = sigma_s^2 c,   c = -expm1(lambda_t - lambda_s).

  resample_steps R > 1 is RePaint's resampling (Lugmayr et al. 2022, Algorithm 1, jump
  length 1): after a step t -> s, x_s is noised back to t by the forward process,
  x_t = (alpha_t / alpha_s) x_s + sigma_t sqrt(c) z (the exact q(x_t | x_s)), and the
  step is taken again, R times in all; it harmonises an inpainted region with the kept one.
  """
  n = log_snrs.shape[0] - 1

  def one_step(i, x, z):
    lam_t, lam_s = log_snrs[i], log_snrs[i + 1]
    x0, _ = denoise(x, lam_t)
    alpha_s, sigma_s, sigma_t, snr_ratio, c = _posterior_terms(lam_t, lam_s)
    mean = jnp.sqrt(snr_ratio) * (sigma_s / sigma_t) * x + alpha_s * c * x0
    return jnp.where(jnp.isinf(lam_s), x0, mean + sigma_s * jnp.sqrt(c) * z)

  def step(i, x):
    x_s = one_step(i, x, noise(i))
    if resample_steps > 1:
      def again(u, x_s):
        lam_t, lam_s = log_snrs[i], log_snrs[i + 1]
        alpha_t, sigma_t = alpha_sigma(lam_t)
        alpha_s, _ = alpha_sigma(jnp.where(jnp.isfinite(lam_s), lam_s, lam_t + 1.0))
        c = -jnp.expm1(lam_t - lam_s)  # sigma_{t|s}^2 / sigma_t^2, = 1 to a clean s
        extra = n + 2 * (i * (resample_steps - 1) + u)  # noise indices after the steps'
        x_t = (alpha_t / jnp.where(jnp.isinf(lam_s), 1.0, alpha_s)) * x_s + (
            sigma_t * jnp.sqrt(c) * noise(extra))
        return one_step(i, x_t, noise(extra + 1))
      x_s = jax.lax.fori_loop(0, resample_steps - 1, again, x_s)
    return jnp.where(_active(i, start, x), x_s, x)
  return jax.lax.fori_loop(_first_step(start, n), n, step, x)


def ddim(denoise: Denoiser, x, log_snrs, noise: Optional[NoiseFn], eta=0.0, start=None):
  """DDIM (Song et al. 2020, eq. 12) in log-SNR form:
    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c_eta^2) eps_hat + c_eta z,
    c_eta^2 = eta^2 * var,  var = sigma_s^2 c the DDPM posterior variance (Song et al. eq. 16).
  eta = 0 is deterministic; eta = 1 is exactly the DDPM ancestral step, because
  sigma_s^2 - var = sigma_s^2 SNR_t/SNR_s makes the mean coincide with VDM's posterior mean.
  sigma_s^2 - c_eta^2 = sigma_s^2 ((1 - eta^2) + eta^2 SNR_t/SNR_s) is written without
  cancellation.
  """
  eta = jnp.asarray(eta, jnp.float32)

  def step(i, x):
    lam_t, lam_s = log_snrs[i], log_snrs[i + 1]
    x0, eps = denoise(x, lam_t)
    alpha_s, sigma_s, _, snr_ratio, c = _posterior_terms(lam_t, lam_s)
    eta2 = jnp.square(eta)
    x_next = alpha_s * x0 + sigma_s * jnp.sqrt((1.0 - eta2) + eta2 * snr_ratio) * eps
    if noise is not None:
      x_next = x_next + eta * sigma_s * jnp.sqrt(c) * noise(i)
    return jnp.where(_active(i, start, x), jnp.where(jnp.isinf(lam_s), x0, x_next), x)
  n = log_snrs.shape[0] - 1
  return jax.lax.fori_loop(_first_step(start, n), n, step, x)


def dpmpp_2m(denoise: Denoiser, x, log_snrs, start=None):
  """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), in the half-log-SNR
  lambda = log(alpha / sigma) = log_snr / 2 of that paper; k-diffusion's `sample_dpmpp_2m`
  is the same method in its sigma parameterisation. With h = lambda_s - lambda_t:
    x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^-h) D,
    D = (1 + 1/(2r)) x0_hat_i - 1/(2r) x0_hat_{i-1},  r = h_{i-1} / h_i,
  with D = x0_hat_i (first order, = DDIM) on the first step and on a last step to +inf.
  With per-example `start` indices an example's first step is its own start.
  """
  def step(i, carry):
    x, x0_prev = carry
    lam_t, lam_s = log_snrs[i], log_snrs[i + 1]
    lam_prev = log_snrs[jnp.maximum(i - 1, 0)]
    x0, _ = denoise(x, lam_t)
    alpha_s, sigma_s, sigma_t, _, _ = _posterior_terms(lam_t, lam_s)
    first = 0 if start is None else start.reshape((-1,) + (1,) * (x.ndim - 1))
    second_order = (i > first) & jnp.isfinite(lam_s)
    h = jnp.where(jnp.isfinite(lam_s), lam_s - lam_t, 1.0) / 2
    r = jnp.where(second_order, (lam_t - lam_prev) / 2 / h, 1.0)
    d = jnp.where(second_order, (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev, x0)
    x_next = (sigma_s / sigma_t) * x - alpha_s * jnp.expm1(-h) * d
    active = _active(i, start, x)
    return (jnp.where(active, jnp.where(jnp.isinf(lam_s), x0, x_next), x),
            jnp.where(active, x0, x0_prev))
  n = log_snrs.shape[0] - 1
  x, _ = jax.lax.fori_loop(_first_step(start, n), n, step, (x, jnp.zeros_like(x)))
  return x


def _denoiser(model_fn, batch: int, objective: str, x0_transform) -> Denoiser:
  """Adapts a model of any objective to (x0_hat, eps_hat), like k-diffusion's wrappers.

  With an x0_transform (thresholding, Saharia et al. 2022 section 2.3) eps_hat is recomputed
  from the transformed x0_hat, so every step uses the transformed prediction.
  """
  def denoise(x, log_snr):
    log_snr_b = jnp.full((batch,), log_snr, jnp.float32)
    pred = jnp.asarray(model_fn(x, log_snr_b), jnp.float32)
    x0 = process.to_x0(pred, x, log_snr_b, objective)
    if x0_transform is None:
      return x0, process.to_eps(pred, x, log_snr_b, objective)
    x0 = x0_transform(x0)
    return x0, process.to_eps(x0, x, log_snr_b, "x0")
  return denoise


def _noise_fn(rng, shape) -> NoiseFn:
  """Per-step standard normal noise from one key, or from one key per example.

  With one key per example (typed key array [B], or raw uint32 keys [B, 2]) example b's noise
  at step i is normal(fold_in(key_b, i)): it depends on its own key only, so padding or
  splitting a batch never changes an example.
  """
  if not jax.dtypes.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
    rng = jnp.asarray(rng)
    if rng.dtype != jnp.uint32 or rng.ndim not in (1, 2):
      raise UserError(f"rng must be a PRNG key or one key per example, got dtype {rng.dtype} "
                      f"shape {rng.shape}")
    rng = jax.random.wrap_key_data(rng)
  if rng.ndim == 0:
    return lambda i: jax.random.normal(jax.random.fold_in(rng, i), shape, jnp.float32)
  if rng.shape != shape[:1]:
    raise UserError(f"got {rng.shape[0]} per-example keys for a batch of {shape[0]}; pass one key "
                    "or one key per example")
  per_example = lambda key, i: jax.random.normal(jax.random.fold_in(key, i), shape[1:], jnp.float32)
  return lambda i: jax.vmap(per_example, in_axes=(0, None))(rng, i)


def _is_zero(value) -> bool:
  try:
    return float(value) == 0.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False  # traced: assume it may be non-zero


def _check_grid(log_snrs):
  """The grid must be 1-D, at least 2 entries, finite except a last +inf, strictly increasing.
  Checked when the values are known (not under jit, where only the shape is)."""
  if log_snrs.ndim != 1 or log_snrs.shape[0] < 2:
    raise UserError(f"log_snrs must be a 1-D grid with at least 2 entries, got shape "
                    f"{log_snrs.shape}")
  try:
    values = np.asarray(log_snrs)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  head_ok = np.all(np.isfinite(values[:-1])) and not np.isnan(values[-1])
  if not head_ok or values[-1] == -np.inf or not np.all(np.diff(values) > 0):
    raise UserError(f"log_snrs must increase strictly from noisy to clean and be finite except a "
                    f"last +inf, got {values.tolist()}; e.g. use log_snr_grid(schedule, steps)")


def sample(model_fn, x_init, log_snrs, *, method: str, rng=None, objective: str = "eps",
           x0_transform=None, eta=0.0, start_index=None, resample_steps: int = 1):
  """Runs the reverse process from x_init at log_snrs[0] to log_snrs[-1].

  Args:
    model_fn: model_fn(x, log_snr [B]) -> prediction of `objective`; close over any
      conditioning (functools.partial, `classifier_free_guidance`).
    x_init: [B, ...] starting point at log_snrs[0], made by the caller (usually N(0, I)).
    log_snrs: [N + 1] strictly increasing; a last +inf makes the last step return x0_hat.
    method: "ddpm" (Ho et al. 2020), "ddim" (Song et al. 2020) or "dpmpp_2m" (Lu et al. 2022).
    rng: one key, or one key per example; needed by "ddpm" and by "ddim" with eta > 0.
    objective: what model_fn predicts: "eps", "v" (Salimans & Ho 2022) or "x0".
    x0_transform: applied to every x0_hat (e.g. `dynamic_threshold`, Saharia et al. 2022 §2.3).
    eta: DDIM stochasticity (Song et al. 2020 eq. 16); only for method="ddim".
    start_index: per-example int [B]: example b starts at log_snrs[start_index[b]] (x_init
      is then its state there, e.g. `q_sample(image, log_snrs[k], noise)` for SDEdit, Meng
      et al. 2021) and skips the steps before; None = every example starts at 0. One
      batched program whatever the starts: the loop begins at the earliest start, and an
      example's steps before its own start leave it unchanged.
    resample_steps: RePaint's resampling (Lugmayr et al. 2022) for "ddpm": each step is
      taken this many times, noising back in between (1 = none).

  Returns:
    x at log_snrs[-1], float32, shape of x_init.
  """
  if method not in METHODS:
    raise UserError(f"unknown sampling method {method!r}; valid methods: {list(METHODS)}")
  process.check_objective(objective)
  if isinstance(resample_steps, bool) or not isinstance(resample_steps, int) \
      or resample_steps < 1 or (resample_steps > 1 and method != "ddpm"):
    raise UserError(f"resample_steps={resample_steps!r} must be a positive integer, and > 1 "
                    "only with method='ddpm' (RePaint resamples ancestral steps)")
  if method != "ddim" and not _is_zero(eta):
    raise UserError(f"eta={eta!r} applies only to method='ddim', not {method!r}")
  needs_rng = method == "ddpm" or (method == "ddim" and not _is_zero(eta))
  if needs_rng and rng is None:
    raise UserError(f"method={method!r} with eta={eta!r} adds noise at each step: pass rng "
                    "(one key, or one key per example)")
  log_snrs = jnp.asarray(log_snrs, jnp.float32)
  _check_grid(log_snrs)
  x = jnp.asarray(x_init, jnp.float32)
  denoise = _denoiser(model_fn, x.shape[0], objective, x0_transform)
  noise = _noise_fn(rng, x.shape) if rng is not None else None
  start = None if start_index is None else jnp.asarray(start_index, jnp.int32)
  if method == "ddpm":
    return ddpm(denoise, x, log_snrs, noise, start, resample_steps)
  if method == "ddim":
    return ddim(denoise, x, log_snrs, noise if needs_rng else None, eta, start)
  return dpmpp_2m(denoise, x, log_snrs, start)
