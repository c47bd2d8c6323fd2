"""Attention layers that condition the U-Nets on text.

- `AttentionBlock`: multi-head attention of the image tokens over their own keys and
  values (self-attention) and over the layer-normed text embeddings projected to the
  block's width (text cross-attention the way Imagen does it, appendix F.1: the text keys
  and values are concatenated to the image's; guided-diffusion's `encoder_kv`). Without
  self-attention it is pure cross-attention, one query per pixel, so a model using it
  stays fully convolutional.
- `AttentionPool`: a learned query attending over the text tokens, giving the pooled
  text vector that Imagen adds to the time embedding (§2.2 and appendix F.1).
- `TextLayer`: a trainable pre-LN transformer layer over the (projected) text tokens,
  which the U-Nets can stack on top of the frozen encoder (`text_layers`; not in Imagen).

Masked text positions get exactly zero weight, so padding never changes a result. Some
key is always present (the image's own keys, or a learned null key and value when there
is no self-attention), so a dropped caption (all-false mask) never divides by zero.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.errors import UserError
from imagen_jax.nn import layers


def num_heads_for(channels: int, head_dim: int) -> int:
  """Heads of `head_dim` channels (Imagen: 64 per head); one head for narrow layers."""
  if channels <= head_dim:
    return 1
  if channels % head_dim:
    raise UserError(f"attention over {channels} channels cannot use {head_dim} channels "
                    "per head; set head_dim to a divisor of the attention layers' widths")
  return channels // head_dim


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     num_heads: int) -> jax.Array:
  """softmax(q kᵀ / √d) v with masked keys removed. q [B,Q,C], k/v [B,K,C], mask [B,K].

  Logits and softmax are float32. Every row must have one unmasked key.
  """
  b, nq, c = q.shape
  nk = k.shape[1]
  head_dim = c // num_heads
  q = q.reshape(b, nq, num_heads, head_dim)
  k = k.reshape(b, nk, num_heads, head_dim)
  v = v.reshape(b, nk, num_heads, head_dim)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(head_dim)
  logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  # Exact zeros for masked keys (exp underflows to 0 already; this makes it explicit).
  weights = jnp.where(mask[:, None, None, :], weights, 0.0).astype(v.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  return out.reshape(b, nq, c)


class AttentionBlock(nnx.Module):
  """x + proj(attention(GN(x) -> q; keys/values from image and/or text)), NHWC."""

  def __init__(self, channels: int, *, text_dim: int | None, self_attention: bool = True,
               head_dim: int = 64, num_groups: int = 32, dtype: Any, rngs: nnx.Rngs):
    if not self_attention and not text_dim:
      raise ValueError("an AttentionBlock needs self-attention, text, or both")
    rngs = layers.local_rngs(rngs)
    self.num_heads = num_heads_for(channels, head_dim)
    self.self_attention = self_attention
    self.use_text = bool(text_dim)
    self.norm = layers.group_norm(channels, num_groups, rngs=rngs)
    self.q = layers.dense(channels, channels, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.kv = (layers.dense(channels, 2 * channels, ("embed", "heads"), dtype=dtype,
                            rngs=rngs) if self_attention else None)
    self.text_kv = (layers.dense(text_dim, 2 * channels, ("text_embed", "heads"),
                                 dtype=dtype, rngs=rngs) if text_dim else None)
    # Without image keys, a learned null key/value keeps the softmax defined when every
    # text position is masked (dropped captions).
    self.null_kv = (nnx.Param(layers.partitioned(nnx.initializers.normal(1.0),
                                                 ("kv", "heads"))(rngs.params(),
                                                                  (2, channels)))
                    if not self_attention else None)
    self.out = layers.dense(channels, channels, ("heads", "embed"), dtype=dtype, rngs=rngs,
                            zero_init=True)
    self.dtype = dtype

  def __call__(self, x: jax.Array, text: jax.Array | None,
               text_mask: jax.Array | None) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.norm(x).astype(self.dtype).reshape(b, h * w, c)
    q = self.q(tokens)
    keys, values, masks = [], [], []
    if self.kv is not None:
      k, v = jnp.split(self.kv(tokens), 2, axis=-1)
      keys.append(k), values.append(v), masks.append(jnp.ones((b, h * w), bool))
    if self.null_kv is not None:
      null = jnp.broadcast_to(self.null_kv[...].astype(self.dtype)[:, None, None, :],
                              (2, b, 1, c))
      keys.append(null[0]), values.append(null[1]), masks.append(jnp.ones((b, 1), bool))
    if self.text_kv is not None:
      k, v = jnp.split(self.text_kv(text), 2, axis=-1)
      keys.append(k), values.append(v), masks.append(text_mask)
    out = masked_attention(q, jnp.concatenate(keys, 1), jnp.concatenate(values, 1),
                           jnp.concatenate(masks, 1), self.num_heads)
    return x + self.out(out).reshape(b, h, w, c)


class AttentionPool(nnx.Module):
  """Attention pooling of text tokens [B,L,D] -> [B, out_dim] (Imagen §2.2, appendix F.1).

  One learned query attends over a learned null token and the unmasked text tokens; an
  all-false mask (dropped caption) attends to the null token alone.
  """

  def __init__(self, text_dim: int, out_dim: int, *, head_dim: int = 64, dtype: Any,
               rngs: nnx.Rngs):
    rngs = layers.local_rngs(rngs)
    self.num_heads = num_heads_for(out_dim, head_dim)
    self.kv = layers.dense(text_dim, 2 * out_dim, ("text_embed", "heads"), dtype=dtype,
                           rngs=rngs)
    init = nnx.initializers.normal(1.0)
    self.query = nnx.Param(layers.partitioned(init, ("heads",))(rngs.params(), (out_dim,)))
    self.null_kv = nnx.Param(layers.partitioned(init, ("kv", "heads"))(rngs.params(),
                                                                       (2, out_dim)))
    self.out = layers.dense(out_dim, out_dim, ("heads", "embed"), dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, text: jax.Array, text_mask: jax.Array) -> jax.Array:
    b = text.shape[0]
    k, v = jnp.split(self.kv(text), 2, axis=-1)
    null = self.null_kv[...].astype(self.dtype)
    k = jnp.concatenate([jnp.broadcast_to(null[0], (b, 1, null.shape[-1])), k], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(null[1], (b, 1, null.shape[-1])), v], axis=1)
    mask = jnp.concatenate([jnp.ones((b, 1), bool), text_mask], axis=1)
    q = jnp.broadcast_to(self.query[...].astype(self.dtype), (b, 1, null.shape[-1]))
    pooled = masked_attention(q, k, v, mask, self.num_heads)[:, 0]
    return self.out(pooled)


class TextLayer(nnx.Module):
  """A pre-LN transformer layer over text tokens [B,L,C]: x + attn(LN x), then x + MLP(LN x).

  Not in Imagen, whose frozen T5-XXL already relates the words of a caption. A frozen
  encoder that does not (a small or random one) leaves the U-Net to bind words per token:
  "red" must become "the object above" from "above" two tokens later, and attention over
  independent tokens cannot compute that. A few trainable layers on the U-Net side can.
  Padding positions are masked out as keys, so they never change a real token.
  """

  def __init__(self, channels: int, *, head_dim: int = 64, mlp_mult: int = 4, dtype: Any,
               rngs: nnx.Rngs):
    rngs = layers.local_rngs(rngs)
    self.num_heads = num_heads_for(channels, head_dim)
    self.attn_norm = layers.layer_norm(channels, rngs=rngs)
    self.qkv = layers.dense(channels, 3 * channels, ("embed", "heads"), dtype=dtype,
                            rngs=rngs)
    self.attn_out = layers.dense(channels, channels, ("heads", "embed"), dtype=dtype,
                                 rngs=rngs, zero_init=True)
    self.mlp_norm = layers.layer_norm(channels, rngs=rngs)
    self.mlp_in = layers.dense(channels, mlp_mult * channels, ("embed", "mlp"), dtype=dtype,
                               rngs=rngs)
    self.mlp_out = layers.dense(mlp_mult * channels, channels, ("mlp", "embed"),
                                dtype=dtype, rngs=rngs, zero_init=True)
    self.dtype = dtype

  def __call__(self, text: jax.Array, text_mask: jax.Array) -> jax.Array:
    # An all-false row (dropped caption) gets zero attention weights everywhere: no NaN,
    # and every one of its positions is masked downstream anyway.
    q, k, v = jnp.split(self.qkv(self.attn_norm(text).astype(self.dtype)), 3, axis=-1)
    text = text + self.attn_out(masked_attention(q, k, v, text_mask, self.num_heads))
    hidden = jax.nn.gelu(self.mlp_in(self.mlp_norm(text).astype(self.dtype)))
    return text + self.mlp_out(hidden)
