"""Tokenization for the T5 encoder: a sentencepiece model with T5's conventions.

`Vocabulary` encodes as seqio's `SentencePieceVocabulary` does (no extra ids), with
sentencepiece alone: seqio imports TensorFlow, 5 s of every command's start-up
(tests/test_text_vocab.py checks the two give the same ids).

T5 ids: 0 = pad, 1 = EOS, 2 = unk, no BOS. seqio hard-codes `PAD_ID = 0` and pads every
feature with 0, and T5 code (t5x, seqio's feature converters) treats id 0 as padding. A
sentencepiece model trained with sentencepiece's defaults (unk 0, bos 1, eos 2) would put
the unknown token at 0, so every unknown piece would be taken for padding, and EOS would
not be 1. `load_vocabulary` refuses such a model and `train_sentencepiece` never makes one.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from etils import epath

from imagen_jax import files
from imagen_jax.errors import UserError

DEFAULT_MAX_LENGTH = 128


class Tokens(NamedTuple):
  ids: np.ndarray       # int32 [N, L], 0 after the EOS
  mask: np.ndarray      # bool [N, L], True at real tokens (the EOS included)
  truncated: list[int]  # indices of captions cut to fit max_length (callers warn)


class Vocabulary:
  """A sentencepiece model with T5's ids: `encode` gives the pieces' ids (no EOS)."""

  def __init__(self, processor):
    self.tokenizer = processor  # sentencepiece.SentencePieceProcessor

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.GetPieceSize()

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_id()

  @property
  def eos_id(self) -> int:
    return self.tokenizer.eos_id()

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.EncodeAsIds(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.DecodeIds(list(ids))


def load_vocabulary(path: str | os.PathLike) -> Vocabulary:
  """The `Vocabulary` of a sentencepiece model file (local or gs://).

  Raises UserError if the file is missing or its ids do not follow T5 (pad 0, an EOS).
  """
  import sentencepiece as spm
  path = epath.Path(path)
  if not path.exists():
    raise UserError(f"sentencepiece model {os.fspath(path)!r} does not exist; pass the "
                    "checkpoint's spiece.model or train one with "
                    "imagen_jax.text.vocab.train_sentencepiece")
  processor = spm.SentencePieceProcessor()
  try:
    processor.LoadFromSerializedProto(path.read_bytes())
  except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad file
    raise UserError(f"{os.fspath(path)!r} is not a sentencepiece model: {e}") from e
  if processor.pad_id() != 0 or processor.eos_id() <= 0:
    raise UserError(
        f"sentencepiece model {os.fspath(path)!r} has pad_id={processor.pad_id()}, "
        f"eos_id={processor.eos_id()}, unk_id={processor.unk_id()}: seqio pads with id 0, so "
        "id 0 must be the pad piece and an EOS must exist, or padding collides with a real "
        "token. Retrain it with pad_id=0, eos_id=1, unk_id=2, bos_id=-1 "
        "(imagen_jax.text.vocab.train_sentencepiece does)")
  return Vocabulary(processor)


def vocabulary_sha256(path: str | os.PathLike) -> str:
  return hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()


def tokenize(vocab, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> Tokens:
  """Tokenizes captions as T5 does: the pieces, then EOS; padded with 0 to `max_length`.

  A caption longer than `max_length - 1` pieces is cut so that its EOS still fits (T5 and
  Imagen always end the sequence with EOS); its index is listed in `truncated`.
  """
  if max_length < 2:
    raise UserError(f"max_length={max_length} leaves no room for a token and the EOS; "
                    "use at least 2 (Imagen uses 128)")
  if isinstance(texts, str):
    raise UserError("tokenize expects a list of captions, not one string")
  eos = vocab.eos_id
  ids = np.zeros((len(texts), max_length), np.int32)
  mask = np.zeros((len(texts), max_length), bool)
  truncated = []
  for i, text in enumerate(texts):
    pieces = list(vocab.encode(text))
    if len(pieces) > max_length - 1:
      pieces = pieces[:max_length - 1]
      truncated.append(i)
    pieces.append(eos)
    ids[i, :len(pieces)] = pieces
    mask[i, :len(pieces)] = True
  return Tokens(ids, mask, truncated)


def train_sentencepiece(texts: Iterable[str], model_path: str | os.PathLike,
                        vocab_size: int, model_type: str = "unigram") -> str:
  """Trains a sentencepiece model with T5's ids (pad 0, EOS 1, unk 2, no BOS).

  `model_type` is sentencepiece's: "unigram" (T5's) or "bpe", which keeps whole words as
  pieces on a tiny corpus where unigram spells them letter by letter (the quickstart's).

  Deterministic: the same texts and vocab_size give a byte-identical model (one thread, no
  sampling or shuffling of the input). `vocab_size` is an upper bound: a small corpus may
  give fewer pieces. Returns the path written (atomically: a temp file, then a rename).
  """
  import sentencepiece as spm
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise UserError("train_sentencepiece got no non-empty text")
  if vocab_size < 4:
    raise UserError(f"vocab_size={vocab_size} is too small; the three special pieces "
                    "alone take 3 ids")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
  except RuntimeError as e:
    raise UserError(f"sentencepiece training failed (vocab_size={vocab_size}, "
                    f"model_type={model_type!r}): {e}") from e
  files.write_atomic(model_path, model.getvalue())
  return os.fspath(model_path)
