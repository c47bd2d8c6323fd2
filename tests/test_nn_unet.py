"""The U-Nets: masking, dropped captions, sharding, remat, dtypes, skip scale, sizes.

Tiny models (16 channels, 16x16 images) whose parameters are all replaced by random values:
the zero-initialised output layers of a fresh model would make every output 0 and every
comparison below pass trivially. Parameters are built abstractly (`nnx.eval_shape`) and
filled from numpy, so no initialisation program is compiled. Few distinct programs are
compiled; results are shared through module-scoped fixtures.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.errors import UserError
from imagen_jax.nn import EfficientUNet, UNet, layers, unet
from imagen_jax.nn.attention import TextLayer
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import rules

TEXT_DIM = 8
# Dropout is off in the compiled tests: its random bits (threefry) double the compile
# time on a CPU. test_dropout_in_a_residual_block checks it on one block.
BASE = dict(image_size=16, text_dim=TEXT_DIM, model_channels=16, channel_mult=(1, 2),
            num_res_blocks=1, attention_resolutions=(8,), head_dim=8, num_groups=4)
SR = dict(image_size=16, lowres_size=8, text_dim=TEXT_DIM, model_channels=16,
          channel_mult=(1, 2), num_res_blocks=(1, 2), self_attention=False, head_dim=8,
          num_groups=4)


def random_model(cls, seed=0, **kwargs):
  """(graphdef, params, rest) of a model with every parameter random (N(0, 1/fan_in);
  norm scales 1 + N(0, 0.1²)), built without compiling an initialiser."""
  abstract = nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(seed), **kwargs))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)

  def fill(var):
    shape = var.get_value().shape
    if rules.variable_logical_axes(var) == ("norm",):
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      value = rng.normal(size=shape) / math.sqrt(max(1, math.prod(shape[:-1])))
    return var.replace(jnp.asarray(value, jnp.float32))

  params = jax.tree.map(fill, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  rest = jax.tree.map(
      lambda x: (jax.random.key(seed) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                 else jnp.zeros(x.shape, x.dtype)), rest)
  return graphdef, params, rest


def make_batch(batch=4, size=16, length=16, seed=0, lowres_size=None):
  """Row 1 is a dropped caption (zero embedding, all-false mask); the others have captions
  of different lengths, with random junk in their padding positions."""
  rng = np.random.default_rng(seed)
  lengths = np.array([5, 0, 3, 7][:batch])
  mask = np.arange(length)[None, :] < lengths[:, None]
  text = rng.normal(size=(batch, length, TEXT_DIM)).astype(np.float32)
  text[1] = 0.0
  out = dict(x=rng.normal(size=(batch, size, size, 3)).astype(np.float32),
             log_snr=np.linspace(-8.0, 8.0, batch).astype(np.float32),
             text_emb=text, text_mask=mask)
  if lowres_size:
    out["lowres"] = rng.uniform(-1, 1, size=(batch, lowres_size, lowres_size, 3)).astype(
        np.float32)
    out["lowres_log_snr"] = np.linspace(-2.0, 6.0, batch).astype(np.float32)
  return out


def repad(batch, length):
  """The same captions padded (with different junk) to `length` tokens."""
  b, old, d = batch["text_emb"].shape
  keep = min(old, length)
  text = np.random.default_rng(99).normal(size=(b, length, d)).astype(np.float32)
  text[:, :keep] = batch["text_emb"][:, :keep]
  text[1] = 0.0
  mask = np.zeros((b, length), bool)
  mask[:, :keep] = batch["text_mask"][:, :keep]
  assert mask.sum() == batch["text_mask"].sum()
  return dict(batch, text_emb=text, text_mask=mask)


def _apply(graphdef, params, rest, batch, train=False, dropout_rng=None):
  model = nnx.merge(graphdef, params, rest)
  return model(batch["x"], batch["log_snr"], batch["text_emb"], batch["text_mask"],
               lowres=batch.get("lowres"), lowres_log_snr=batch.get("lowres_log_snr"),
               train=train, dropout_rng=dropout_rng)


forward = jax.jit(_apply, static_argnums=0)  # train=False: deterministic


@functools.partial(jax.jit, static_argnums=0)
def forward_and_grads(graphdef, params, rest, batch):
  weights = jnp.cos(jnp.arange(np.prod(batch["x"].shape), dtype=jnp.float32)).reshape(
      batch["x"].shape)

  def loss(p):
    out = _apply(graphdef, p, rest, batch, train=True, dropout_rng=jax.random.key(7))
    return jnp.sum(out * weights), out

  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return out, grads


def assert_trees_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# --- base U-Net -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
  return random_model(UNet, **BASE)


@pytest.fixture(scope="module")
def base_reference(base):
  """Single-device forward and grads of the float32 base model."""
  batch = make_batch()
  out, grads = forward_and_grads(*base, batch)
  return batch, out, grads


def test_base_output_is_finite_and_uses_every_input(base, base_reference):
  batch, out, grads = base_reference
  out = np.asarray(out)
  assert out.shape == (4, 16, 16, 3) and out.dtype == np.float32
  assert np.isfinite(out).all() and np.abs(out).mean() > 1e-2
  # The dropped caption (row 1) gives finite outputs and finite gradients.
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # The model holds no RNG state: dropout keys come from dropout_rng only.
  assert not jax.tree.leaves(base[2])
  # train=True without dropout is the deterministic forward pass (up to float32 rounding:
  # the reference comes from the program that also takes gradients, fused differently).
  np.testing.assert_allclose(np.asarray(forward(*base, batch)), out, rtol=1e-5, atol=1e-5)
  # Text matters: changing a real token changes that row (and no other row).
  changed = dict(batch, text_emb=batch["text_emb"].copy())
  changed["text_emb"][0, 2] += np.linspace(-1.0, 1.0, TEXT_DIM)  # LayerNorm removes constants
  out2 = np.asarray(forward(base[0], base[1], base[2], changed))
  assert np.abs(out2[0] - out[0]).max() > 1e-3
  np.testing.assert_allclose(out2[1:], out[1:], rtol=1e-5, atol=1e-6)


def test_base_padding_does_not_change_the_output(base, base_reference):
  batch, _, _ = base_reference
  out = forward(*base, batch)
  long = np.asarray(forward(*base, repad(batch, 128)))
  np.testing.assert_allclose(long, np.asarray(out), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sharded_and_rematerialised_matches_one_device(base, base_reference, devices):
  """Params over fsdp 4 x tensor 2, batch over fsdp, blocks rematerialised (remat=True):
  the same output and grads as the plain model on one device. (One compiled program
  checks both properties; a bug in either shows as a mismatch.)"""
  batch, out, grads = base_reference
  graphdef, params, rest = base
  remat_graphdef = nnx.split(nnx.eval_shape(
      lambda: UNet(rngs=nnx.Rngs(0), remat=True, **BASE)), nnx.Param, ...)[0]
  assert remat_graphdef != graphdef
  mesh = mesh_lib.make_mesh("fsdp:4,tensor:2")
  param_shardings = rules.state_shardings(params, mesh)
  specs = [s.get_value().spec for s in jax.tree.leaves(
      param_shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))]
  assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
  with jax.set_mesh(mesh):
    sharded_params = jax.device_put(params, param_shardings)
    sharded_batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.ndim))
                     for k, v in batch.items()}
    out8, grads8 = forward_and_grads(remat_graphdef, sharded_params, rest, sharded_batch)
  assert len(out8.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out8), np.asarray(out), rtol=1e-4, atol=1e-5)
  assert_trees_close(grads8, grads, rtol=1e-3, atol=1e-5)


def test_remat_wraps_each_block_in_a_checkpoint(base, base_reference):
  """remat=True puts every block under jax.checkpoint (seen in the traced program)."""
  batch = base_reference[0]
  remat_graphdef = nnx.split(nnx.eval_shape(
      lambda: UNet(rngs=nnx.Rngs(0), remat=True, **BASE)), nnx.Param, ...)[0]
  def count(graphdef):
    jaxpr = jax.make_jaxpr(functools.partial(_apply, graphdef))(base[1], base[2], batch)
    return sum(e.primitive.name in ("checkpoint", "remat2", "remat")
               for e in jaxpr.jaxpr.eqns)

  assert count(base[0]) == 0
  assert count(remat_graphdef) == 10  # 3 down, 2 middle, 5 up blocks


def test_dropout_in_a_residual_block():
  graphdef, params, rest = random_model(
      layers.ResBlock, in_ch=8, out_ch=8, emb_dim=4, num_groups=2, dropout=0.5,
      dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 8)), jnp.float32)

  @jax.jit
  def run(params, key):
    block = nnx.merge(graphdef, params, rest)
    emb = jnp.ones((2, 4))
    return (block(x, emb, train=False), block(x, emb, train=True, dropout_rng=key),
            block(x, emb, train=True, dropout_rng=key),
            layers.dropout(jnp.ones((1000,)), 0.5, train=True, rng=key))

  eval_out, train_out, again, dropped = map(np.asarray, run(params, jax.random.key(3)))
  assert np.abs(train_out - eval_out).max() > 1e-3
  np.testing.assert_array_equal(again, train_out)  # same key, same mask
  # Inverted dropout: kept values are scaled by 1 / (1 - rate), the rest are zero.
  assert set(np.unique(dropped)) == {0.0, 2.0} and abs(dropped.mean() - 1.0) < 0.1
  h = jnp.ones((3,))
  assert layers.dropout(h, 0.5, train=False, rng=None) is h


def test_bfloat16_compute_keeps_float32_params(base, base_reference):
  batch, _, _ = base_reference
  out = forward(*base, batch)
  abstract = nnx.eval_shape(lambda: UNet(rngs=nnx.Rngs(0), dtype="bfloat16", **BASE))
  graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  out16 = np.asarray(forward(graphdef, base[1], base[2], batch))
  assert out16.dtype == np.float32 and np.isfinite(out16).all()
  # bf16 has an 8-bit mantissa: close to float32, but not equal (it did run in bf16).
  err = np.linalg.norm(out16 - np.asarray(out)) / np.linalg.norm(np.asarray(out))
  assert 1e-4 < err < 0.1


def _reverse_tokens(batch):
  """Each caption's real tokens in reverse order (padding stays where it is)."""
  text = batch["text_emb"].copy()
  for row, n in enumerate(batch["text_mask"].sum(axis=1)):
    text[row, :n] = text[row, :n][::-1]
  return dict(batch, text_emb=text)


