"""imagen_jax.text: the frozen T5 text encoder, its tokenizer and the embedding cache.

- `t5`: Flax NNX T5 encoder (v1.0 and v1.1) and Hugging Face checkpoint loading.
- `vocab`: seqio sentencepiece vocabularies, T5 tokenization, sentencepiece training.
- `encode`: `TextEncoder` (tokenizer + jitted, sharded T5) and the gin factory
  `text_encoder()`.
- `cache`: the embedding cache written by `imagen-embed` and read by training/sampling.

Importing this package registers `text_encoder` with gin; tensorflow (through seqio) is
imported only when a vocabulary is loaded.
"""

from imagen_jax.text import cache
from imagen_jax.text import encode
from imagen_jax.text import t5
from imagen_jax.text import vocab
from imagen_jax.text.encode import TextEncoder, text_encoder

__all__ = ["cache", "encode", "t5", "vocab", "TextEncoder", "text_encoder"]
