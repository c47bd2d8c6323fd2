"""Samplers against closed forms.

For Gaussian data x0 ~ N(mu, s^2) (per dimension) the Bayes-optimal denoiser is known exactly
(see test_diffusion_losses.optimal), and so is the probability-flow ODE: it keeps each
example's z-score, x_s = alpha_s mu + sqrt(alpha_s^2 s^2 + sigma_s^2) * z with
z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2). For two point masses at +-1 the
optimal denoiser is tanh(alpha x_t / sigma^2).

Programs are compiled once per (method, objective, model, shapes) through `_sampler`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax.diffusion import samplers
from imagen_jax.errors import UserError
from test_diffusion_losses import optimal

MU = jnp.array([0.5, -1.0])
S = jnp.array([0.5, 1.5])
BATCH = 4096
# Cosine grid, 100 steps, then +inf: the last step returns x0_hat.
GRID = jnp.append(diffusion.log_snr_grid(diffusion.cosine_log_snr, 100), jnp.inf)


def gaussian_model(x, log_snr, *, objective="eps"):
  # Returns NaN if ever called at an infinite log-SNR, which the samplers must never do.
  pred = optimal(x, log_snr, objective=objective, mu=MU, s=S)
  return jnp.where(jnp.isfinite(log_snr)[:, None], pred, jnp.nan)


def two_point_model(x, log_snr):
  lam = log_snr[:, None]
  alpha, sigma2 = jnp.sqrt(jax.nn.sigmoid(lam)), jax.nn.sigmoid(-lam)
  return jnp.tanh(alpha * x / sigma2)


@functools.lru_cache(maxsize=None)
def _sampler(method, objective="eps", model=gaussian_model, eta=0.0, x0_transform=None):
  if model is gaussian_model:
    model = functools.partial(gaussian_model, objective=objective)
  return jax.jit(functools.partial(diffusion.sample, model, method=method, objective=objective,
                                   eta=eta, x0_transform=x0_transform))


@pytest.fixture(scope="module")
def x_init():
  return jax.random.normal(jax.random.key(0), (BATCH, 2))


def exact_flow(x, lam_from, lam_to):
  a0, s0 = diffusion.alpha_sigma(lam_from)
  a1, s1 = diffusion.alpha_sigma(lam_to)
  z = (x - a0 * MU) / jnp.sqrt(a0**2 * S**2 + s0**2)
  return a1 * MU + jnp.sqrt(a1**2 * S**2 + s1**2) * z


@pytest.mark.parametrize("method,objective", [("ddpm", "eps"), ("ddim", "v"), ("dpmpp_2m", "x0")])
def test_gaussian_data_moments(x_init, method, objective):
  out = _sampler(method, objective)(x_init, GRID, rng=jax.random.key(1))
  assert np.all(np.isfinite(out))  # NaN if the model had been called at the final +inf
  mean_err, std_err = np.abs(out.mean(axis=0) - MU), np.abs(out.std(axis=0) / S - 1)
  assert np.all(mean_err < 4 * S / np.sqrt(BATCH)), mean_err  # 4 standard errors
  assert np.all(std_err < 0.04), std_err
  if method != "ddpm":  # deterministic: close to the exact flow of each example
    err = jnp.sqrt(jnp.mean(jnp.square(out - exact_flow(x_init, GRID[0], jnp.inf))))
    assert float(err) < 0.05, err


def k_diffusion_dpmpp_2m(x_vp, log_snrs):
  """k-diffusion's sample_dpmpp_2m, transcribed in NumPy float64 in its variance-exploding
  variables: sigma_ve = sigma / alpha = exp(-lambda / 2), x_ve = x_vp / alpha."""
  lam = np.asarray(log_snrs, np.float64)
  sigmas, alphas = np.exp(-lam / 2), np.sqrt(1 / (1 + np.exp(-lam)))
  mu, s = np.asarray(MU, np.float64), np.asarray(S, np.float64)

  def denoiser(x_ve, i):  # Bayes-optimal x0 for N(mu, s^2), from x_vp = alpha x_ve
    a = alphas[i]
    return mu + a * s**2 / (a**2 * s**2 + 1 - a**2) * (a * x_ve - a * mu)

  x, old = np.asarray(x_vp, np.float64) / alphas[0], None
  t_fn = lambda sigma: -np.log(sigma)
  for i in range(len(sigmas) - 1):
    denoised = denoiser(x, i)
    t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
    h = t_next - t
    if old is None:
      x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * denoised
    else:
      r = (t - t_fn(sigmas[i - 1])) / h
      denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
      x = (sigmas[i + 1] / sigmas[i]) * x - np.expm1(-h) * denoised_d
    old = denoised
  return x * alphas[-1]


def test_dpmpp_2m_beats_ddim_at_10_steps(x_init):
  grid = jnp.linspace(-10.0, 10.0, 11)  # uniform in log-SNR
  exact = exact_flow(x_init, grid[0], grid[-1])
  rms, outs = {}, {}
  for method in ("ddim", "dpmpp_2m"):
    outs[method] = _sampler(method, "x0")(x_init, grid)
    rms[method] = float(jnp.sqrt(jnp.mean(jnp.square(outs[method] - exact))))
  # Measured: ddim 0.25, dpmpp_2m 0.043.
  assert rms["dpmpp_2m"] < rms["ddim"] / 4, rms
  assert rms["dpmpp_2m"] < 0.08, rms
  # Same method as k-diffusion's reference implementation.
  np.testing.assert_allclose(outs["dpmpp_2m"], k_diffusion_dpmpp_2m(x_init, grid), atol=1e-4)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp_2m"])
def test_two_point_mixture_splits_evenly(x_init, method):
  out = _sampler(method, "x0", two_point_model)(x_init, GRID, rng=jax.random.key(2))
  np.testing.assert_allclose(np.abs(out), 1.0, atol=1e-3)
  frac_positive = np.mean(np.asarray(out) > 0, axis=0)
  np.testing.assert_allclose(frac_positive, 0.5, atol=4 * 0.5 / np.sqrt(BATCH))


def test_ddim_eta_one_is_ddpm(x_init):
  rng = jax.random.key(3)
  ddpm = _sampler("ddpm", "eps")(x_init, GRID, rng=rng)
  ddim = jax.jit(lambda x, grid, rng, eta: diffusion.sample(
      functools.partial(gaussian_model, objective="eps"), x, grid, method="ddim", rng=rng, eta=eta))
  np.testing.assert_allclose(ddim(x_init, GRID, rng, 1.0), ddpm, atol=2e-3)
  assert float(jnp.max(jnp.abs(ddim(x_init, GRID, rng, 0.5) - ddpm))) > 0.1


def test_inf_last_step_returns_transformed_x0_hat(x_init):
  run = _sampler("ddim", "v")
  with_inf = run(x_init, GRID)  # GRID[-1] = inf
  before_last = run(x_init, GRID[:-1])  # ends at GRID[-2], where the last step starts
  x0_hat = optimal(before_last, jnp.full((BATCH,), GRID[-2]), objective="x0", mu=MU, s=S)
  np.testing.assert_allclose(with_inf, x0_hat, rtol=1e-5, atol=1e-5)
  # x0_transform is applied to every x0_hat, the last one included.
  assert float(jnp.max(jnp.abs(run(x_init * 3, GRID)))) > 3.0
  clipped = _sampler("ddim", "v", x0_transform=diffusion.static_threshold)(x_init * 3, GRID)
  assert np.all(np.isfinite(clipped)) and float(jnp.max(jnp.abs(clipped))) <= 1.0


def test_per_example_keys_are_independent_of_the_batch(x_init):
  keys = jax.random.split(jax.random.key(4), 8)
  run = _sampler("ddpm", "eps")
  out = run(x_init[:8], GRID, rng=keys)
  other = jax.random.split(jax.random.key(5), 8)
  mixed = run(x_init[:8].at[1:].set(-x_init[1:8]), GRID, rng=other.at[0].set(keys[0]))
  np.testing.assert_array_equal(mixed[0], out[0])
  assert np.all(np.asarray(mixed[1:] != out[1:]))
  # Raw uint32 key data [B, 2] is the same keys; one key gives each example its own noise.
  per_example = samplers._noise_fn(keys, (8, 3))(7)
  raw = samplers._noise_fn(jax.random.key_data(keys), (8, 3))(7)
  np.testing.assert_array_equal(raw, per_example)
  own = jax.random.normal(jax.random.fold_in(keys[2], 7), (3,))
  np.testing.assert_array_equal(per_example[2], own)
  one_key = np.asarray(samplers._noise_fn(jax.random.key(4), (8, 3))(7))
  assert len(np.unique(one_key[:, 0])) == 8


def test_jit_and_eager_agree(x_init):
  x, grid = x_init[:8], GRID[::10]
  model = functools.partial(gaussian_model, objective="v")
  eager = diffusion.sample(model, x, grid, method="dpmpp_2m", objective="v")
  jitted = jax.jit(functools.partial(diffusion.sample, model, method="dpmpp_2m", objective="v"))
  np.testing.assert_allclose(jitted(x, grid), eager, rtol=1e-5, atol=1e-5)


def test_bad_input(x_init):
  x, model = x_init[:4], gaussian_model
  with pytest.raises(UserError, match="'ddpm', 'ddim', 'dpmpp_2m'"):
    diffusion.sample(model, x, GRID, method="euler")
  with pytest.raises(UserError, match="'eps', 'v', 'x0'"):
    diffusion.sample(model, x, GRID, method="ddim", objective="score")
  for bad_grid in ([1.0, 0.0, 2.0], [0.0, 0.0, 1.0], [0.0, np.nan, 1.0], [0.0, 1.0, -np.inf],
                   [np.inf, 1.0, 2.0], [0.0]):
    with pytest.raises(UserError, match="log_snrs"):
      diffusion.sample(model, x, jnp.array(bad_grid), method="ddim")
  with pytest.raises(UserError, match="rng"):
    diffusion.sample(model, x, GRID, method="ddpm")
  with pytest.raises(UserError, match="rng"):
    diffusion.sample(model, x, GRID, method="ddim", eta=0.5)
  with pytest.raises(UserError, match="eta"):
    diffusion.sample(model, x, GRID, method="dpmpp_2m", eta=1.0)
  with pytest.raises(UserError, match="per-example keys"):
    diffusion.sample(model, x, GRID, method="ddpm", rng=jax.random.split(jax.random.key(0), 3))