def test_text_positions_make_the_model_see_word_order(base, base_reference):
  """Without `text_positions` the U-Net reads the text as a set (Imagen relies on T5 for
  order): reversing the tokens changes nothing. With learned positions it changes the
  output; padding still does not, and text longer than the table is a UserError."""
  batch, out, _ = base_reference
  reversed_batch = _reverse_tokens(batch)
  np.testing.assert_allclose(np.asarray(forward(*base, reversed_batch)), np.asarray(out),
                             rtol=1e-5, atol=1e-5)
  positional = random_model(UNet, **dict(BASE, text_positions=16))
  out_pos = np.asarray(forward(*positional, batch))
  out_rev = np.asarray(forward(*positional, reversed_batch))
  # Rows 0, 2, 3 have captions (of 5, 3 and 7 tokens); row 1 is a dropped caption.
  for row in (0, 2, 3):
    assert np.abs(out_rev[row] - out_pos[row]).max() > 1e-3
  np.testing.assert_allclose(out_rev[1], out_pos[1], rtol=1e-5, atol=1e-6)
  short = {k: (v[:, :8] if k.startswith("text") else v) for k, v in batch.items()}
  np.testing.assert_allclose(np.asarray(forward(*positional, short)), out_pos,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match="text_positions=16"):
    forward(*positional, repad(batch, 17))


