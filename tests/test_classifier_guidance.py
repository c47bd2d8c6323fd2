"""Classifier guidance (issue 16, item 6): the noise-aware classifier (nn/classifier.py),
its training by imagen-train's loop (LossConfig.task = 'classifier'), the shapes labels,
and guided sampling through the one stage sampler. The closed-form posterior test of
`classifier_guidance` itself is in test_diffusion_guidance.py; the cascade and CLI wiring
in test_sample_cascade.py."""

import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.data import labels as labels_lib
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import shapes
from imagen_jax.diffusion import stage as stage_lib
from imagen_jax.errors import UserError
from imagen_jax.nn.classifier import NoisyClassifier
from imagen_jax.nn.unet import UNet
from imagen_jax.parallel import rules
from imagen_jax.train import checkpoint as ckpt_lib

TINY = dict(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), head_dim=8, num_groups=4)


@pytest.fixture(scope="module")
def classifier():
  """A tiny classifier with every parameter random (a fresh one has zeroed residual
  outputs, so nothing but the input convolution would reach the logits)."""
  model = NoisyClassifier(rngs=nnx.Rngs(0), num_classes=18, **TINY)
  params = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  leaves = [jax.random.normal(k, x.shape) / np.sqrt(max(1, np.prod(x.shape[:-1])))
            for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(tree, leaves))
  return model


def test_classifier_is_the_unet_encoder_half_with_named_axes(classifier):
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
  logits = classifier(x, jnp.array([-5.0, 0.0, 5.0]))
  assert logits.shape == (3, 18) and logits.dtype == jnp.float32
  # The noise level conditions the output (the embedding feeds every residual block).
  assert not np.allclose(logits, classifier(x, jnp.array([5.0, 0.0, -5.0])))
  for path, var in nnx.to_flat_state(nnx.state(classifier, nnx.Param)):
    names = rules.variable_logical_axes(var)
    assert names is not None and len(names) == var.get_value().ndim, path
    rules.logical_to_mesh(names)
  # The same residual blocks as the U-Net's down path and middle (unet.encoder_path).
  unet = nnx.eval_shape(lambda: UNet(rngs=nnx.Rngs(0), text_dim=16, **TINY))

  def res_shapes(blocks):
    return [jax.tree.map(lambda v: v.shape, nnx.state(b.res, nnx.Param)) for b in blocks]
  assert res_shapes(classifier.down) == res_shapes(unet.down)
  assert res_shapes(classifier.middle) == res_shapes(unet.middle)
  assert [b.attn is None for b in classifier.down] == [b.attn is None for b in unet.down]


def test_object_labels_come_from_the_caption():
  names = shapes.object_labels()
  assert len(names) == 18 and names[0] == "red circle" and names[-1] == "purple triangle"
  assert shapes.object_label("a blue square") == names.index("blue square")
  assert shapes.object_label("A  Blue Square") == names.index("blue square")
  assert shapes.object_label("a red circle above a blue square") == shapes.NO_LABEL
  with pytest.raises(UserError, match="not in the shapes grammar"):
    shapes.object_label("a pink circle")
  label_set = labels_lib.get_label_set("shapes_object")
  assert label_set.prompt_label("a green triangle") == names.index("green triangle")
  for bad in ("a red circle above a blue square", "a pink circle"):
    with pytest.raises(UserError, match="labels that the prompt does not have") as e:
      label_set.prompt_label(bad)
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="shapes_object"):
    labels_lib.get_label_set("imagenet")
  # The pipeline's labels: deterministic, the caption's class, two objects masked.
  pipe = pipeline_lib.Pipeline("shapes", None, image_size=8, global_batch_size=32, seed=0,
                               max_length=None, label_fn=label_set.data_label)
  batch = pipe.host_batch(3)
  captions = [pipe.example(int(i))["caption"] for i in batch["index"]]
  np.testing.assert_array_equal(batch["label"],
                                [shapes.object_label(c) for c in captions])
  assert 0 < np.sum(batch["label"] >= 0) < 32
  np.testing.assert_array_equal(batch["label"], pipe.host_batch(3)["label"])


