"""Grounding pretraining (imagen_jax.quickstart.grounding): a small T5 learns from captioned
shapes which object a caption puts where, which a random T5 cannot tell the U-Net."""

import numpy as np
import pytest

from imagen_jax.data import shapes
from imagen_jax.errors import UserError
from imagen_jax.quickstart import grounding, text_assets
from imagen_jax.text import t5, vocab


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "spiece.model"
  return vocab.load_vocabulary(vocab.train_sentencepiece(
      text_assets.shapes_corpus(), path, text_assets.DEFAULT_VOCAB_SIZE, model_type="bpe"))


def _encoder(vocabulary):
  config = text_assets.toy_t5_config(vocab_size=vocabulary.tokenizer.get_piece_size())
  return t5.random_encoder(config, seed=0, position_bias_std=text_assets.DEFAULT_POSITION_BIAS_STD)


@pytest.mark.slow
def test_pretraining_learns_the_layout_order(vocabulary):
  encoder = _encoder(vocabulary)
  before = np.asarray(encoder.embedding[...]).copy()
  report = grounding.pretrain(encoder, vocabulary, steps=500, batch_size=128, seed=0,
                              progress=False)
  # The head's predictions put the caption's objects in the caption's order: a coin flip
  # (0.5) for a model that only knows the colours, 1.0 for one that knows the roles.
  assert report.order_train >= 0.85, report
  assert report.losses[-1] < 0.5 * report.losses[0], report
  # The encoder itself was trained in place (the head is only a means).
  assert not np.allclose(np.asarray(encoder.embedding[...]), before)


def test_chunking_of_the_steps_does_not_change_the_training(vocabulary):
  """The steps run in jitted chunks of `log_every`: where the chunks end changes neither the
  weights nor the logged losses (one every log_every steps, and the last step's)."""
  runs = {}
  for log_every in (3, 6):
    encoder = _encoder(vocabulary)
    report = grounding.pretrain(encoder, vocabulary, steps=6, batch_size=16, seed=3,
                                num_scenes=64, log_every=log_every, progress=False)
    runs[log_every] = (report.losses, np.asarray(encoder.embedding[...]))
  (losses3, weights3), (losses6, weights6) = runs[3], runs[6]
  assert len(losses3) == 3 and len(losses6) == 2  # steps 0, 3, 5 and 0, 5
  np.testing.assert_allclose([losses3[0], losses3[-1]], losses6, rtol=1e-5)
  assert losses3[-1] < losses3[0]
  np.testing.assert_allclose(weights3, weights6, rtol=1e-4, atol=1e-6)
  assert not np.allclose(weights3, np.asarray(_encoder(vocabulary).embedding[...]))


def test_order_accuracy_scores_a_known_predictor(vocabulary):
  """The metric itself: the caption's own mean image scores 1, the swapped one's 0."""
  two = [c for c in shapes.all_captions("train") if shapes.parse_caption(c).relation][:12]
  by_ids = {}
  tokens = vocab.tokenize(vocabulary, two, 16)
  for caption, ids in zip(two, tokens.ids):
    by_ids[ids.tobytes()] = caption
  def oracle(swap):
    def predict(ids, mask):
      caps = [by_ids[np.asarray(row).tobytes()] for row in ids]
      return np.stack([shapes.mean_render(shapes.swap_objects(c) if swap else c, 8)
                       for c in caps])
    return predict
  assert grounding.order_accuracy(oracle(False), vocabulary, two, 8, 16) == 1.0
  assert grounding.order_accuracy(oracle(True), vocabulary, two, 8, 16) == 0.0


def test_bad_settings(vocabulary):
  encoder = _encoder(vocabulary)
  for kwargs, match in (({"steps": -1}, "negative"), ({"resolution": 1}, "resolution"),
                        ({"batch_size": 0}, "batch_size"), ({"learning_rate": 0}, "positive"),
                        ({"log_every": 0}, "log_every")):
    with pytest.raises(UserError, match=match):
      grounding.pretrain(encoder, vocabulary, progress=False, **kwargs)
  with pytest.raises(UserError, match="max_length"):
    grounding.pretrain(encoder, vocabulary, steps=1, max_length=4, progress=False)