def test_text_layer_relates_tokens_and_ignores_padding():
  """A TextLayer makes each real token depend on the other real tokens (what a frozen
  per-token projection cannot do) and never on padding; a dropped caption stays finite."""
  layer = nnx.merge(*random_model(TextLayer, channels=8, head_dim=4, dtype=jnp.float32))
  batch = make_batch()
  text, mask = jnp.asarray(batch["text_emb"]), jnp.asarray(batch["text_mask"])
  out = np.asarray(layer(text, mask))
  assert np.isfinite(out).all()
  # (Perturbations are random vectors: a constant shift would vanish in the layer norm.)
  noise = jnp.asarray(np.random.default_rng(1).normal(size=text.shape), jnp.float32)
  other_word = np.asarray(layer(text.at[0, 2].add(noise[0, 2]), mask))  # row 0: 5 tokens
  assert np.abs(other_word[0, 0] - out[0, 0]).max() > 1e-3
  junk = np.asarray(layer(text.at[0, 9].add(noise[0, 9]).at[2, 5:].add(3 * noise[2, 5:]),
                          mask))
  np.testing.assert_allclose(junk[0, :5], out[0, :5], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(junk[2, :3], out[2, :3], rtol=1e-6, atol=1e-6)


def test_text_layers_keep_padding_and_order_invariance(base_reference):
  """A U-Net with `text_layers` (and no text positions) still reads the text as a set:
  padding with different junk or reversing the tokens leaves the output unchanged. The
  layers are wired in: making them the identity changes the output."""
  batch, _, _ = base_reference
  graphdef, params, rest = random_model(UNet, **dict(BASE, text_layers=1))
  layered = graphdef, params, rest
  out_layers = np.asarray(forward(*layered, batch))
  assert np.isfinite(out_layers).all()
  identity = jax.tree.map(lambda x: x, params)
  for name in ("attn_out", "mlp_out"):
    kernel = identity["text_layers"][0][name]["kernel"]
    kernel.set_value(jnp.zeros_like(kernel.get_value()))
  out_identity = np.asarray(forward(graphdef, identity, rest, batch))
  assert np.abs(out_identity - out_layers).max() > 1e-3
  np.testing.assert_allclose(np.asarray(forward(*layered, _reverse_tokens(repad(batch, 24)))),
                             out_layers, rtol=1e-5, atol=1e-5)


def test_coord_channels_feed_pixel_positions(base_reference):
  """layers.coordinates gives pixel centres in [-1, 1] ((y, x), y down); with
  coord_channels the input conv sees them: zeroing their kernel slice changes the output."""
  grid = np.asarray(layers.coordinates((2, 4, 4), jnp.float32))
  assert grid.shape == (2, 4, 4, 2)
  np.testing.assert_allclose(grid[0, :, 0, 0], [-0.75, -0.25, 0.25, 0.75])  # y by row
  np.testing.assert_allclose(grid[1, 0, :, 1], [-0.75, -0.25, 0.25, 0.75])  # x by column
  batch, _, _ = base_reference
  graphdef, params, rest = random_model(UNet, **dict(BASE, coord_channels=True))
  kernel = params["input_conv"]["kernel"]
  assert kernel.get_value().shape[2] == 5  # RGB + (y, x)
  out = np.asarray(forward(graphdef, params, rest, batch))
  blind = jax.tree.map(lambda x: x, params)
  blind["input_conv"]["kernel"].set_value(kernel.get_value().at[:, :, 3:].set(0.0))
  assert np.abs(np.asarray(forward(graphdef, blind, rest, batch)) - out).max() > 1e-3


def test_base_rejects_bad_inputs(base):
  model = nnx.merge(*base)
  batch = make_batch()
  call = lambda **kw: model(**{"x_t": batch["x"], "log_snr": batch["log_snr"],
                               "text_emb": batch["text_emb"],
                               "text_mask": batch["text_mask"], **kw})
  with pytest.raises(UserError, match="multiple of 2"):
    call(x_t=np.zeros((4, 15, 15, 3), np.float32))
  with pytest.raises(UserError, match=r"\[B, H, W, 3\]"):
    call(x_t=np.zeros((4, 16, 16, 4), np.float32))
  with pytest.raises(UserError, match="TEXT_DIM"):
    call(text_emb=np.zeros((4, 16, 5), np.float32))
  with pytest.raises(UserError, match="no lowres"):
    call(lowres=batch["x"], lowres_log_snr=batch["log_snr"])
  with pytest.raises(UserError, match="pass dropout_rng"):
    nnx.merge(*random_model(UNet, **dict(BASE, dropout=0.1)))(
        batch["x"], batch["log_snr"], batch["text_emb"], batch["text_mask"], train=True)
  with pytest.raises(UserError, match="num_groups"):
    nnx.eval_shape(lambda: UNet(rngs=nnx.Rngs(0), **dict(BASE, num_groups=5)))


# --- Efficient U-Net --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sr():
  return random_model(EfficientUNet, seed=1, **SR)


@pytest.fixture(scope="module")
def sr_reference(sr):
  batch = make_batch(lowres_size=8, seed=1)
  return batch, np.asarray(forward(*sr, batch))


def test_sr_uses_lowres_and_its_noise_level(sr, sr_reference):
  batch, out = sr_reference
  assert out.shape == (4, 16, 16, 3) and np.isfinite(out).all()
  other_lowres = dict(batch, lowres=batch["lowres"][::-1].copy())
  out_lowres = np.asarray(forward(*sr, other_lowres))
  assert np.abs(out_lowres - out).max() > 1e-3
  other_level = dict(batch, lowres_log_snr=batch["lowres_log_snr"] + 3.0)
  assert np.abs(np.asarray(forward(*sr, other_level)) - out).max() > 1e-3
  # Text reaches the model through cross-attention and pooling.
  other_text = dict(batch, text_emb=batch["text_emb"].copy())
  other_text["text_emb"][0, 1] += np.linspace(-1.0, 1.0, TEXT_DIM)
  out_text = np.asarray(forward(*sr, other_text))
  assert np.abs(out_text[0] - out[0]).max() > 1e-4
  np.testing.assert_allclose(out_text[1:], out[1:], rtol=1e-5, atol=1e-6)


def test_sr_padding_and_dropped_caption(sr, sr_reference):
  batch, out = sr_reference
  long = np.asarray(forward(*sr, repad(batch, 128)))
  np.testing.assert_allclose(long, out, rtol=1e-5, atol=1e-5)


def test_sr_sharded_matches_one_device(sr, sr_reference, devices):
  batch, out = sr_reference
  graphdef, params, rest = sr
  mesh = mesh_lib.make_mesh("fsdp:4,tensor:2")
  with jax.set_mesh(mesh):
    sharded_params = jax.device_put(params, rules.state_shardings(params, mesh))
    sharded_batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.ndim))
                     for k, v in batch.items()}
    out8 = forward(graphdef, sharded_params, rest, sharded_batch)
  assert len(out8.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out8), out, rtol=1e-4, atol=1e-5)