@pytest.mark.slow
def test_classifier_training_loss_decreases(tmp_path):
  from imagen_jax.train import loop, step as step_lib
  gin.bind_parameter("lr_schedule.peak_lr", 5e-3)
  gin.bind_parameter("lr_schedule.warmup_steps", 5)

  def create(*, rngs):
    return NoisyClassifier(rngs=rngs, num_classes=18, labels="shapes_object", **TINY)
  out = loop.train(model_dir=str(tmp_path / "cls"), train_steps=60, dataset="shapes",
                   batch_size=32, log_every=20, checkpoint_every=60, progress=False,
                   tensorboard=False, create_model_fn=create,
                   loss_cfg=step_lib.LossConfig(task="classifier"))
  history = out["history"]
  assert out["status"] == "done" and out["step"] == 60
  print("classifier training:", [(h["step"], h["loss"], h["accuracy"]) for h in history])
  # Cross-entropy over 18 classes starts near log 18 and falls; accuracy is logged.
  assert history[0]["loss"] == pytest.approx(np.log(18), abs=0.6)
  assert history[-1]["loss"] < history[0]["loss"] - 0.25
  assert 0.0 <= history[-1]["accuracy"] <= 1.0
  assert history[-1]["accuracy"] > 1 / 18
  info = ckpt_lib.read_model_json(tmp_path / "cls")
  assert (info.model_class, info.labels, info.num_classes, info.text_dim) == (
      "NoisyClassifier", "shapes_object", 18, 0)
  # A diffusion task with a classifier (or the reverse) is refused in one line.
  with pytest.raises(UserError, match="does not fit the model"):
    loop.train(model_dir=str(tmp_path / "bad"), train_steps=1, dataset="shapes",
               batch_size=32, progress=False, tensorboard=False, create_model_fn=create,
               loss_cfg=step_lib.LossConfig())
  with pytest.raises(UserError, match="sample_every"):
    loop.train(model_dir=str(tmp_path / "bad2"), train_steps=1, dataset="shapes",
               batch_size=32, progress=False, tensorboard=False, create_model_fn=create,
               sample_every=1, loss_cfg=step_lib.LossConfig(task="classifier"))


def _red_classifier(x, log_snr):
  """Two classes scored by the mean of the first channel: class 0 'red', class 1 not."""
  del log_snr
  m = jnp.mean(x[..., 0], axis=(1, 2))
  return jnp.stack([4.0 * m, -4.0 * m], axis=-1)


def test_guided_sampling_moves_samples_toward_the_label():
  info = ckpt_lib.ModelInfo(model_class="Zero", image_size=8, text_dim=4, objective="eps")
  zero_eps = lambda x, log_snr, **cond: jnp.zeros_like(x)   # the prior: N(0, I) data
  settings = stage_lib.SamplerSettings(sampler="ddim", num_steps=16, guidance_scale=1.0,
                                       thresholding="none")
  seeds = np.arange(16, dtype=np.uint32)
  text = dict(text_emb=jnp.zeros((16, 2, 4)), text_mask=jnp.zeros((16, 2), bool))
  sample = functools.partial(stage_lib.sample_stage, zero_eps, settings, info, seeds, 0,
                             **text)
  plain = sample()
  labels = np.array([0] * 8 + [1] * 8)
  for scale in (1.0, 3.0):
    fn = stage_lib.classifier_log_prob(_red_classifier, labels)
    guided = sample(classifier=(fn, scale))
    shift = np.asarray(jnp.mean(guided[..., 0] - plain[..., 0], axis=(1, 2)))
    assert np.all(shift[:8] > 0) and np.all(shift[8:] < 0), shift
    # The other channels do not enter log p: untouched.
    np.testing.assert_allclose(guided[..., 1:], plain[..., 1:], atol=1e-5)
  # Twice the scale moves twice as far at the first step; here: monotone in the scale.
  far = sample(classifier=(stage_lib.classifier_log_prob(_red_classifier, labels), 3.0))
  near = sample(classifier=(stage_lib.classifier_log_prob(_red_classifier, labels), 1.0))
  assert np.all(np.abs(np.mean(far[:, ..., 0] - plain[..., 0], axis=(1, 2)))
                > np.abs(np.mean(near[..., 0] - plain[..., 0], axis=(1, 2))))


