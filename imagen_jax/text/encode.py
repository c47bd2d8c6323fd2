"""TextEncoder: captions -> T5 embeddings, in fixed-size batches sharded over all devices.

  enc = TextEncoder.load("ckpt/t5-v1_1-xxl", dtype=jnp.bfloat16, batch_size=256)
  emb, mask = enc.encode(["a red circle", ...])    # float32 [N, 128, 4096], bool [N, 128]

Every batch has the same shape (the last one is padded with empty rows), so the jitted
encoder compiles once. With several processes (a pod), every process passes the same
captions and gets all the embeddings back. The batch axis is split over the mesh's ('data', 'fsdp') axes; the
weights are placed by their logical axis names (`imagen_jax.parallel.rules`), so a mesh
with `fsdp` or `tensor` axes shards T5-XXL instead of replicating it.

`identity` names the encoder (T5 weights, vocabulary, max length, d_model); the embedding
cache and checkpoints record it, and compare it on use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from imagen_jax.dtypes import as_dtype
from imagen_jax.errors import UserError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import rules
from imagen_jax.text import t5
from imagen_jax.text import vocab as vocab_lib

def _to_global(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array from a host array that every process holds whole (the weights, and
  the same batch of captions on every process); each process fills its own devices."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


class TextEncoder:
  """A sentencepiece tokenizer plus a frozen T5 encoder, jitted over padded batches."""

  def __init__(self, encoder: t5.Encoder, vocabulary, *, vocab_sha256: str,
               max_length: int = vocab_lib.DEFAULT_MAX_LENGTH, batch_size: int = 64,
               mesh: jax.sharding.Mesh | str | None = None,
               devices: Sequence[jax.Device] | None = None):
    if batch_size < 1:
      raise UserError(f"text encoder batch_size={batch_size} must be positive")
    if vocabulary.vocab_size > encoder.config.vocab_size:
      raise UserError(
          f"the sentencepiece vocabulary has {vocabulary.vocab_size} ids but the T5 "
          f"embedding table only {encoder.config.vocab_size}; use the checkpoint's own "
          "spiece.model (text_encoder.vocab_path)")
    self.encoder = encoder
    self.vocabulary = vocabulary
    self.vocab_sha256 = vocab_sha256
    self.max_length = int(max_length)
    if not isinstance(mesh, jax.sharding.Mesh):
      mesh = mesh_lib.make_mesh(mesh, devices=devices)
    self.mesh = mesh
    # Round up so the batch splits evenly over the data-parallel devices.
    ways = mesh_lib.data_parallel_size(mesh)
    self.batch_size = -(-int(batch_size) // ways) * ways
    param_shardings = rules.state_shardings(encoder.state, mesh)
    self._state = jax.tree.map(_to_global, encoder.state, param_shardings)
    self._batch_sharding = mesh_lib.batch_sharding(mesh, 2)
    self._encode = jax.jit(
        encoder.apply,
        in_shardings=(param_shardings, self._batch_sharding, self._batch_sharding),
        out_shardings=mesh_lib.batch_sharding(mesh, 3))

  @classmethod
  def load(cls, t5_path: str | os.PathLike, *, vocab_path: str | os.PathLike | None = None,
           max_length: int = vocab_lib.DEFAULT_MAX_LENGTH, dtype=jnp.float32,
           batch_size: int = 64, mesh=None, devices=None) -> "TextEncoder":
    """Loads `t5_path` (HF layout) and its vocabulary (default `t5_path/spiece.model`).
    `mesh` (a spec) spans `devices`, default all devices of all processes."""
    if vocab_path is None:
      vocab_path = epath.Path(t5_path) / "spiece.model"
      if epath.Path(t5_path).is_dir() and not vocab_path.exists():
        raise UserError(f"{os.fspath(t5_path)!r} has no spiece.model; set "
                        "text_encoder.vocab_path to the checkpoint's sentencepiece model")
    vocab_path = epath.Path(vocab_path)
    vocabulary = vocab_lib.load_vocabulary(vocab_path)
    encoder = t5.load_encoder(t5_path, as_dtype(dtype, "text encoder dtype"))
    return cls(encoder, vocabulary, vocab_sha256=vocab_lib.vocabulary_sha256(vocab_path),
               max_length=max_length, batch_size=batch_size, mesh=mesh, devices=devices)

  @property
  def d_model(self) -> int:
    return self.encoder.config.d_model

  @property
  def identity(self) -> dict:
    """What makes two encoders produce the same embeddings (dtype aside)."""
    return {"name": self.encoder.name, "d_model": self.d_model,
            "max_length": self.max_length, "vocab_sha256": self.vocab_sha256,
            "weights_sha256": self.encoder.weights_sha256}

  def tokenize(self, captions: Sequence[str]) -> vocab_lib.Tokens:
    return vocab_lib.tokenize(self.vocabulary, captions, self.max_length)

  def encode_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Encodes token batches of any size N; returns float32 [N, L, D] on the host."""
    n = ids.shape[0]
    out = np.zeros((n, ids.shape[1], self.d_model), np.float32)
    for start in range(0, n, self.batch_size):
      stop = min(start + self.batch_size, n)
      batch_ids = np.zeros((self.batch_size, ids.shape[1]), np.int32)
      batch_mask = np.zeros((self.batch_size, ids.shape[1]), bool)
      batch_ids[:stop - start] = ids[start:stop]
      batch_mask[:stop - start] = mask[start:stop]
      emb = self._encode(self._state, _to_global(batch_ids, self._batch_sharding),
                         _to_global(batch_mask, self._batch_sharding))
      if not emb.is_fully_addressable:  # several processes: each holds some rows
        emb = multihost_utils.process_allgather(emb, tiled=True)
      out[start:stop] = np.asarray(emb)[:stop - start]
    return out

  def encode_with_info(self, captions: Sequence[str]
                       ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(emb float32 [N, L, D], mask bool [N, L], indices of truncated captions)."""
    tokens = self.tokenize(captions)
    emb = self.encode_tokens(tokens.ids, tokens.mask)
    # Zero the padding positions: they carry no meaning, and zeros compress and compare.
    emb *= tokens.mask[..., None]
    return emb, tokens.mask, tokens.truncated

  def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(emb float32 [N, max_length, d_model], mask bool [N, max_length]); warns once per
    call if captions were cut to max_length."""
    emb, mask, truncated = self.encode_with_info(captions)
    if truncated:
      logging.warning("%d caption(s) longer than %d tokens were truncated, e.g. %r",
                      len(truncated), self.max_length, captions[truncated[0]][:80])
    return emb, mask


@gin.configurable
def text_encoder(t5_path: str | None = None, vocab_path: str | None = None,
                 max_length: int = vocab_lib.DEFAULT_MAX_LENGTH, dtype: str = "float32",
                 batch_size: int = 64, mesh: str | None = None, *,
                 devices: Sequence[jax.Device] | None = None) -> TextEncoder:
  """The configured TextEncoder (gin: `text_encoder.t5_path = '...'` etc.).

  `mesh` is a mesh spec such as "data:-1" (default) or "fsdp:8,tensor:4" for T5-XXL, over
  `devices` (a caller's choice, not gin's; default all devices of all processes).
  """
  if t5_path is None:
    raise UserError("no T5 checkpoint configured: set the gin macro T5_PATH (or "
                    "text_encoder.t5_path), e.g. --gin.T5_PATH=\"'path/to/t5-v1_1-xxl'\" (a "
                    "Hugging Face directory with config.json, model.safetensors and "
                    "spiece.model)")
  return TextEncoder.load(t5_path, vocab_path=vocab_path, max_length=max_length,
                          dtype=as_dtype(dtype, "text encoder dtype"), batch_size=batch_size,
                          mesh=mesh, devices=devices)
