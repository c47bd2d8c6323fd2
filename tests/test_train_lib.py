"""Shared helpers of the training tests (a tiny model, synthetic data, a word-level cache),
with tests of the helpers themselves so that a broken helper cannot pass silently."""

import hashlib
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from imagen_jax.nn import layers

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


class TinyNet(nnx.Module):
  """A throwaway two-conv model with the model contract's call signature and attributes
  (image_size, lowres_size, text_dim, channels); parameters carry logical axis names."""

  def __init__(self, *, rngs, image_size=8, text_dim=8, channels=3, width=16,
               lowres_size=None, dropout=0.0):
    self.image_size, self.text_dim = image_size, text_dim
    self.channels, self.lowres_size = channels, lowres_size
    conv_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), CONV_AXES)
    cin = channels * (2 if lowres_size else 1)
    self.conv1 = nnx.Conv(cin, width, (3, 3), kernel_init=conv_init, rngs=rngs)
    self.text = nnx.Linear(text_dim, width, rngs=rngs, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("text_embed", "embed")))
    self.time = nnx.Linear(2, width, rngs=rngs)
    self.conv2 = nnx.Conv(width, channels, (3, 3), kernel_init=conv_init, rngs=rngs)
    self.dropout = dropout

  def __call__(self, x_t, log_snr, text_emb, text_mask, *, lowres=None, lowres_log_snr=None,
               train=False, dropout_rng=None):
    if lowres is not None:
      lowres = jax.image.resize(lowres, x_t.shape, "bicubic")
      x_t = jnp.concatenate([x_t, lowres], -1)
    aug = jnp.zeros_like(log_snr) if lowres_log_snr is None else lowres_log_snr
    m = text_mask[..., None].astype(jnp.float32)
    t = (text_emb.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    emb = self.text(t) + self.time(jnp.stack([log_snr, aug], -1) / 10.0)
    h = jax.nn.silu(self.conv1(x_t) + emb[:, None, None])
    h = layers.dropout(h, self.dropout, train=train, rng=dropout_rng)  # the U-Nets' dropout
    return self.conv2(h)


class FakePipeline:
  """Index-addressable synthetic batches: example i is a flat colour with a text embedding
  that encodes it, a pure function of i (like data.Pipeline). Optional per-step delay (for
  kill tests), NaN text embeddings at given steps, and a callback per step."""

  def __init__(self, batch_size, image_size=8, text_dim=8, length=4, lowres_size=None,
               delay=0.0, nan_steps=(), on_step=None):
    self.b, self.s, self.d, self.l, self.lo = batch_size, image_size, text_dim, length, lowres_size
    self.delay, self.nan_steps, self.on_step = delay, set(nan_steps), on_step

  def host_batch(self, step):
    if self.on_step is not None:
      self.on_step(step)
    if self.delay:
      time.sleep(self.delay)
    idx = np.arange(step * self.b, (step + 1) * self.b, dtype=np.int64)
    colours = np.stack([np.random.default_rng(int(i) % 97).integers(0, 256, 3) for i in idx])
    img = np.broadcast_to(colours[:, None, None, :], (self.b, self.s, self.s, 3)).astype(np.uint8)
    emb = np.zeros((self.b, self.l, self.d), np.float32)
    emb[:, :, :3] = colours[:, None, :] / 127.5 - 1.0
    if step in self.nan_steps:
      emb[:] = np.nan
    out = {"image": np.ascontiguousarray(img), "text_emb": emb.astype(ml_dtypes.bfloat16),
           "text_mask": np.ones((self.b, self.l), bool), "index": idx}
    if self.lo:
      out["lowres"] = out["image"][:, ::self.s // self.lo, ::self.s // self.lo]
    return out


class WordCache:
  """An embedding 'cache' for the shapes captions without T5: each word is a fixed random
  vector (from the sha256 of the word), so captions with different words differ."""

  def __init__(self, d_model=16, max_length=12):
    self.manifest = {"d_model": d_model, "max_length": max_length, "encoder": {"name": "words"}}
    self.d = d_model

  def _word(self, w):
    seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(self.d).astype(np.float32)

  def get_batch(self, captions, max_length):
    emb = np.zeros((len(captions), max_length, self.d), np.float32)
    mask = np.zeros((len(captions), max_length), bool)
    for i, c in enumerate(captions):
      words = c.split()[:max_length]
      for j, w in enumerate(words):
        emb[i, j] = self._word(w)
      mask[i, :len(words)] = True
    return emb.astype(ml_dtypes.bfloat16), mask


class WordEncoder(WordCache):
  """The same word vectors as a text encoder for `text.cache.build_cache` (a real on-disk
  cache in tests, without T5)."""

  batch_size = 64

  @property
  def identity(self):
    return {"name": "words", "d_model": self.d, "max_length": self.manifest["max_length"],
            "vocab_sha256": "none", "weights_sha256": "none"}

  def encode_with_info(self, captions):
    emb, mask = self.get_batch(captions, self.manifest["max_length"])
    return emb.astype(np.float32), mask, []


def tiny_create(**kw):
  def create(*, rngs):
    return TinyNet(rngs=rngs, **kw)
  return create


def params_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_fake_pipeline_is_a_function_of_the_index():
  p = FakePipeline(4)
  a, b = p.host_batch(3), FakePipeline(4).host_batch(3)
  assert all(np.array_equal(a[k].astype(np.float32) if a[k].dtype == ml_dtypes.bfloat16
                            else a[k], b[k].astype(np.float32)
                            if b[k].dtype == ml_dtypes.bfloat16 else b[k]) for k in a)
  assert list(a["index"]) == [12, 13, 14, 15]
  assert not np.array_equal(p.host_batch(0)["image"], a["image"])


def test_word_cache_distinguishes_captions():
  c = WordCache(d_model=8, max_length=6)
  emb, mask = c.get_batch(["a red circle", "a blue circle"], 6)
  assert emb.shape == (2, 6, 8) and mask.sum(1).tolist() == [3, 3]
  e = emb.astype(np.float32)
  assert np.array_equal(e[0, 0], e[1, 0]) and not np.array_equal(e[0, 1], e[1, 1])
  assert not e[:, 3:].any()
