"""Schedules: values from the papers, monotone and finite on [0, 1] in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax.errors import UserError

SCHEDULES = [diffusion.cosine_log_snr, diffusion.linear_log_snr]
DENSE_T = np.concatenate([np.linspace(0.0, 1.0, 100_001), [0.0, 1e-7, 1.0 - 1e-7, 1.0]])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_finite_and_decreasing_on_dense_grid(schedule):
  lam = np.asarray(schedule(jnp.asarray(np.sort(DENSE_T), jnp.float32)))
  assert lam.dtype == np.float32
  assert np.all(np.isfinite(lam))
  assert np.all(np.diff(lam) <= 0)  # t -> noisier
  alpha, sigma = diffusion.alpha_sigma(lam)
  assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(sigma))
  np.testing.assert_allclose(np.square(alpha) + np.square(sigma), 1.0, atol=1e-6)


def test_cosine_matches_nichol_dhariwal_alpha_bar():
  # alpha_bar(t) = cos^2((t + s)/(1 + s) pi/2) (Nichol & Dhariwal 2021 eq. 17), not normalised.
  t = np.linspace(0.0, 0.99, 50)
  alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
  alpha, _ = diffusion.alpha_sigma(diffusion.cosine_log_snr(t))
  np.testing.assert_allclose(np.square(alpha), alpha_bar, rtol=2e-5, atol=1e-7)
  lam0 = -np.log(np.tan(0.008 / 1.008 * np.pi / 2) ** 2)
  np.testing.assert_allclose(diffusion.cosine_log_snr(0.0), lam0, rtol=1e-6)
  assert 8.7 < float(diffusion.cosine_log_snr(0.0)) < 8.9
  assert -40.0 < float(diffusion.cosine_log_snr(1.0)) < -25.0


def test_linear_matches_ddpm_discrete_betas():
  # DDPM's 1000 linear betas 1e-4 ... 0.02 (Ho et al. 2020 section 4): alpha_bar_i = prod(1 - beta).
  # -log alpha_bar = 0.1 t + 10 t^2 there, 1e-4 + 10 t^2 here: close once the t^2 term dominates.
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  log_alpha_bar = np.cumsum(np.log1p(-betas))[299:]
  t = np.arange(300, 1001) / 1000.0
  alpha, _ = diffusion.alpha_sigma(diffusion.linear_log_snr(t))
  np.testing.assert_allclose(2 * np.log(np.asarray(alpha, np.float64)), log_alpha_bar, rtol=0.05)
  np.testing.assert_allclose(diffusion.linear_log_snr(0.0), -np.log(np.expm1(1e-4)), rtol=1e-6)


def test_alpha_sigma_extremes():
  alpha, sigma = diffusion.alpha_sigma(jnp.array([-jnp.inf, -100.0, 0.0, 100.0, jnp.inf]))
  np.testing.assert_allclose(alpha, [0.0, np.exp(-50.0), np.sqrt(0.5), 1.0, 1.0], rtol=1e-5)
  np.testing.assert_allclose(sigma, [1.0, 1.0, np.sqrt(0.5), np.exp(-50.0), 0.0], rtol=1e-5)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_log_snr_grid(name):
  schedule = diffusion.get_schedule(name)
  grid = np.asarray(diffusion.log_snr_grid(schedule, 50))
  assert grid.shape == (51,)
  assert np.all(np.isfinite(grid)) and np.all(np.diff(grid) > 0)
  np.testing.assert_allclose(grid[-1], schedule(0.0), rtol=1e-6)
  np.testing.assert_allclose(grid[0], schedule(1.0), rtol=1e-6)
  np.testing.assert_allclose(grid[10], schedule(1.0 - 10 / 50), rtol=1e-5)


def test_jit_matches_eager():
  t = jnp.linspace(0.0, 1.0, 17)
  for schedule in SCHEDULES:
    np.testing.assert_allclose(jax.jit(schedule)(t), schedule(t), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(diffusion.alpha_sigma)(t * 10)[1],
                             diffusion.alpha_sigma(t * 10)[1], rtol=1e-6)


def test_bad_input():
  with pytest.raises(UserError, match="cosine.*linear"):
    diffusion.get_schedule("sigmoid")
  for bad in (0, -3, 2.5, True):
    with pytest.raises(UserError, match="num_steps"):
      diffusion.log_snr_grid(diffusion.cosine_log_snr, bad)
