"""The quickstart's text assets: a sentencepiece model of the shapes captions and a small
T5 encoder, random and then grounded on the shapes training split (`grounding.pretrain`;
no pretrained T5 can be downloaded here). Its weights are then fixed: the quickstart
caches its embeddings like any T5's.

    python -m imagen_jax.quickstart.text_assets --out=runs/quickstart/t5
    # -> runs/quickstart/t5/{config.json, model.safetensors, spiece.model, grounding.json},
    #    a directory that TextEncoder.load / imagen-embed / imagen-sample read like a real
    #    T5 checkpoint

Deterministic: the same flags give byte-identical files.

- The tokenizer is a 96-piece BPE model (`model_type="bpe"`) with T5's ids (pad 0, EOS 1,
  unk 2, no BOS): every word of the grammar is one piece, which gives the U-Net's
  cross-attention one token per word and keeps sequences short, and a word outside the
  grammar is spelled with single characters. (A unigram model spells the colour words
  letter by letter on this small, repetitive corpus.)
- The encoder's random relative position bias has std `position_bias_std` (1.0) instead of
  T5's initial d_model ** -0.5, so that each head attends by relative position, as a
  trained T5's heads do, and the embeddings keep the word order.
- `grounding_steps` (1,000, about a minute) then trains the encoder to predict a coarse
  image of each caption, which puts each object's role into its tokens; 0 keeps the
  random weights.

Why each choice, and what it measured: docs/quickstart.md, "The text encoder" and "Word
order".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from etils import epath

from imagen_jax import files
from imagen_jax.data import shapes
from imagen_jax.errors import UserError
from imagen_jax.quickstart import grounding
from imagen_jax.text import t5, vocab

DEFAULT_VOCAB_SIZE = 96
# A two-object caption is 10 pieces + EOS; 16 leaves room for prompts a little outside
# the grammar while keeping text attention short.
DEFAULT_MAX_LENGTH = 16
DEFAULT_POSITION_BIAS_STD = 1.0
# About a minute on 2 CPU cores, and past the point where the head orders every probed
# caption (docs/quickstart.md).
DEFAULT_GROUNDING_STEPS = 1000


def shapes_corpus() -> list[str]:
  """The training split's captions: the held-out split uses the same words, so the
  tokenizer needs nothing from it (and never sees a held-out combination)."""
  return shapes.all_captions("train")


def toy_t5_config(*, d_model: int = 64, num_layers: int = 2, num_heads: int = 4,
                  d_ff: int | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE):
  """A T5 v1.1-style (gated-GELU) encoder config of the given size."""
  if d_model % num_heads:
    raise UserError(f"d_model={d_model} must be a multiple of num_heads={num_heads}")
  return t5.T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads,
                     d_ff=d_ff or 2 * d_model, num_layers=num_layers, num_heads=num_heads,
                     feed_forward_proj="gated-gelu")


def make_toy_text_assets(out: str | os.PathLike, *, d_model: int = 64, num_layers: int = 2,
                         num_heads: int = 4, d_ff: int | None = None,
                         vocab_size: int = DEFAULT_VOCAB_SIZE,
                         position_bias_std: float = DEFAULT_POSITION_BIAS_STD,
                         grounding_steps: int = DEFAULT_GROUNDING_STEPS, seed: int = 0,
                         progress: bool = False) -> str:
  """Writes `out/{config.json, model.safetensors, spiece.model}`; returns `out`.

  With `grounding_steps` > 0 the random encoder is then pretrained that many steps by
  `grounding.pretrain`, and `out/grounding.json` records how (settings, loss, order
  accuracy); with 0 the encoder keeps its random weights.
  """
  if grounding_steps < 0:
    raise UserError(f"grounding_steps={grounding_steps} is negative; use 0 (keep the random "
                    f"weights) or more (the quickstart uses {DEFAULT_GROUNDING_STEPS})")
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  sp_path = vocab.train_sentencepiece(shapes_corpus(), out / "spiece.model", vocab_size,
                                      model_type="bpe")
  processor = vocab.load_vocabulary(sp_path).tokenizer  # checks the T5 ids
  pieces = processor.get_piece_size()
  config = toy_t5_config(d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                         d_ff=d_ff, vocab_size=pieces)
  encoder = t5.random_encoder(config, seed=seed, position_bias_std=position_bias_std)
  report_path = out / "grounding.json"
  if report_path.exists():
    report_path.unlink()  # never leave a report that describes other weights
  report = None
  if grounding_steps:
    report = grounding.pretrain(encoder, vocab.load_vocabulary(sp_path),
                                steps=grounding_steps, max_length=DEFAULT_MAX_LENGTH,
                                seed=seed, progress=progress)
  t5.save_encoder(out, encoder)  # spiece.model is already in place
  if report is not None:
    fields = dataclasses.asdict(report)
    fields.pop("seconds")  # keeps the directory byte-identical from run to run
    files.write_atomic(report_path, json.dumps(fields, indent=2) + "\n")
    if progress:
      print(report.summary())
  return os.fspath(out)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m imagen_jax.quickstart.text_assets",
      description="Writes the quickstart's sentencepiece model and random T5 encoder.")
  parser.add_argument("--out", required=True, help="output directory (HF T5 layout)")
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--num_heads", type=int, default=4)
  parser.add_argument("--d_ff", type=int, default=None, help="default 2 * d_model")
  parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
  parser.add_argument("--position_bias_std", type=float, default=DEFAULT_POSITION_BIAS_STD,
                      help="scale of the random relative position bias (T5's init: "
                      "d_model ** -0.5)")
  parser.add_argument("--grounding_steps", type=int, default=DEFAULT_GROUNDING_STEPS,
                      help="steps of grounding pretraining on the shapes training split "
                      "(imagen_jax.quickstart.grounding); 0 keeps the random weights")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    out = make_toy_text_assets(args.out, d_model=args.d_model, num_layers=args.num_layers,
                               num_heads=args.num_heads, d_ff=args.d_ff,
                               vocab_size=args.vocab_size,
                               position_bias_std=args.position_bias_std,
                               grounding_steps=args.grounding_steps, seed=args.seed,
                               progress=True)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  kind = (f"grounded for {args.grounding_steps} steps" if args.grounding_steps
          else "random")
  print(f"wrote a small T5 (d_model={args.d_model}, {args.num_layers} layers, {kind}) and "
        f"its sentencepiece model to {out}")


if __name__ == "__main__":
  main()
