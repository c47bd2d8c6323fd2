"""Tokenization (T5 conventions, the same ids as seqio) and deterministic sentencepiece
training."""

import io
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from imagen_jax.errors import UserError
from imagen_jax.text import vocab

TEXTS = [f"a {c} {s} {r} a {c2} square"
         for c in ("red", "blue", "green") for s in ("circle", "triangle")
         for r in ("above", "below") for c2 in ("purple", "yellow")]


@pytest.fixture(scope="module")
def seqio_vocab(seqio_spm):
  return vocab.load_vocabulary(seqio_spm)


def test_tokenize_appends_eos_and_masks(seqio_vocab):
  texts = ["abc", "", "a red circle"]
  tokens = vocab.tokenize(seqio_vocab, texts, max_length=20)
  assert tokens.ids.dtype == np.int32 and tokens.mask.dtype == bool
  assert tokens.ids.shape == tokens.mask.shape == (3, 20)
  assert tokens.truncated == []
  for i, text in enumerate(texts):
    pieces = list(seqio_vocab.encode(text)) + [1]  # T5: EOS (id 1) ends every sequence
    n = len(pieces)
    assert tokens.ids[i, :n].tolist() == pieces
    assert tokens.mask[i].tolist() == [True] * n + [False] * (20 - n)
    assert (tokens.ids[i, n:] == 0).all()  # seqio's pad id


def test_truncation_keeps_eos(seqio_vocab):
  long = "abcd " * 40
  tokens = vocab.tokenize(seqio_vocab, ["ab", long], max_length=8)
  assert tokens.truncated == [1]
  assert tokens.mask[1].all()
  assert tokens.ids[1, -1] == 1
  assert tokens.ids[1, :7].tolist() == list(seqio_vocab.encode(long))[:7]
  with pytest.raises(UserError, match="max_length"):
    vocab.tokenize(seqio_vocab, ["a"], max_length=1)


def test_default_max_length_is_128(seqio_vocab):
  assert vocab.tokenize(seqio_vocab, ["a"]).ids.shape == (1, 128)


def test_same_ids_as_seqio_without_importing_tensorflow(seqio_spm, tmp_path):
  import seqio
  trained = vocab.train_sentencepiece(TEXTS, tmp_path / "t.model", vocab_size=48)
  texts = ["a red circle above a purple square", "", "  two  spaces ", "Ünïcode: ∑ 3.5%",
           "unknown words: zebra quokka"]
  for path in (seqio_spm, trained):
    ours, theirs = vocab.load_vocabulary(path), seqio.SentencePieceVocabulary(str(path))
    assert (ours.vocab_size, ours.eos_id, ours.pad_id) == (theirs.vocab_size,
                                                           theirs.eos_id, theirs.pad_id)
    for text in texts:
      ids = ours.encode(text)
      assert ids == list(theirs.encode(text)), (path, text)
      assert ours.decode(ids) == theirs.decode(ids)
  # Loading and tokenizing must not pull in TensorFlow (seconds of every command's start).
  code = ("import sys; from imagen_jax.text import vocab; "
          f"vocab.tokenize(vocab.load_vocabulary({str(trained)!r}), ['a red circle']); "
          "print(sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_train_sentencepiece_is_deterministic_with_t5_ids(tmp_path):
  a = vocab.train_sentencepiece(TEXTS, tmp_path / "a.model", vocab_size=48)
  b = vocab.train_sentencepiece(TEXTS, tmp_path / "b.model", vocab_size=48)
  assert pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes()
  processor = spm.SentencePieceProcessor(model_file=a)
  assert (processor.pad_id(), processor.eos_id(), processor.unk_id(),
          processor.bos_id()) == (0, 1, 2, -1)
  v = vocab.load_vocabulary(a)
  assert v.pad_id == 0 and v.eos_id == 1
  tokens = vocab.tokenize(v, [TEXTS[0]], max_length=64)
  n = int(tokens.mask.sum())
  assert tokens.ids[0, n - 1] == 1 and 0 not in tokens.ids[0, :n]
  assert v.decode(tokens.ids[0, :n - 1].tolist()) == TEXTS[0]
  with pytest.raises(UserError, match="no non-empty"):
    vocab.train_sentencepiece(["", "  "], tmp_path / "c.model", 32)


def test_rejects_model_whose_id_0_is_not_pad(tmp_path):
  """sentencepiece's defaults put unk at 0, which seqio's zero padding would collide with."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=model,
                                 vocab_size=40, hard_vocab_limit=False, minloglevel=2)
  path = tmp_path / "default_ids.model"
  path.write_bytes(model.getvalue())
  with pytest.raises(UserError, match="pad_id=-1.*collides"):
    vocab.load_vocabulary(path)
  with pytest.raises(UserError, match="does not exist"):
    vocab.load_vocabulary(tmp_path / "missing.model")
