"""Editing and guidance compositions of the diffusion core, against closed forms: negative
prompts, guidance schedules, the guidance interval, CFG rescale, classifier guidance,
inpainting's x0 transform and SDEdit's per-example start."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax import errors
from test_diffusion_guidance import B, fake_model, inputs, _uncond  # noqa: F401
from test_diffusion_losses import optimal


def test_negative_prompt_fills_the_unconditional_half(inputs):  # noqa: F811
  x, lam, cond = inputs
  cond_out = fake_model(x, lam, **cond)
  # Negative == conditional: both halves agree, so any scale gives the conditional model.
  same = dict(cond, negative_text_emb=cond["text_emb"], negative_text_mask=cond["text_mask"])
  guided = diffusion.classifier_free_guidance(fake_model, 6.0)
  np.testing.assert_allclose(guided(x, lam, **same), cond_out, rtol=1e-6, atol=1e-5)
  # An empty negative prompt (zero embedding, all-false mask) is the dropped caption.
  empty = dict(cond, negative_text_emb=jnp.zeros_like(cond["text_emb"]),
               negative_text_mask=jnp.zeros_like(cond["text_mask"]))
  np.testing.assert_array_equal(guided(x, lam, **empty), guided(x, lam, **cond))
  # Any other negative: uncond half is the model at the negative embedding, per example.
  neg_emb = cond["text_emb"][::-1] * 0.5
  other = dict(cond, negative_text_emb=neg_emb, negative_text_mask=cond["text_mask"][::-1])
  neg_out = fake_model(x, lam, **dict(cond, text_emb=neg_emb,
                                      text_mask=cond["text_mask"][::-1]))
  np.testing.assert_allclose(guided(x, lam, **other), neg_out + 6.0 * (cond_out - neg_out),
                             rtol=1e-5, atol=1e-4)


def test_scale_schedule_and_interval(inputs):  # noqa: F811
  x, lam, cond = inputs   # lam = [-1, 0, 3]
  cond_out, uncond_out = fake_model(x, lam, **cond), fake_model(x, lam, **_uncond(cond))
  schedule = lambda log_snr: 2.0 + log_snr   # a function of the noise level
  guided = diffusion.classifier_free_guidance(fake_model, schedule, interval=(-0.5, 2.0))
  # Inside [-0.5, 2] (example 1, lam 0) the scale is schedule(0) = 2; outside it is 1.
  scale = jnp.array([1.0, 2.0, 1.0])[:, None, None, None]
  np.testing.assert_allclose(guided(x, lam, **cond),
                             uncond_out + scale * (cond_out - uncond_out), rtol=1e-5,
                             atol=1e-4)


def test_rescale_phi_one_matches_the_conditional_std(inputs):  # noqa: F811
  x, lam, cond = inputs
  cond_out, uncond_out = fake_model(x, lam, **cond), fake_model(x, lam, **_uncond(cond))
  plain = uncond_out + 5.0 * (cond_out - uncond_out)
  full = diffusion.classifier_free_guidance(fake_model, 5.0, rescale=1.0)(x, lam, **cond)
  axes = (1, 2, 3)
  np.testing.assert_allclose(jnp.std(full, axis=axes), jnp.std(cond_out, axis=axes),
                             rtol=1e-5)
  # Same direction as the plain guided prediction (a positive multiple of it).
  ratio = full / plain
  np.testing.assert_allclose(ratio, ratio[:, :1, :1, :1] * jnp.ones_like(ratio), rtol=1e-4)
  half = diffusion.classifier_free_guidance(fake_model, 5.0, rescale=0.5)(x, lam, **cond)
  np.testing.assert_allclose(half, 0.5 * full + 0.5 * plain, rtol=1e-5, atol=1e-5)


# Gaussian data x0 ~ N(M, S^2) per dimension, label y ~ N(x0, R^2): the exact noisy
# likelihood is p(y | x_t) = N(y; E[x0 | x_t], Var[x0 | x_t] + R^2) and the posterior is
# x0 | y ~ N((M R^2 + y S^2) / (S^2 + R^2), S^2 R^2 / (S^2 + R^2)).
M, S, R, Y = 0.5, 1.0, 0.5, -1.0


def _noisy_log_likelihood(x_t, log_snr):
  a2, sg2 = jax.nn.sigmoid(log_snr)[:, None], jax.nn.sigmoid(-log_snr)[:, None]
  d = a2 * S**2 + sg2
  mean = M + jnp.sqrt(a2) * S**2 / d * (x_t - jnp.sqrt(a2) * M)
  var = S**2 * sg2 / d + R**2
  return jnp.sum(-0.5 * (Y - mean) ** 2 / var, axis=1)


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_classifier_guidance_samples_the_exact_posterior(objective):
  model = functools.partial(optimal, objective=objective, mu=M, s=S)
  guided = diffusion.classifier_guidance(model, _noisy_log_likelihood, 1.0, objective=objective)
  grid = jnp.append(diffusion.log_snr_grid(diffusion.cosine_log_snr, 400)[:-1], jnp.inf)
  x_init = jax.random.normal(jax.random.key(0), (4000, 4))
  run = jax.jit(lambda x: diffusion.sample(guided, x, grid, method="ddpm", objective=objective,
                                           rng=jax.random.key(1)))
  out = np.asarray(run(x_init))
  post_mean = (M * R**2 + Y * S**2) / (S**2 + R**2)
  post_var = S**2 * R**2 / (S**2 + R**2)
  assert abs(out.mean() - post_mean) < 0.02, out.mean()
  assert abs(out.var() / post_var - 1) < 0.05, out.var()
  # Not vacuous: the unguided model samples the prior N(M, S^2).
  prior = np.asarray(jax.jit(lambda x: diffusion.sample(
      model, x, grid, method="ddpm", objective=objective, rng=jax.random.key(1)))(x_init))
  assert abs(prior.mean() - M) < 0.03 and abs(prior.var() - S**2) < 0.06


def test_inpaint_transform_keeps_the_known_region():
  x0 = jnp.linspace(-3, 3, 2 * 4 * 4).reshape(2, 4, 4, 1)
  image = -0.5 * jnp.ones_like(x0)
  mask = (jnp.arange(4)[None, :, None, None] >= 2).astype(jnp.float32) * jnp.ones_like(x0)
  out = diffusion.inpaint_transform(image, mask, diffusion.static_threshold)(x0)
  np.testing.assert_array_equal(np.where(mask == 0, out, 0), np.where(mask == 0, image, 0))
  np.testing.assert_array_equal(np.where(mask == 1, out, 0),
                                np.where(mask == 1, jnp.clip(x0, -1, 1), 0))
  # The last step to +inf returns the transform: the known region is exactly the image.
  model = lambda x, log_snr: 0.3 * x
  final = diffusion.sample(model, x0, jnp.array([-2.0, 0.0, jnp.inf]), method="ddim",
                           x0_transform=diffusion.inpaint_transform(image, mask))
  np.testing.assert_array_equal(np.where(mask == 0, final, 0), np.where(mask == 0, image, 0))


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m"])
def test_start_index_runs_the_tail_of_the_grid(method):
  """Starting at index k equals sampling the grid log_snrs[k:] from the same state; each
  example of a batch follows its own start."""
  model = functools.partial(optimal, objective="eps", mu=0.5, s=0.7)
  grid = jnp.append(diffusion.log_snr_grid(diffusion.cosine_log_snr, 12)[:-1], jnp.inf)
  x = jax.random.normal(jax.random.key(3), (3, 2))
  starts = jnp.array([0, 4, 9])
  batched = diffusion.sample(model, x, grid, method=method, start_index=starts)
  for b, k in enumerate(np.asarray(starts)):
    tail = diffusion.sample(model, x[b:b + 1], grid[k:], method=method)
    np.testing.assert_allclose(batched[b:b + 1], tail, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      diffusion.sample(model, x, grid, method=method, start_index=jnp.zeros(3, int)),
      diffusion.sample(model, x, grid, method=method))


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp_2m"])
def test_sampling_begins_at_the_earliest_start(method):
  """Steps before every example's start are not run: a super-resolution stage or an SDEdit
  that starts late on the grid pays only for the steps it takes."""
  calls = []
  def model(x, log_snr):
    jax.debug.callback(lambda: calls.append(1))
    return 0.3 * x
  grid = jnp.append(diffusion.log_snr_grid(diffusion.cosine_log_snr, 12)[:-1], jnp.inf)
  x = jax.random.normal(jax.random.key(3), (2, 2))
  rng = jax.random.key(0) if method == "ddpm" else None
  jax.block_until_ready(diffusion.sample(model, x, grid, method=method, rng=rng,
                                         start_index=jnp.array([9, 7])))
  jax.effects_barrier()  # every callback has run
  assert len(calls) == 12 - 7
  calls.clear()
  jax.block_until_ready(diffusion.sample(model, x, grid, method=method, rng=rng))
  jax.effects_barrier()
  assert len(calls) == 12
  empty = diffusion.sample(model, x[:0], grid, method=method, rng=rng,
                           start_index=jnp.zeros(0, int))
  assert empty.shape == (0, 2)


def test_repaint_resampling_keeps_the_gaussian_marginal():
  """RePaint's re-noising is the exact forward q(x_t | x_s), so with the exact denoiser of
  Gaussian data the samples keep the data's moments up to ddpm's discretisation (which
  shrinks the variance by a few percent at 50 steps, more with each repeat; 400 steps here);
  R = 1 is plain ddpm."""
  model = functools.partial(optimal, objective="eps", mu=M, s=S)
  grid = jnp.append(diffusion.log_snr_grid(diffusion.cosine_log_snr, 400)[:-1], jnp.inf)
  x = jax.random.normal(jax.random.key(5), (4000, 4))
  run = lambda r: np.asarray(jax.jit(lambda x: diffusion.sample(
      model, x, grid, method="ddpm", rng=jax.random.key(2), resample_steps=r))(x))
  np.testing.assert_allclose(run(1), np.asarray(diffusion.sample(
      model, x, grid, method="ddpm", rng=jax.random.key(2))), rtol=1e-5, atol=1e-5)
  out = run(3)
  assert abs(out.mean() - M) < 0.03 and abs(out.var() / S**2 - 1) < 0.05, (out.mean(),
                                                                            out.var())
  assert not np.allclose(out, run(1))
  with pytest.raises(errors.UserError, match="resample_steps"):
    diffusion.sample(model, x, grid, method="ddim", resample_steps=2)


def test_stage_settings_build_the_linear_guidance_schedule(inputs):  # noqa: F811
  """SamplerSettings.guidance: the scale goes linearly from guidance_scale at the first
  model call to guidance_scale_end at the last, over the stage's grid."""
  from imagen_jax.diffusion import stage
  x, _, cond = inputs
  settings = stage.SamplerSettings(num_steps=5, guidance_scale=2.0, guidance_scale_end=6.0)
  grid = stage.sampling_grid("cosine", 5)
  assert grid.shape == (6,) and np.isinf(grid[-1])   # 5 model calls, then +inf
  guided = settings.guidance(fake_model, grid)
  for i, expected_scale in ((0, 2.0), (2, 4.0), (4, 6.0)):
    lam = jnp.full((B,), grid[i])
    c, u = fake_model(x, lam, **cond), fake_model(x, lam, **_uncond(cond))
    np.testing.assert_allclose(guided(x, lam, **cond), u + expected_scale * (c - u),
                               rtol=1e-5, atol=1e-4)


