"""Forward process, targets and eps/v/x0 conversions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax.errors import UserError

OBJECTIVES = ("eps", "v", "x0")
LOG_SNRS = jnp.array([-8.0, -3.0, -0.5, 0.0, 1.0, 4.0, 8.0])


def _setup():
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (LOG_SNRS.shape[0], 4, 4, 3))
  noise = jax.random.normal(k2, x0.shape)
  return x0, noise, diffusion.q_sample(x0, LOG_SNRS, noise)


def test_q_sample_is_alpha_x0_plus_sigma_noise():
  x0, noise, x_t = _setup()
  lam = np.asarray(LOG_SNRS, np.float64)[:, None, None, None]
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  np.testing.assert_allclose(x_t, alpha * x0 + sigma * noise, rtol=1e-5, atol=1e-6)


def test_q_sample_marginal_moments():
  # x0 ~ N(mu, s^2) => x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2) (VDM eq. 1).
  mu, s, lam = 0.7, 0.4, 0.5
  k1, k2 = jax.random.split(jax.random.key(1))
  x0 = mu + s * jax.random.normal(k1, (20000, 8))
  x_t = diffusion.q_sample(x0, jnp.full((20000,), lam), jax.random.normal(k2, x0.shape))
  a2 = 1 / (1 + np.exp(-lam))
  np.testing.assert_allclose(np.mean(x_t), np.sqrt(a2) * mu, atol=0.01)
  np.testing.assert_allclose(np.var(x_t), a2 * s**2 + (1 - a2), rtol=0.02)


def test_target_definitions():
  x0, noise, _ = _setup()
  alpha, sigma = diffusion.alpha_sigma(LOG_SNRS[:, None, None, None])
  np.testing.assert_array_equal(diffusion.target(x0, noise, LOG_SNRS, "eps"), noise)
  np.testing.assert_array_equal(diffusion.target(x0, noise, LOG_SNRS, "x0"), x0)
  np.testing.assert_allclose(diffusion.target(x0, noise, LOG_SNRS, "v"), alpha * noise - sigma * x0,
                             rtol=1e-6)


@pytest.mark.parametrize("src,dst", list(itertools.product(OBJECTIVES, OBJECTIVES)))
def test_conversions_of_exact_targets_and_round_trip(src, dst):
  x0, noise, x_t = _setup()
  pred = diffusion.target(x0, noise, LOG_SNRS, src)
  converted = diffusion.convert(pred, x_t, LOG_SNRS, src, dst)
  np.testing.assert_allclose(converted, diffusion.target(x0, noise, LOG_SNRS, dst), atol=2e-3)
  back = diffusion.convert(converted, x_t, LOG_SNRS, dst, src)
  np.testing.assert_allclose(back, pred, atol=2e-3)


def test_to_x0_to_eps_and_jit():
  x0, noise, x_t = _setup()
  for objective in OBJECTIVES:
    pred = diffusion.target(x0, noise, LOG_SNRS, objective)
    np.testing.assert_allclose(diffusion.to_x0(pred, x_t, LOG_SNRS, objective), x0, atol=2e-3)
    np.testing.assert_allclose(diffusion.to_eps(pred, x_t, LOG_SNRS, objective), noise, atol=2e-3)
  jitted = jax.jit(diffusion.convert, static_argnames=("src", "dst"))
  eager = diffusion.convert(noise, x_t, LOG_SNRS, "eps", "v")
  np.testing.assert_allclose(jitted(noise, x_t, LOG_SNRS, src="eps", dst="v"), eager,
                             rtol=1e-5, atol=1e-6)


def test_conversions_are_affine_in_prediction():
  # Guidance mixes raw predictions; that is valid because the maps are affine.
  x0, noise, x_t = _setup()
  p1, p2, w = noise, x0, 3.0
  for src, dst in itertools.product(OBJECTIVES, OBJECTIVES):
    mixed = diffusion.convert(p1 + w * (p2 - p1), x_t, LOG_SNRS, src, dst)
    c1, c2 = (diffusion.convert(p, x_t, LOG_SNRS, src, dst) for p in (p1, p2))
    np.testing.assert_allclose(mixed, c1 + w * (c2 - c1), rtol=1e-4, atol=1e-3)


def test_bad_objective():
  x0, noise, x_t = _setup()
  with pytest.raises(UserError, match="'eps', 'v', 'x0'"):
    diffusion.target(x0, noise, LOG_SNRS, "score")
  with pytest.raises(UserError, match="valid objectives"):
    diffusion.convert(x0, x_t, LOG_SNRS, "eps", "velocity")