def test_classifier_settings_are_checked():
  with pytest.raises(UserError, match="needs classifier_dir"):
    stage_lib.SamplerSettings(classifier_scale=2.0)
  with pytest.raises(UserError, match="classifier_scale=-1"):
    stage_lib.SamplerSettings(classifier_scale=-1.0, classifier_dir="x")
  settings = stage_lib.SamplerSettings(classifier_scale=2.0, classifier_dir="runs/cls")
  assert settings.record(False)["classifier_scale"] == 2.0
  assert "classifier_scale" not in stage_lib.SamplerSettings().record(False)


# ----------------------------------------------------------------------- noised CLIP


def test_soft_contrastive_loss_matches_its_definition():
  from imagen_jax.train import noised_clip
  rng = np.random.default_rng(0)
  image, text = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  caps = np.array([0, 1, 0, 2, 1])
  loss, acc = noised_clip.soft_contrastive_loss(jnp.asarray(image), jnp.asarray(text),
                                                jnp.log(10.0), jnp.asarray(caps))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  logits = 10.0 * unit(image) @ unit(text).T
  same = (caps[:, None] == caps[None, :]).astype(float)
  logsm = lambda z, axis: z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))
  expected = (-np.mean(np.sum(same / same.sum(1, keepdims=True) * logsm(logits, 1), 1))
              - np.mean(np.sum(same / same.sum(0, keepdims=True) * logsm(logits, 0), 0))) / 2
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(acc) == pytest.approx(np.mean(same[np.arange(5), logits.argmax(1)]))


@pytest.mark.slow
def test_noised_clip_phases_freeze_the_text_tower_and_guide(tmp_path):
  from imagen_jax.nn import clip as clip_lib
  from imagen_jax.sample import cascade as cascade_lib
  from imagen_jax.text import vocab as vocab_lib
  from imagen_jax.train import noised_clip
  spiece = vocab_lib.train_sentencepiece(shapes.all_captions("train"), tmp_path / "sp.model",
                                         vocab_size=96, model_type="bpe")  # the quickstart's
  info = noised_clip.train_noised_clip(tmp_path / "clip", spiece, clean_steps=3,
                                       noised_steps=3, batch=8, image_size=8,
                                       log=lambda *a: None)
  assert info["kind"] == "noised_clip" and info["noised"]["steps"] == 3
  clean, noised = (clip_lib.load_clip(tmp_path / "clip" / d) for d in ("clean", "noised"))
  flat = lambda m, tower: {p: np.asarray(v.get_value()) for p, v in
                           nnx.to_flat_state(nnx.state(getattr(m, tower)))}
  for path, value in flat(clean, "text_model").items():   # frozen in phase 2
    np.testing.assert_array_equal(value, flat(noised, "text_model")[path])
  np.testing.assert_array_equal(np.asarray(clean.text_projection.get_value()),
                                np.asarray(noised.text_projection.get_value()))
  assert any(not np.array_equal(v, flat(noised, "vision_model")[p])
             for p, v in flat(clean, "vision_model").items())
  # As a guide: prompts -> unit text embeddings; log p is the CLIP logit of x_t.
  config = stage_lib.SamplerSettings(classifier_scale=1.0,
                                     classifier_dir=str(tmp_path / "clip"))
  guide = cascade_lib.load_guide(config, 8)
  text = guide.prompt_labels(["a red circle", "a blue square above a red circle"])
  np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  log_p = guide.log_prob_fn(guide.model, jnp.asarray(text))(x, jnp.zeros(2))
  image = clip_lib.normalize(guide.model.encode_image(x))
  np.testing.assert_allclose(
      log_p, np.exp(float(guide.model.logit_scale.get_value())) * np.sum(image * text, 1),
      rtol=1e-5)
  with pytest.raises(UserError, match="takes 8px images"):
    cascade_lib.load_guide(config, 16)
