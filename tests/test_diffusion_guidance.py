"""Classifier-free guidance and thresholding (Imagen section 2.2-2.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion
from imagen_jax.errors import UserError

B, L, D = 3, 5, 4


def fake_model(x, log_snr, text_emb, text_mask, *, lowres=None, lowres_log_snr=None, train=False):
  """Depends on every input, so a wrong half or a dropped kwarg changes the output."""
  assert train is False
  text = jnp.sum(text_emb * text_mask[..., None], axis=(1, 2))
  out = x * 2.0 + log_snr[:, None, None, None] + text[:, None, None, None] + lowres
  return out + lowres_log_snr[:, None, None, None] * 0.1


@pytest.fixture(scope="module")
def inputs():
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (B, 2, 2, 1))
  cond = dict(text_emb=jax.random.normal(keys[1], (B, L, D)) + 1.0,
              text_mask=jnp.arange(L)[None, :] < jnp.array([[2], [5], [1]]),
              lowres=jax.random.normal(keys[2], (B, 2, 2, 1)),
              lowres_log_snr=jnp.array([0.5, 1.0, 2.0]), train=False)
  return x, jnp.array([-1.0, 0.0, 3.0]), cond


def _uncond(cond):
  return dict(cond, text_emb=jnp.zeros_like(cond["text_emb"]),
              text_mask=jnp.zeros_like(cond["text_mask"]))


@pytest.mark.parametrize("use_jit", [False, True])
def test_scale_zero_one_and_linear(inputs, use_jit):
  x, lam, cond = inputs
  cond_out, uncond_out = fake_model(x, lam, **cond), fake_model(x, lam, **_uncond(cond))
  assert float(jnp.max(jnp.abs(cond_out - uncond_out))) > 0.1
  maybe_jit = (lambda f: jax.jit(f, static_argnames="train")) if use_jit else (lambda f: f)
  for scale, expected in [(0.0, uncond_out), (1.0, cond_out),
                          (4.0, uncond_out + 4.0 * (cond_out - uncond_out))]:
    guided = maybe_jit(diffusion.classifier_free_guidance(fake_model, scale))
    np.testing.assert_allclose(guided(x, lam, **cond), expected, rtol=1e-5, atol=1e-5)
  # Per-example scale [B]; traced scale 1 (cannot skip the doubled call) is still conditional.
  scales = jnp.array([0.0, 1.0, 7.5])
  guided = maybe_jit(diffusion.classifier_free_guidance(fake_model, scales))
  expected = uncond_out + scales[:, None, None, None] * (cond_out - uncond_out)
  np.testing.assert_allclose(guided(x, lam, **cond), expected, rtol=1e-5, atol=1e-5)


def test_one_batched_call_with_text_dropped_only_in_second_half(inputs):
  x, lam, cond = inputs
  calls = []

  def recording_model(x, log_snr, text_emb, text_mask, **kw):
    calls.append(dict(x=x, log_snr=log_snr, text_emb=text_emb, text_mask=text_mask, **kw))
    return fake_model(x, log_snr, text_emb, text_mask, **kw)

  diffusion.classifier_free_guidance(recording_model, 3.0)(x, lam, **cond)
  assert len(calls) == 1
  call = calls[0]
  assert call["x"].shape[0] == 2 * B and call["train"] is False
  np.testing.assert_array_equal(call["text_emb"][:B], cond["text_emb"])
  np.testing.assert_array_equal(call["text_mask"][:B], cond["text_mask"])
  np.testing.assert_array_equal(call["text_emb"][B:], 0.0)
  assert not np.any(np.asarray(call["text_mask"][B:]))
  for name in ("lowres", "lowres_log_snr"):
    np.testing.assert_array_equal(call[name][:B], cond[name])
    np.testing.assert_array_equal(call[name][B:], cond[name])
  for name in ("x", "log_snr"):
    ref = x if name == "x" else lam
    np.testing.assert_array_equal(call[name][B:], ref)
  # Scale 1 makes a single undoubled call.
  calls.clear()
  diffusion.classifier_free_guidance(recording_model, 1.0)(x, lam, **cond)
  assert len(calls) == 1 and calls[0]["x"].shape[0] == B


def test_guided_model_in_sampler(inputs):
  # The guided model closes over the conditioning and runs inside sample's loop.
  x, _, cond = inputs
  guided = diffusion.classifier_free_guidance(fake_model, 2.0)
  model = lambda x, log_snr: 0.01 * guided(x, log_snr, **cond)
  out = diffusion.sample(model, x, jnp.array([-2.0, 0.0, 2.0, jnp.inf]), method="dpmpp_2m")
  assert out.shape == x.shape and np.all(np.isfinite(out))


def test_guidance_needs_text(inputs):
  x, lam, cond = inputs
  no_text = {k: v for k, v in cond.items() if k != "text_emb"}
  with pytest.raises(UserError, match="text_emb"):
    diffusion.classifier_free_guidance(lambda x, l, **kw: x, 2.0)(x, lam, **no_text)


def test_dynamic_threshold():
  # All inputs [2, 200]: one compiled program per (shape, jit) on this slow machine.
  inside = jnp.linspace(-0.9, 0.9, 400).reshape(2, 200)
  np.testing.assert_array_equal(diffusion.dynamic_threshold(inside), inside)  # s = max(1, .) = 1
  # Sample 0: 198 pixels at 2.0, one at 10, one at -3; its 50th percentile of |x0| is 2.0 ->
  # clip to [-2, 2] and divide by 2. Sample 1 stays inside [-1, 1] and is unchanged.
  big = jnp.full((200,), 2.0).at[0].set(10.0).at[1].set(-3.0)
  x0 = jnp.stack([big, jnp.linspace(-1.0, 1.0, 200)])
  out = diffusion.dynamic_threshold(x0, percentile=50.0)
  np.testing.assert_allclose(out[0], jnp.clip(big, -2, 2) / 2)
  np.testing.assert_allclose(out[1], x0[1])
  # Default p = 99.5 of |x0|, per sample over all its pixels; jit gives the same.
  x = jax.random.normal(jax.random.key(1), (2, 200)) * jnp.array([[3.0], [10.0]])
  s = np.maximum(1.0, np.percentile(np.abs(np.asarray(x)), 99.5, axis=1))[:, None]
  expected = np.clip(x, -s, s) / s
  np.testing.assert_allclose(diffusion.dynamic_threshold(x), expected, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(diffusion.dynamic_threshold)(x), expected, rtol=1e-5)
  assert float(jnp.max(jnp.abs(diffusion.dynamic_threshold(x)))) <= 1.0
  assert float(jnp.max(jnp.abs(x[1]))) > 20.0  # the case is not trivial
  with pytest.raises(UserError, match="percent"):
    diffusion.dynamic_threshold(x, percentile=0.995 * 200)


def test_static_threshold():
  x = jnp.array([[-3.0, -1.0, 0.25, 1.0, 7.0]])
  np.testing.assert_array_equal(diffusion.static_threshold(x), [[-1.0, -1.0, 0.25, 1.0, 1.0]])