def test_sr_with_self_attention_handles_padding_and_dropped_captions():
  """The 64->256 layout: self- and cross-attention at the lowest level."""
  model = random_model(EfficientUNet, seed=3, **dict(SR, self_attention=True,
                                                     num_res_blocks=(1, 1)))
  batch = make_batch(lowres_size=8, seed=3)
  out = np.asarray(forward(*model, batch))
  assert np.isfinite(out).all() and np.abs(out).mean() > 1e-2
  long = np.asarray(forward(*model, repad(batch, 128)))
  np.testing.assert_allclose(long, out, rtol=1e-5, atol=1e-5)


def test_sr_is_fully_convolutional(sr):
  """Built for 16px output, it runs at 32px (lowres at its own 16px size)."""
  batch = make_batch(size=32, lowres_size=16, seed=2)
  out = np.asarray(forward(*sr, batch))
  assert out.shape == (4, 32, 32, 3) and np.isfinite(out).all()


def test_skip_connections_are_scaled(sr, sr_reference):
  """Imagen appendix B.1: skip connections scaled by 1/sqrt(2)."""
  batch, out = sr_reference
  model = nnx.merge(*sr)
  assert model.skip_scale == pytest.approx(2 ** -0.5)
  h, skip = jnp.ones((1, 2, 2, 3)), jnp.full((1, 2, 2, 2), 3.0)
  merged = np.asarray(unet.merge_skip(h, skip, model.skip_scale))
  np.testing.assert_allclose(merged[..., 3:], 3.0 / math.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(merged[..., :3], 1.0)
  # The model uses the scale: with unscaled skips its output changes.
  unscaled = nnx.eval_shape(lambda: EfficientUNet(rngs=nnx.Rngs(0), skip_scale=1.0, **SR))
  graphdef = nnx.split(unscaled, nnx.Param, ...)[0]
  out_unscaled = np.asarray(forward(graphdef, sr[1], sr[2], batch))
  assert np.abs(out_unscaled - out).max() > 1e-3


def test_sr_requires_lowres(sr):
  model = nnx.merge(*sr)
  batch = make_batch(lowres_size=8)
  with pytest.raises(UserError, match="pass lowres"):
    model(batch["x"], batch["log_snr"], batch["text_emb"], batch["text_mask"])


def test_log_snr_embedding_is_finite_at_the_endpoints():
  log_snr = jnp.array([-jnp.inf, -20.0, 0.0, 20.0, jnp.inf])
  scaled = np.asarray(layers.scaled_log_snr(log_snr))
  np.testing.assert_allclose(scaled, [-1000.0, -500.0, 0.0, 500.0, 1000.0])
  emb = np.asarray(layers.sinusoidal_embedding(jnp.asarray(scaled), 16))
  assert emb.shape == (5, 16) and np.isfinite(emb).all()
  np.testing.assert_allclose(emb[2], [1.0] * 8 + [0.0] * 8)  # cos(0), sin(0)