def test_sr_stage_starts_from_its_noised_upsampled_input():
  """SamplerSettings.lowres_start = s on an SR stage starts from up(lowres) noised to t = s
  (the grid point nearest s). Closed form: a model predicting eps = 0 makes every DDIM step
  x -> (alpha'/alpha) x, so the result is x_start / alpha_start = up + (sigma/alpha) noise,
  with `noise` the stage's initial noise of each image's seed."""
  from imagen_jax.diffusion import conditioning, stage as stage_lib
  from imagen_jax.train.checkpoint import ModelInfo
  size, steps, s = 8, 10, 0.3
  info = ModelInfo(model_class="EfficientUNet", image_size=size, text_dim=4, lowres_size=4,
                   objective="eps", lowres_resize="bilinear", max_time=0.5)
  settings = stage_lib.SamplerSettings(sampler="ddim", num_steps=steps, guidance_scale=1.0,
                                       thresholding="none", lowres_start=s, aug_level=0.0)
  lowres = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
  seeds = np.array([7, 8], np.uint32)
  zero_eps = lambda x, log_snr, **cond: jnp.zeros_like(x)
  out = stage_lib.sample_stage(zero_eps, settings, info, seeds, 1, text_emb=jnp.zeros((2, 3, 4)),
                               text_mask=jnp.ones((2, 3), bool), lowres=lowres)
  k_init, _, _ = stage_lib.stage_keys(seeds, 1)
  noise = jax.vmap(lambda k: jax.random.normal(k, (size, size, 3)))(k_init)
  up = conditioning.upsample(conditioning.to_float_image(lowres), size, "bilinear")
  grid = stage_lib.sampling_grid(info.schedule, steps)
  alpha, sigma = diffusion.alpha_sigma(grid[int(stage_lib.sdedit_start(s, steps))])
  np.testing.assert_allclose(out, up + (sigma / alpha) * noise, rtol=1e-4, atol=1e-4)
  # A stage trained on t <= 0.5 refuses to start from pure noise (lowres_start = 1).
  with pytest.raises(errors.UserError, match="lowres_start"):
    stage_lib.sample_stage(zero_eps, dataclasses.replace(settings, lowres_start=1.0), info,
                           seeds, 1, text_emb=jnp.zeros((2, 3, 4)),
                           text_mask=jnp.ones((2, 3), bool), lowres=lowres)
