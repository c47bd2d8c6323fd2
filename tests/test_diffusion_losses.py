"""Losses against closed forms: the Bayes-optimal predictor of Gaussian data.

Data x0 ~ N(mu, s^2) per dimension, x_t = alpha x0 + sigma eps, D = alpha^2 s^2 + sigma^2:
  E[x0 | x_t] = mu + alpha s^2 / D (x_t - alpha mu),   Var[x0 | x_t] = s^2 sigma^2 / D,
so the irreducible per-dimension losses are  x0: s^2 sigma^2 / D,  eps: alpha^2 s^2 / D
(eps = (x_t - alpha x0) / sigma),  v: s^2 / D  (v = (alpha x_t - x0) / sigma).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax.errors import UserError

MU, S = 0.5, 0.7
LEVELS = np.array([-6.0, -2.0, 0.0, 2.0, 6.0], np.float32)
PER_LEVEL = 1024


def optimal(x_t, log_snr, *, objective, mu, s):
  """Bayes-optimal prediction for x0 ~ N(mu, s^2), written out independently of process.py."""
  lam = log_snr[:, None]
  a2, sg2 = jax.nn.sigmoid(lam), jax.nn.sigmoid(-lam)
  alpha, sigma, d = jnp.sqrt(a2), jnp.sqrt(sg2), a2 * s**2 + sg2
  x0 = mu + alpha * s**2 / d * (x_t - alpha * mu)
  eps = sigma * (x_t - alpha * mu) / d
  return {"x0": x0, "eps": eps, "v": alpha * eps - sigma * x0}[objective]


def irreducible(lam, objective, s=S):
  a2, sg2 = 1 / (1 + np.exp(-lam)), 1 / (1 + np.exp(lam))
  d = a2 * s**2 + sg2
  return {"x0": s**2 * sg2 / d, "eps": a2 * s**2 / d, "v": s**2 / d}[objective]


@pytest.fixture(scope="module")
def data():
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = MU + S * jax.random.normal(k1, (LEVELS.size * PER_LEVEL, 16))
  return x0, jax.random.normal(k2, x0.shape), jnp.asarray(np.repeat(LEVELS, PER_LEVEL))


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_loss_of_optimal_predictor_is_irreducible_value(data, objective):
  x0, noise, log_snr = data
  model = functools.partial(optimal, objective=objective, mu=MU, s=S)
  loss = diffusion.loss_at(model, x0, log_snr, noise, objective=objective)
  per_level = np.asarray(loss).reshape(LEVELS.size, PER_LEVEL).mean(axis=1)
  np.testing.assert_allclose(per_level, irreducible(LEVELS, objective), rtol=0.03)


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_loss_of_point_mass_is_zero(data, objective):
  _, noise, log_snr = data
  x0 = jnp.full(noise.shape, MU)
  model = functools.partial(optimal, objective=objective, mu=MU, s=0.0)
  loss = diffusion.loss_at(model, x0, log_snr, noise, objective=objective, weighting="min_snr")
  np.testing.assert_allclose(loss, 0.0, atol=1e-8)
  identity = lambda x, lam: x  # a wrong predictor has a clearly positive loss
  assert float(diffusion.loss_at(identity, x0, log_snr, noise, objective=objective).mean()) > 0.01


@pytest.mark.parametrize("weighting,x0_weight", [
    ("min_snr", lambda snr: np.minimum(snr, 5.0)),
    ("clamped_snr", lambda snr: np.clip(snr, 1.0, 5.0))])
def test_snr_weights_agree_in_x0_space(data, weighting, x0_weight):
  # Any x0 predictor, expressed as eps/v/x0 predictions, gets the same weighted loss:
  # min-SNR is min(SNR, gamma) ||x0 - x0_hat||^2 for all three (Hang et al. 2023 §3.4);
  # clamped-SNR floors that weight at 1 (Salimans & Ho 2022's truncated SNR at high noise).
  x0, noise, log_snr = data
  # The data's log-SNRs reach both sides of the clamp, so both bounds are exercised.
  assert float(log_snr.min()) < 0.0 and float(log_snr.max()) > np.log(5.0)
  wrong_x0 = lambda x, lam: 0.3 * x + jnp.sin(x)
  losses = []
  for objective in ("eps", "v", "x0"):
    model = lambda x, lam, o=objective: diffusion.convert(wrong_x0(x, lam), x, lam, "x0", o)
    losses.append(diffusion.loss_at(model, x0, log_snr, noise, objective=objective,
                                    weighting=weighting, min_snr_gamma=5.0))
  x_t = diffusion.q_sample(x0, log_snr, noise)
  x0_mse = jnp.mean(jnp.square(wrong_x0(x_t, log_snr) - x0), axis=1)
  expected = x0_weight(np.exp(np.asarray(log_snr, np.float64))) * x0_mse
  for loss in losses:
    np.testing.assert_allclose(loss, expected, rtol=2e-3, atol=1e-6)


def test_diffusion_loss_is_uniform_time_average():
  # E_t~U[0,1] of the irreducible eps loss under the cosine schedule, by quadrature.
  n = 8192
  x0 = MU + S * jax.random.normal(jax.random.key(2), (n, 16))
  model = functools.partial(optimal, objective="eps", mu=MU, s=S)
  loss_fn = jax.jit(functools.partial(diffusion.diffusion_loss, model,
                                      schedule_fn=diffusion.cosine_log_snr, objective="eps"))
  loss = loss_fn(x0, jax.random.key(3))
  assert loss.shape == (n,)
  t = (np.arange(100_000) + 0.5) / 100_000
  expected = irreducible(np.asarray(diffusion.cosine_log_snr(t), np.float64), "eps").mean()
  np.testing.assert_allclose(float(loss.mean()), expected, rtol=0.03)
  np.testing.assert_array_equal(loss_fn(x0, jax.random.key(3)), loss)  # deterministic in rng
  assert not np.allclose(loss_fn(x0, jax.random.key(4)), loss)


def test_cond_kwargs_reach_the_model(data):
  x0, noise, log_snr = data
  model = lambda x, lam, *, offset: noise + offset
  loss = diffusion.loss_at(model, x0, log_snr, noise, objective="eps", offset=2.0)
  np.testing.assert_allclose(loss, 4.0, rtol=1e-6)


def test_bad_input(data):
  x0, noise, log_snr = data
  with pytest.raises(UserError, match="valid objectives"):
    diffusion.loss_at(lambda x, l: x, x0, log_snr, noise, objective="score")
  with pytest.raises(UserError, match="'none', 'min_snr', 'clamped_snr'"):
    diffusion.diffusion_loss(lambda x, l: x, x0, jax.random.key(0),
                             schedule_fn=diffusion.cosine_log_snr, weighting="p2")
