"""CLIP's tokenizer: byte-level BPE with an end-of-word suffix (Radford et al. 2021, §2.4;
openai/CLIP `simple_tokenizer.py`, transformers' `CLIPTokenizer`).

  tok = CLIPTokenizer.load("ckpt/clip-vit-base-patch32")
  tokens = tok(["a red car", ...])   # Tokens(ids int32 [N, 77], mask bool, truncated)

A text becomes ids in five steps, as transformers' CLIPTokenizer does:

1. normalise: Unicode NFC, every run of whitespace -> one space, lowercase;
2. cut out the special tokens `<|startoftext|>` / `<|endoftext|>` written in the text;
3. split the rest into words: the contractions 's 't 're 've 'm 'll 'd, runs of letters
   (\\p{L}), single digits (\\p{N}), and runs of anything else but whitespace; whitespace
   separates words and is dropped. (The `regex` package is not a dependency, so the split
   is a small scanner over Unicode categories instead of a `\\p{..}` regex.)
4. map each word's UTF-8 bytes to printable characters (`bytes_to_unicode`, GPT-2's table)
   and mark its last character with `</w>`;
5. merge adjacent pairs by the rank of `merges.txt` until no pair has a rank, and look up
   each piece in `vocab.json` (a piece not there becomes the unknown token).

`__call__` wraps the ids in `<|startoftext|>` ... `<|endoftext|>`, truncates a long text so
that `<|endoftext|>` is still the last token (transformers with `truncation=True`; openai's
`clip.tokenize(truncate=True)`) and pads to `max_length` (77) with the pad token of the
tokenizer config (`<|endoftext|>` unless it says otherwise).

Files read: `vocab.json` + `merges.txt`, or `tokenizer.json` (its `model.vocab` and
`model.merges`), plus `tokenizer_config.json` / `special_tokens_map.json` when present.
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from imagen_jax import weights as weight_io
from imagen_jax.errors import UserError
from imagen_jax.text.vocab import Tokens

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # in the pattern's order


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> character table: printable Latin-1 bytes map to
  themselves, the other 68 bytes to the characters from U+0100 on, so that no byte becomes
  whitespace or a control character."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def normalize(text: str) -> str:
  """NFC, whitespace runs -> one space, lowercase (transformers' CLIP normaliser)."""
  return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


def _kind(char: str) -> str:
  """'L' letter, 'N' number, 'S' whitespace, 'P' anything else."""
  if char.isspace():
    return "S"
  major = unicodedata.category(char)[0]
  return major if major in "LN" else "P"


def split_words(text: str) -> list[str]:
  """The words of normalised text: CLIP's pattern `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|
  [\\p{N}]|[^\\s\\p{L}\\p{N}]+`, matched leftmost-first; unmatched whitespace is dropped."""
  words, i, n = [], 0, len(text)
  while i < n:
    kind = _kind(text[i])
    if kind == "S":
      i += 1
      continue
    contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
    if contraction:
      j = i + len(contraction)
    elif kind == "N":
      j = i + 1
    else:  # a run of letters, or of other non-space characters
      j = i + 1
      while j < n and _kind(text[j]) == kind:
        j += 1
    words.append(text[i:j])
    i = j
  return words


class CLIPTokenizer:
  """CLIP's byte-level BPE over a vocabulary and a merge list (see the module docstring)."""

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
               max_length: int = DEFAULT_MAX_LENGTH, pad_token: str = EOS,
               unk_token: str = EOS, bos_token: str = BOS, eos_token: str = EOS):
    self.vocab = dict(vocab)
    self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token),
                        ("unk", unk_token)):
      if token not in self.vocab:
        raise UserError(f"the CLIP vocabulary has no {name} token {token!r}; is vocab.json "
                        "a CLIP vocabulary?")
    if max_length < 2:
      raise UserError(f"CLIP tokenizer max_length={max_length} must be at least 2")
    self.max_length = int(max_length)
    self.special = (bos_token, eos_token)
    self.bos_id, self.eos_id = self.vocab[bos_token], self.vocab[eos_token]
    self.pad_id, self.unk_id = self.vocab[pad_token], self.vocab[unk_token]
    self._bytes = bytes_to_unicode()
    self._cache: dict[str, list[str]] = {}

  @classmethod
  def load(cls, path: str | os.PathLike, max_length: int | None = None) -> "CLIPTokenizer":
    """From a Hugging Face CLIP directory (see the module docstring for the files)."""
    path = epath.Path(path)
    vocab, merges = _read_vocab_and_merges(path)
    config = _special_tokens(path)
    if max_length is None:
      max_length = config.pop("model_max_length", DEFAULT_MAX_LENGTH)
      # transformers writes a huge sentinel when the length is unknown.
      max_length = max_length if max_length <= 10_000 else DEFAULT_MAX_LENGTH
    config.pop("model_max_length", None)
    return cls(vocab, merges, max_length=int(max_length), **config)

  def bpe(self, word: str) -> list[str]:
    """The BPE pieces of one word (already mapped through `bytes_to_unicode`)."""
    if word in self._cache:
      return self._cache[word]
    symbols = tuple(word[:-1]) + (word[-1] + END_OF_WORD,)
    while len(symbols) > 1:
      pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
      best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
      if best not in self.ranks:
        break
      symbols = _merge_word(symbols, best)
    self._cache[word] = list(symbols)
    return self._cache[word]

  def encode(self, text: str) -> list[int]:
    """The ids of one text, without the start and end tokens."""
    ids = []
    for segment in _split_special(normalize(text), self.special):
      if segment in self.special:
        ids.append(self.vocab[segment])
        continue
      for word in split_words(segment):
        mapped = "".join(self._bytes[b] for b in word.encode("utf-8"))
        ids.extend(self.vocab.get(piece, self.unk_id) for piece in self.bpe(mapped))
    return ids

  def __call__(self, texts: Sequence[str], max_length: int | None = None) -> Tokens:
    """ids int32 [N, max_length] (start, pieces, end, pad...), mask True up to the end
    token, and the indices of texts cut to fit."""
    if isinstance(texts, str):
      raise UserError("CLIPTokenizer takes a list of texts, not one string")
    length = self.max_length if max_length is None else int(max_length)
    ids = np.full((len(texts), length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), length), bool)
    truncated = []
    for row, text in enumerate(texts):
      pieces = self.encode(text)
      if len(pieces) > length - 2:
        truncated.append(row)
        pieces = pieces[:length - 2]
      tokens = [self.bos_id, *pieces, self.eos_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = True
    return Tokens(ids, mask, truncated)


def _split_special(text: str, special: Sequence[str]) -> list[str]:
  """`text` cut into segments around every occurrence of a special token (kept)."""
  out, start, i = [], 0, 0
  while i < len(text):
    token = next((s for s in special if text.startswith(s, i)), None)
    if token is None:
      i += 1
      continue
    out += [text[start:i], token]
    i = start = i + len(token)
  out.append(text[start:])
  return [s for s in out if s]


def _parse_merges(lines: Sequence[Any], source: str) -> list[tuple[str, str]]:
  merges = []
  for line in lines:
    if isinstance(line, str):
      if line.startswith("#version") or not line.strip():
        continue
      pair = line.split()
    else:  # tokenizer.json from tokenizers >= 0.20 writes [a, b] pairs
      pair = list(line)
    if len(pair) != 2:
      raise UserError(f"{source} has a merge {line!r} that is not two symbols")
    merges.append((pair[0], pair[1]))
  return merges


def _read_vocab_and_merges(path: epath.Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
  if (path / "vocab.json").exists() and (path / "merges.txt").exists():
    vocab = weight_io.read_json(path / "vocab.json", "CLIP's BPE vocabulary")
    merges = _parse_merges((path / "merges.txt").read_text(encoding="utf-8").splitlines(),
                           os.fspath(path / "merges.txt"))
  elif (path / "tokenizer.json").exists():
    model = weight_io.read_json(path / "tokenizer.json", "a tokenizers file").get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
      raise UserError(f"{os.fspath(path / 'tokenizer.json')} has no BPE model with vocab and "
                      "merges; is it a CLIP tokenizer?")
    vocab = model["vocab"]
    merges = _parse_merges(model["merges"], os.fspath(path / "tokenizer.json"))
  else:
    raise UserError(f"no CLIP tokenizer in {os.fspath(path)!r}: expected vocab.json + "
                    "merges.txt or tokenizer.json (copy them from the Hugging Face "
                    "checkpoint, e.g. openai/clip-vit-large-patch14)")
  if not isinstance(vocab, dict) or not vocab:
    raise UserError(f"the CLIP vocabulary in {os.fspath(path)!r} is empty or not a "
                    "token -> id object")
  return vocab, merges


def _special_tokens(path: epath.Path) -> dict[str, Any]:
  """pad/unk/bos/eos tokens and model_max_length from the tokenizer configs, if any."""
  out: dict[str, Any] = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
    if not (path / name).exists():
      continue
    config = weight_io.read_json(path / name, "a tokenizer config")
    for key in ("pad_token", "unk_token", "bos_token", "eos_token"):
      token = config.get(key)
      if isinstance(token, dict):  # {"content": "<|endoftext|>", "lstrip": false, ...}
        token = token.get("content")
      if isinstance(token, str):
        out[key] = token
    if isinstance(config.get("model_max_length"), (int, float)):
      out["model_max_length"] = int(config["model_max_length"])
  return out


def save_tokenizer(path: str | os.PathLike, vocab: Mapping[str, int],
                   merges: Sequence[tuple[str, str]], *, pad_token: str = EOS,
                   max_length: int = DEFAULT_MAX_LENGTH) -> str:
  """Writes vocab.json, merges.txt and tokenizer_config.json (Hugging Face's layout)."""
  path = epath.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "vocab.json").write_text(json.dumps(dict(vocab), ensure_ascii=False),
                                   encoding="utf-8")
  lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
  (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  config = {"tokenizer_class": "CLIPTokenizer", "bos_token": BOS, "eos_token": EOS,
            "unk_token": EOS, "pad_token": pad_token, "model_max_length": max_length}
  (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return os.fspath(path)


def byte_level_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
  """CLIP's vocabulary layout for a merge list: the 256 byte characters, the same with
  `</w>`, one entry per merge, then the start and end tokens (end-of-text has the largest
  id, as in CLIP, which the legacy argmax pooling relies on)."""
  chars = [bytes_to_unicode()[b] for b in range(256)]
  tokens = chars + [c + END_OF_WORD for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
  vocab: dict[str, int] = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  return vocab


def learn_merges(texts: Sequence[str], num_merges: int) -> list[tuple[str, str]]:
  """A small BPE merge list learned from `texts` (most frequent pair first, ties broken by
  the pair's text): for tests and the parity benchmark, which have no CLIP vocabulary."""
  table = bytes_to_unicode()
  counts: dict[tuple[str, ...], int] = {}
  for text in texts:
    for word in split_words(normalize(text)):
      mapped = "".join(table[b] for b in word.encode("utf-8"))
      key = tuple(mapped[:-1]) + (mapped[-1] + END_OF_WORD,)
      counts[key] = counts.get(key, 0) + 1
  merges = []
  for _ in range(num_merges):
    pairs: dict[tuple[str, str], int] = {}
    for word, count in counts.items():
      for pair in zip(word, word[1:]):
        pairs[pair] = pairs.get(pair, 0) + count
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    counts = {_merge_word(word, best): c for word, c in counts.items()}
  return merges


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
  out, i = [], 0
  while i < len(word):
    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
      out.append(word[i] + word[i + 1])
      i += 2
    else:
      out.append(word[i])
      i += 1
  return tuple(out)
