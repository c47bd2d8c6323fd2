"""GLIDE's dedicated inpainting model (Nichol et al. 2021, section 4; issue 16 item 2): the
U-Nets' inpainting input channels, the random training masks, INIT_FROM a text-to-image
checkpoint with zero-initialised new input weights, and a cascade of inpainting models."""

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from imagen_jax import nn
from imagen_jax.diffusion import masks
from imagen_jax.errors import UserError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import output
from imagen_jax.train import initial_state, step as step_lib
from test_sample_cascade import BASE_GIN, SR_GIN, _write_stage

INPAINT = "{cls}.inpaint_channels = 4\n"


# --------------------------------------------------------------------------- random masks

@pytest.fixture(scope="module")
def drawn():
  cfg = masks.MaskConfig()
  keys = jax.random.split(jax.random.key(0), 1200)
  m, kind = jax.jit(jax.vmap(lambda k: masks.random_mask(k, 16, cfg)))(keys)
  return cfg, keys, np.asarray(m[..., 0]), np.asarray(kind)


def test_mask_shares_and_coverage(drawn):
  cfg, _, m, kind = drawn
  n = len(kind)
  for i, share in enumerate(cfg.probs):
    # Binomial standard deviation at n = 1200 is <= 0.0145: 3.5 sigma.
    assert abs(np.mean(kind == i) - share) < 0.05, (masks.KINDS[i], np.mean(kind == i))
  coverage = m.mean(axis=(1, 2))
  assert set(np.unique(m)) <= {0.0, 1.0}
  np.testing.assert_array_equal(coverage[kind == 0], 0.0)      # all known
  np.testing.assert_array_equal(coverage[kind == 1], 1.0)      # all unknown
  rect = m[kind == 2]
  for r in rect:  # one axis-aligned box, sides within [rect_min, rect_max] of the side
    rows, cols = np.flatnonzero(r.any(1)), np.flatnonzero(r.any(0))
    assert np.all(r[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] == 1)
    assert r.sum() == len(rows) * len(cols)
    for side in (len(rows), len(cols)):
      assert round(16 * cfg.rect_min) <= side <= round(16 * cfg.rect_max)
  strokes = coverage[kind == 3]
  assert strokes.min() > 0 and strokes.max() < 0.9 and 0.1 < strokes.mean() < 0.5, (
      strokes.min(), strokes.mean(), strokes.max())
  # Not rectangles: most stroke masks do not fill their bounding box.
  fill = [r.sum() / (np.ptp(np.flatnonzero(r.any(1))) + 1) /
          (np.ptp(np.flatnonzero(r.any(0))) + 1) for r in m[kind == 3]]
  assert np.mean(np.array(fill) < 0.95) > 0.8
  assert n == m.shape[0]


def test_masks_are_deterministic_per_key(drawn):
  cfg, keys, m, _ = drawn
  again = np.asarray(jax.jit(lambda k: masks.random_masks(k, 16, cfg))(keys[:8][::-1])
                     )[::-1, ..., 0]
  np.testing.assert_array_equal(again, m[:8])       # any batch order, any batch size
  assert len({m[i].tobytes() for i in range(64)}) > 40


def test_bad_mask_config_is_a_user_error():
  with pytest.raises(UserError, match="shares"):
    masks.MaskConfig(known_share=0.6, unknown_share=0.6)
  with pytest.raises(UserError, match="rect_min"):
    masks.MaskConfig(rect_min=0.0)


# ----------------------------------------------------------------------- model and step

def _model(gin_text: str, abstract: bool = False):
  gin.clear_config()
  gin.parse_config(gin_text)
  create = lambda: nn.create_model(rngs=nnx.Rngs(params=0))
  model = nnx.eval_shape(create) if abstract else create()
  gin.clear_config()
  return model


@nnx.jit
def _call(model, args, kw):
  """model(*args, **kw), compiled (eager U-Net calls are slow on 2 cores)."""
  return model(*args, **kw)


def _inputs(model, b=2, seed=0):
  rng = np.random.RandomState(seed)
  size = model.image_size
  args = dict(x=rng.standard_normal((b, size, size, 3)).astype(np.float32),
              log_snr=np.array([-1.0, 2.0][:b], np.float32),
              text_emb=rng.standard_normal((b, 4, 16)).astype(np.float32),
              text_mask=np.array([[True, True, False, False]] * b))
  kw = {}
  if model.lowres_size:
    kw = dict(lowres=rng.standard_normal((b, model.lowres_size, model.lowres_size, 3)
                                         ).astype(np.float32),
              lowres_log_snr=np.zeros((b,), np.float32))
  return args, kw


