"""CLIP: config, Hugging Face layout round trip, pooling, tokenizer, preprocessing, score.

Parity with transformers' CLIPModel on the same random weights is measured by
benchmarks/clip_parity.py (torch lives in another venv); these tests check what can fail
without it: the layout conventions, the pooling rule, the tokenizer on hand-computed ids,
the preprocessing closed forms and the CLIP score closed forms.
"""

import functools
import json
import unicodedata

import jax
import numpy as np
import pytest
from flax import nnx

from imagen_jax.data.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from imagen_jax.data.clip_preprocess import ClipImageProcessor
from imagen_jax.errors import UserError
from imagen_jax.eval import clip_score
from imagen_jax.nn import clip
from imagen_jax.text import clip_tokenizer as ct

MERGES = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("lo", "w")]
VOCAB = ct.byte_level_vocab(MERGES)
BOS, EOS = VOCAB[ct.BOS], VOCAB[ct.EOS]
W = 256  # offset of the `</w>` byte characters in a byte-level vocabulary


def tiny_config(eos_token_id=EOS, **text):
  return clip.CLIPConfig(
      text=clip.CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=16, bos_token_id=BOS,
                               eos_token_id=eos_token_id, pad_token_id=EOS, **text),
      vision=clip.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=16, patch_size=8,
                                   hidden_act="gelu"),
      projection_dim=24)


@pytest.fixture(scope="module")
def model():
  # Every parameter (norms and biases included) is moved off its initial value, so that a
  # layout mistake in any of them changes the outputs.
  return clip.random_clip(tiny_config(), seed=0, spread=0.1)


def jitted(method):
  """A compiled `model.method(x)` (eager CLIP runs op by op: slow)."""
  fn = jax.jit(lambda state, graphdef, x: getattr(nnx.merge(graphdef, state), method)(x),
               static_argnums=1)
  return lambda module, x: fn(nnx.state(module), nnx.graphdef(module), x)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, model):
  path = tmp_path_factory.mktemp("clip")
  clip.save_clip(path, model)
  ct.save_tokenizer(path, VOCAB, MERGES, max_length=16)
  ClipImageProcessor(shortest_edge=16, crop_size=16).save(path)
  return path


def test_config_reads_legacy_dict_overrides_and_rejects_other_models():
  config = clip.CLIPConfig.from_hf_json({
      "model_type": "clip", "projection_dim": 768,
      "text_config": {"hidden_size": 512, "eos_token_id": 2, "unknown": 1},
      "text_config_dict": {"hidden_size": 768, "num_attention_heads": 12},
      "vision_config": {"image_size": [336, 336], "patch_size": 14}, "vision_config_dict": None})
  assert (config.text.hidden_size, config.text.num_attention_heads) == (768, 12)
  assert config.text.eos_token_id == 2 and config.text.vocab_size == 49408
  assert (config.vision.image_size, config.vision.patch_size) == (336, 14)
  assert config.projection_dim == 768
  assert clip.CLIPConfig.from_hf_json(config.to_hf_json()) == config
  with pytest.raises(UserError, match="model_type"):
    clip.CLIPConfig.from_hf_json({"model_type": "siglip"})
  with pytest.raises(UserError, match="hidden_act"):
    clip.CLIPConfig.from_hf_json({"text_config": {"hidden_act": "swish9"}})


def test_every_parameter_has_logical_axis_names(model):
  from imagen_jax.parallel import rules
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    names = rules.variable_logical_axes(variable) or ()
    assert len(names) == variable.get_value().ndim, path
    rules.logical_to_mesh(names)  # every name has a rule