def test_unet_inpaint_channels_and_bad_input():
  model = _model(BASE_GIN + INPAINT.format(cls="UNet"))
  args, _ = _inputs(model)
  inpaint = np.ones((2, 8, 8, 4), np.float32)
  args = tuple(args.values())
  out = _call(model, args, {"inpaint": inpaint})
  assert out.shape == (2, 8, 8, 3)
  assert model.input_conv.kernel.value.shape[-2] == 3 + 4
  with pytest.raises(UserError, match="inpaint_channels=4"):
    _call(model, args, {})
  with pytest.raises(UserError, match="inpaint_channels=4"):
    _call(model, args, {"inpaint": inpaint[..., :3]})
  plain = _model(BASE_GIN, abstract=True)
  with pytest.raises(UserError, match="without inpaint_channels"):
    plain._inpaint_input(args[0], inpaint)    # the check __call__ makes


def test_training_draws_masks_and_the_masked_image():
  x0 = np.random.RandomState(0).randint(0, 256, (4, 8, 8, 3)).astype(np.uint8)
  batch = {"image": x0, "text_emb": np.zeros((4, 4, 16), np.float32),
           "text_mask": np.ones((4, 4), bool)}
  keys = step_lib.example_keys(jax.random.key(3), jnp.arange(4))
  cfg = step_lib.LossConfig()
  draw = jax.jit(lambda b, k, m: step_lib.noise_and_conditioning(b, k, cfg, mask_cfg=m),
                 static_argnums=2)
  x, _, noise, cond = draw(batch, keys, masks.MaskConfig())
  plain = draw(batch, keys, None)
  np.testing.assert_array_equal(noise, plain[2])     # the other draws are unchanged
  m = np.asarray(cond["inpaint"][..., 3:])
  np.testing.assert_array_equal(cond["inpaint"][..., :3], np.asarray(x) * (1 - m))
  k_mask = jax.vmap(lambda k: jax.random.fold_in(k, 5))(keys)
  np.testing.assert_array_equal(m, jax.jit(lambda k: masks.random_masks(
      k, 8, masks.MaskConfig()))(k_mask))
  assert step_lib.training_masks(_model(BASE_GIN, abstract=True)) is None
  assert step_lib.training_masks(_model(BASE_GIN + INPAINT.format(cls="UNet"),
                                        abstract=True)) is not None


# ----------------------------------------------------------------------- INIT_FROM

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("inpaint_src")
  return {"base": _write_stage(root / "base", BASE_GIN, {}, seed=1),
          "sr": _write_stage(root / "sr", SR_GIN.format(lowres=8), {}, seed=2)}


@pytest.mark.parametrize("kind", ["base", "sr"])
def test_init_from_zero_pads_the_input_conv_and_keeps_the_output(sources, kind):
  """At step 0 the inpainting model fine-tuned from a text-to-image checkpoint gives that
  checkpoint's output, whatever its inpainting input. The zero kernel rows add exact zeros,
  but the input convolution's longer reduction may sum in another order (XLA:CPU chooses
  its blocking by the shape), so the outputs agree to float rounding, not to the bit; a
  non-zero padding or a misplaced kernel would differ by O(0.1) with this input."""
  from imagen_jax.train import checkpoint
  gin_text, cls = ((BASE_GIN, "UNet") if kind == "base"
                   else (SR_GIN.format(lowres=8), "EfficientUNet"))
  source, _ = checkpoint.load_for_inference(sources[kind], use_ema=False)
  gin.clear_config()
  gin.parse_config(gin_text + INPAINT.format(cls=cls))
  create = lambda: nn.create_model(rngs=nnx.Rngs(params=0))
  mesh = mesh_lib.make_mesh(None)
  loaded = initial_state.setup_initial_state(create, mesh, tx=optax.sgd(0.1),
                                             init_from=sources[kind])
  assert loaded.origin == "init_from"
  from imagen_jax.train import state as state_lib
  model = state_lib.merge_model(loaded.graphdef, loaded.state.params, loaded.rest)
  kernel = np.asarray(loaded.state.params["input_conv"]["kernel"])
  np.testing.assert_array_equal(kernel[..., -4:, :], 0.0)
  np.testing.assert_array_equal(kernel[..., :-4, :],
                                np.asarray(source.input_conv.kernel.value))
  args, kw = _inputs(model)
  inpaint = np.random.RandomState(5).standard_normal((2, *args["x"].shape[1:3], 4))
  args = tuple(args.values())
  np.testing.assert_allclose(_call(model, args, dict(kw, inpaint=inpaint)),
                             _call(source, args, kw), rtol=1e-5, atol=1e-5)
  gin.clear_config()


def test_init_from_another_shape_is_refused(sources):
  gin.clear_config()
  gin.parse_config(BASE_GIN.replace("UNet.model_channels = 8", "UNet.model_channels = 4")
                   + INPAINT.format(cls="UNet"))
  create = lambda: nn.create_model(rngs=nnx.Rngs(params=0))
  with pytest.raises(UserError, match="only inpaint_channels may grow"):
    initial_state.setup_initial_state(create, mesh_lib.make_mesh(None), tx=optax.sgd(0.1),
                                      init_from=sources["base"])


# ----------------------------------------------------------------------- the cascade

@pytest.fixture(scope="module")
def inpaint_cascade(tmp_path_factory):
  from imagen_jax.text import encode, t5, vocab
  from test_sample_cascade import PROMPTS, MAX_LENGTH
  root = tmp_path_factory.mktemp("inpaint_cascade")
  spiece = vocab.train_sentencepiece(PROMPTS * 4, root / "sp.model", vocab_size=64)
  t5_dir = t5.save_random_encoder(root / "t5", t5.T5Config(
      vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2), seed=0,
      spiece_model=spiece)
  identity = encode.TextEncoder.load(t5_dir, max_length=MAX_LENGTH, batch_size=8).identity
  base = _write_stage(root / "base", BASE_GIN + INPAINT.format(cls="UNet"), identity, 1)
  sr = _write_stage(root / "sr", SR_GIN.format(lowres=8) + INPAINT.format(
      cls="EfficientUNet"), identity, 2)
  gin_file = root / "inpaint.gin"
  gin_file.write_text(
      "include 'runs/sample.gin'\n"
      f"BASE_DIR = '{base}'\nSR_DIR = '{sr}'\nT5_PATH = '{t5_dir}'\n"
      f"MAX_LENGTH = {MAX_LENGTH}\nload_cascade.batch_size = 4\n"
      "base/Stage.sampler = 'ddpm'\nbase/Stage.num_steps = 3\n"
      "sr/Stage.num_steps = 2\nsr/Stage.guidance_scale = 3.0\n")
  gin.clear_config()
  c = cascade_lib.Cascade.from_config(os.fspath(gin_file))
  gin.clear_config()
  return c, PROMPTS


@pytest.mark.slow
def test_inpainting_models_keep_the_known_region_at_every_stage(inpaint_cascade):
  cascade, prompts = inpaint_cascade
  assert [s.info.inpaint_channels for s in cascade.stages] == [4, 4]
  image = np.random.RandomState(0).randint(0, 256, (12, 12, 3)).astype(np.uint8)
  mask = np.zeros((12, 12), np.uint8)
  mask[:, 6:] = 255
  prompts = prompts[:3]
  kw = dict(init_images=[image] * 3, masks=[mask] * 3)
  runs = [cascade(prompts, seed=s, **kw) for s in (1, 2)]
  edit = cascade_lib.Edit(image=image, mask=mask)
  for k, stage in enumerate(cascade.stages):
    size = stage.image_size
    keep = edit.mask_at(size)[..., 0] == 0
    expected = output.fit_image(image, size).astype(int)
    for out in runs:
      for p in range(3):
        assert np.abs(out[k][p, 0].astype(int) - expected)[keep].max() <= 2, (k, p)
    assert np.abs(runs[0][k].astype(int) - runs[1][k])[:, 0][:, ~keep].mean() > 2.0, k
  # The same bytes for another batch size: 16 rows per program instead of 8 (batch sizes
  # round up to a multiple of the 8 simulated devices).
  cascade.batch_size, cascade._samplers = 16, {}
  try:
    again = cascade(prompts, seed=1, **kw)
  finally:
    cascade.batch_size, cascade._samplers = 4, {}
  for k in range(2):
    np.testing.assert_array_equal(again[k], runs[0][k])


def test_inpainting_model_without_a_mask_is_refused(inpaint_cascade):
  cascade, prompts = inpaint_cascade
  with pytest.raises(UserError, match="inpainting model"):
    cascade(prompts[:1], seed=0)


def test_trainer_preview_of_an_inpainting_model_is_an_all_white_mask(inpaint_cascade):
  """train/loop.py previews an inpainting model as text-to-image: all-unknown masks, the
  same images as the cascade inpainting with an all-white mask."""
  from imagen_jax.train import loop
  cascade, prompts = inpaint_cascade
  stage = cascade.stages[0]
  settings = stage.config.sampling
  prompts = prompts[:4]
  image = np.random.RandomState(1).randint(0, 256, (8, 8, 3)).astype(np.uint8)
  one_stage = cascade_lib.Cascade([stage], cascade.text, mesh=cascade.mesh, batch_size=4)
  expected = one_stage(prompts, seed=11, init_images=[image] * 4,
                       masks=[np.full((8, 8), 255, np.uint8)] * 4)[0][:, 0]
  graphdef, params, rest = nnx.split(stage.model, nnx.Param, ...)
  gin.clear_config()
  gin.parse_config(f"preview/SamplerSettings.thresholding = '{settings.thresholding}'")
  preview = loop._make_sampler(graphdef, rest, stage.info, cascade.mesh, 4,
                               settings.num_steps, settings.sampler, settings.guidance_scale,
                               seed=11)
  gin.clear_config()
  emb, mask = cascade.text(prompts)
  batch = {"text_emb": emb, "text_mask": mask, "image": np.zeros((4, 1), np.uint8)}
  samples, _, _ = jax.device_get(preview(params, batch))
  # The preview's zero image is a constant of its program, the cascade's image a zeroed
  # input: differently fused float32, so a level of rounding apart at most.
  diff = np.abs(samples.astype(int) - expected)
  assert diff.max() <= 1 and np.mean(diff == 0) > 0.99, (diff.max(), np.mean(diff == 0))
  assert len({a.tobytes() for a in samples}) == 4