def test_hf_round_trip_and_layout(clip_dir, model):
  from imagen_jax.weights import read_hf_weights
  loaded = clip.load_clip(clip_dir)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)),
                               nnx.to_flat_state(nnx.state(loaded))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                  err_msg=str(path))
  ids = np.array([[BOS, 108, 111, EOS, EOS]])
  pixels = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  text, image = jitted("encode_text"), jitted("encode_image")
  np.testing.assert_allclose(text(loaded, ids), text(model, ids), atol=1e-6)
  np.testing.assert_allclose(image(loaded, pixels), image(model, pixels), atol=1e-6)
  # HF's conventions: Linear weights [out, in] applied as x @ W.T + b; conv [D, C, P, P].
  pre = "text_model.encoder.layers.0.self_attn.q_proj"
  hf = read_hf_weights(clip_dir, [f"{pre}.weight", f"{pre}.bias",
                                  "vision_model.embeddings.patch_embedding.weight"])
  attention = model.text_model.layers[0].attention
  x = np.random.default_rng(1).normal(size=(3, 32)).astype(np.float32)
  ours = np.einsum("ld,dhk->lhk", x, attention.query[...]) + attention.query_bias[...]
  theirs = (x @ hf[f"{pre}.weight"].T + hf[f"{pre}.bias"]).reshape(3, 4, 8)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  assert hf["vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 8, 8)
  patch = pixels[0, :8, 8:16]  # row 0, column 1 of the 2 x 2 grid -> patch index 1
  conv = np.einsum("chw,dchw->d", patch.transpose(2, 0, 1),
                   hf["vision_model.embeddings.patch_embedding.weight"])
  np.testing.assert_allclose(model.vision_model.patchify(pixels)[0, 1], conv, atol=1e-5)


def test_shape_mismatch_and_missing_files_are_user_errors(tmp_path, clip_dir):
  config = json.loads((clip_dir / "config.json").read_text())
  config["text_config"]["hidden_size"] = 64
  (tmp_path / "config.json").write_text(json.dumps(config))
  (tmp_path / "model.safetensors").write_bytes((clip_dir / "model.safetensors").read_bytes())
  with pytest.raises(UserError, match="do not belong together|does not fit"):
    clip.load_clip(tmp_path)
  with pytest.raises(UserError, match="does not exist"):
    clip.load_clip(tmp_path / "nowhere")


def test_text_pooling_is_at_the_first_end_of_text(model):
  text = functools.partial(jitted("__call__"), model.text_model)
  ids = np.array([[BOS, 108, 111, EOS, 5, 6, EOS, EOS],
                  [BOS, EOS, EOS, EOS, EOS, EOS, EOS, EOS]])
  hidden, pooled = text(ids)
  np.testing.assert_allclose(pooled[0], hidden[0, 3], atol=0)
  np.testing.assert_allclose(pooled[1], hidden[1, 1], atol=0)
  # Causal attention: what follows the first end-of-text token cannot change the pooled.
  changed = ids.copy()
  changed[0, 4:] = [300, 301, 302, 303]
  np.testing.assert_allclose(text(changed)[1][0], pooled[0], atol=1e-6)
  assert not np.allclose(text(changed)[0][0, 5], hidden[0, 5])
  # Legacy configs (eos_token_id == 2) pool at the largest id, as transformers does.
  legacy = clip.TextTransformer(tiny_config(eos_token_id=2).text, dtype=np.float32,
                                param_dtype=np.float32, rngs=nnx.Rngs(0))
  legacy_ids = np.array([[BOS - 1, 3, 400, 2]])
  np.testing.assert_array_equal(legacy.pool_positions(legacy_ids), [0])
  legacy_hidden, legacy_pooled = jitted("__call__")(legacy, legacy_ids)
  np.testing.assert_allclose(legacy_pooled[0], legacy_hidden[0, 0], atol=0)
  np.testing.assert_array_equal(
      model.text_model.pool_positions(np.array([[1, EOS, 3, EOS]])), [1])


@pytest.mark.parametrize("text, pieces", [
    ("Lower  low", [515, 514, 513]),  # lo w er</w> -> low er</w>; lo w</w> -> low</w>
    ("don't", [100, 111, W + 110, 39, W + 116]),  # "don" + the contraction "'t"
    ("x.<|endoftext|>y", [W + 120, W + 46, EOS, W + 121]),  # special tokens cut out first
    ("3.14", [W + 51, W + 46, W + 49, W + 52]),  # digits are single words
    ("abc12", [97, 98, W + 99, W + 49, W + 50]),
    ("x²!?", [W + 120, 0xC2, W + 0xB2, 33, W + 63]),  # ² is a number (No), 2 bytes
    (unicodedata.normalize("NFD", "É"), [0xC3, W + 0xA9]),  # NFC, then lowercase: é
    ("", []),
])
def test_tokenizer_hand_computed(clip_dir, text, pieces):
  tokenizer = ct.CLIPTokenizer.load(clip_dir)
  assert tokenizer.encode(text) == pieces
  tokens = tokenizer([text])
  expected = [BOS, *pieces, EOS]
  assert tokens.ids[0, :len(expected)].tolist() == expected
  assert (tokens.ids[0, len(expected):] == EOS).all()  # the default pad token
  assert tokens.mask[0].sum() == len(expected) and tokens.truncated == []


def test_tokenizer_truncates_keeping_end_of_text_and_reads_other_layouts(tmp_path):
  ct.save_tokenizer(tmp_path / "a", VOCAB, MERGES, pad_token="!", max_length=8)
  tokenizer = ct.CLIPTokenizer.load(tmp_path / "a")
  tokens = tokenizer(["a b c d e f g h", "a"])
  assert tokens.ids.shape == (2, 8) and tokens.truncated == [0]
  assert tokens.ids[0].tolist() == [BOS] + [W + c for c in b"abcdef"] + [EOS]
  assert tokens.ids[1].tolist() == [BOS, W + 97, EOS] + [33] * 5  # pad "!" from the config
  # tokenizer.json, with the merges as pairs (tokenizers >= 0.20).
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(
      {"model": {"type": "BPE", "vocab": VOCAB, "merges": [list(m) for m in MERGES]}}))
  assert ct.CLIPTokenizer.load(tmp_path / "b").encode("lower") == [515, 514]
  with pytest.raises(UserError, match="no CLIP tokenizer"):
    ct.CLIPTokenizer.load(tmp_path)


def test_learned_merges_round_trip_words():
  merges = ct.learn_merges(["a red car", "a red dog", "red red"], 6)
  # (r, e) and (e, d</w>) both occur 4 times: ties go to the smaller pair.
  assert merges[:2] == [("e", "d</w>"), ("r", "ed</w>")]
  tokenizer = ct.CLIPTokenizer(ct.byte_level_vocab(merges), merges)
  assert len(tokenizer.encode("red")) == 1


def test_preprocessing_closed_forms():
  proc = ClipImageProcessor.from_hf_json({"size": 16, "crop_size": 16})  # legacy int sizes
  mean, std = np.asarray(OPENAI_CLIP_MEAN), np.asarray(OPENAI_CLIP_STD)
  flat = proc(np.full((20, 30, 3), 200, np.uint8))
  assert flat.shape == (16, 16, 3) and flat.dtype == np.float32
  np.testing.assert_allclose(flat, np.broadcast_to((200 / 255 - mean) / std, flat.shape),
                             atol=1e-5)
  # 16 x 48, shortest side already 16: no resampling; the centre crop is columns 16..31.
  image = np.zeros((16, 48, 3), np.uint8)
  image[:, 24:] = 255
  out = proc(image)
  np.testing.assert_allclose(out[:, :8], np.broadcast_to(-mean / std, (16, 8, 3)), atol=1e-5)
  np.testing.assert_allclose(out[:, 8:], np.broadcast_to((1 - mean) / std, (16, 8, 3)),
                             atol=1e-5)
  with pytest.raises(UserError, match="uint8"):
    proc(np.zeros((4, 4), np.uint8))


def test_clip_score_closed_forms():
  a = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  assert clip_score.clip_score(a, 5 * a) == pytest.approx(100.0)  # identical directions
  orthogonal = np.array([[0.0, 0.0, 1.0]] * 2)
  assert clip_score.clip_score(a[1:], orthogonal) == pytest.approx(0.0)
  assert clip_score.clip_score(a[1:2], -a[1:2]) == 0.0  # negative cosines clip to 0
  scores = clip_score.pair_scores(a[1:], np.array([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
  np.testing.assert_allclose(scores, [100 / np.sqrt(2), 0.0], rtol=1e-6)
  with pytest.raises(UserError):
    clip_score.clip_score(np.zeros((0, 3)), np.zeros((0, 3)))


def test_scorer_padding_and_batch_size_do_not_change_scores(clip_dir, model):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (16 + i, 20, 3), dtype=np.uint8) for i in range(10)]
  texts = ["lower", "low low", "a red car", "lower"] * 2 + ["x", "don't"]
  small = clip_score.ClipScorer(clip_dir, batch_size=8, progress=False)
  large = clip_score.ClipScorer(clip_dir, batch_size=24, progress=False)
  assert (small.batch_size, large.batch_size) == (8, 24)  # multiples of the 8 devices
  np.testing.assert_allclose(small.pair_scores(images, texts),
                             large.pair_scores(images, texts), atol=1e-4)
  # Equal to the unpadded, unsharded module.
  pixels = small.preprocess.batch(images)
  ids = small.tokenizer(texts).ids
  direct = clip_score.pair_scores(jitted("encode_image")(model, pixels),
                                  jitted("encode_text")(model, ids))
  np.testing.assert_allclose(small.pair_scores(images, texts), direct, atol=1e-4)
