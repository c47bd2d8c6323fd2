"""Building blocks of the U-Nets: partitioned layers, the noise-level embedding and the
BigGAN-style residual block of Dhariwal & Nichol 2021 ("ADM", guided-diffusion's
`ResBlock` with `use_scale_shift_norm` and `resblock_updown`).

Every parameter is float32 and carries logical axis names (see
`imagen_jax.parallel.rules`). `dtype` is the compute dtype (float32 or bfloat16); group
norms and softmaxes compute in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.errors import UserError
from imagen_jax.parallel import rules

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
DEFAULT_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")

# The time input is the log-SNR λ (DESIGN.md §4), which lives in about [-20, 20] for the
# cosine and linear schedules. The sinusoidal features (Vaswani et al. 2017; DDPM's
# `timestep_embedding`, max period 10000) were designed for integer timesteps 0..1000, so
# λ is scaled by 25 to span the same 1000 units, and clipped first so that a ±inf
# (clean or pure-noise endpoints) stays finite.
LOG_SNR_SCALE = 25.0
LOG_SNR_CLIP = 40.0


def partitioned(init: Any, names: Sequence[str | None]) -> Any:
  """An initializer whose Variable carries logical axis `names`.

  Eager sharding is off: the names are resolved only through the rules
  (`parallel.state_shardings`), so a model can be built with or without a mesh.
  """
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


class KeyStream:
  """Parameter keys for one block: `fold_in(key, i)` for i = 1, 2, ...

  It stands in for `nnx.Rngs` when building layers (Flax layers only call
  `rngs.params()` at construction). Why not pass the model's `nnx.Rngs` down: under
  `nnx.eval_shape` every draw from an `nnx.Rngs` makes Flax inspect its traced counter at
  a cost that grows with everything traced so far, so building a 2B model's abstract
  shapes became quadratic in its layer count (minutes). Same determinism, no counter.
  """

  def __init__(self, key: jax.Array):
    self._key = key
    self._count = 0

  def params(self) -> jax.Array:
    self._count += 1
    return jax.random.fold_in(self._key, self._count)

  __call__ = params


def local_rngs(rngs: "nnx.Rngs | KeyStream") -> KeyStream:
  """A KeyStream for one block, keyed by one draw from `rngs`."""
  return KeyStream(rngs.params())


def conv(in_ch: int, out_ch: int, kernel: int = 3, *, strides: int = 1, dtype: Any,
         rngs: nnx.Rngs, zero_init: bool = False) -> nnx.Conv:
  """A 'SAME'-padded 2D convolution over NHWC images."""
  kernel_init = nnx.initializers.zeros_init() if zero_init else DEFAULT_INIT
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=strides, padding="SAME",
                  dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=partitioned(kernel_init, CONV_AXES),
                  bias_init=partitioned(nnx.initializers.zeros_init(), ("conv_out",)),
                  rngs=rngs)


def dense(in_features: int, out_features: int, names: tuple[str, str], *, dtype: Any,
          rngs: nnx.Rngs, zero_init: bool = False) -> nnx.Linear:
  """A Linear layer whose kernel has logical axes `names` (its bias takes `names[1]`)."""
  kernel_init = nnx.initializers.zeros_init() if zero_init else DEFAULT_INIT
  return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=partitioned(kernel_init, names),
                    bias_init=partitioned(nnx.initializers.zeros_init(), (names[1],)),
                    rngs=rngs)


def check_groups(channels: int, num_groups: int) -> None:
  if channels % num_groups:
    raise UserError(f"GroupNorm with {num_groups} groups cannot split {channels} channels; "
                    "set num_groups to a divisor of every channel count (model_channels "
                    "times each channel_mult)")


def group_norm(channels: int, num_groups: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm computed in float32 (guided-diffusion's GroupNorm32)."""
  check_groups(channels, num_groups)
  return nnx.GroupNorm(channels, num_groups=num_groups, epsilon=1e-5, dtype=jnp.float32,
                       param_dtype=jnp.float32,
                       scale_init=partitioned(nnx.initializers.ones_init(), ("norm",)),
                       bias_init=partitioned(nnx.initializers.zeros_init(), ("norm",)),
                       rngs=rngs)


def layer_norm(features: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                       scale_init=partitioned(nnx.initializers.ones_init(), ("norm",)),
                       bias_init=partitioned(nnx.initializers.zeros_init(), ("norm",)),
                       rngs=rngs)


def coordinates(shape: tuple[int, int, int], dtype: Any) -> jax.Array:
  """[B, H, W, 2]: each pixel's (y, x) centre in [-1, 1] (CoordConv, Liu et al. 2018).

  Convolutions are translation-equivariant and attention without positions is
  permutation-invariant, so neither knows where "the top half" is except from the
  padding at the borders; "a red circle above a blue square" needs exactly that.
  """
  b, h, w = shape
  ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) * (2.0 / h) - 1.0
  xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) * (2.0 / w) - 1.0
  grid = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1)
  return jnp.broadcast_to(grid, (b, h, w, 2)).astype(dtype)


def sinusoidal_embedding(x: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """[B] -> [B, dim] sinusoidal features (DDPM's `timestep_embedding`), in float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def scaled_log_snr(log_snr: jax.Array) -> jax.Array:
  """The log-SNR as the sinusoidal embedding sees it: clipped to ±40, times 25."""
  return jnp.clip(log_snr.astype(jnp.float32), -LOG_SNR_CLIP, LOG_SNR_CLIP) * LOG_SNR_SCALE


class NoiseLevelEmbedding(nnx.Module):
  """log-SNR [B] -> sinusoidal features of the scaled log-SNR -> MLP -> [B, emb_dim]."""

  def __init__(self, features: int, emb_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    rngs = local_rngs(rngs)
    self.features = features
    self.dense1 = dense(features, emb_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.dense2 = dense(emb_dim, emb_dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, log_snr: jax.Array) -> jax.Array:
    h = sinusoidal_embedding(scaled_log_snr(log_snr), self.features)
    return self.dense2(jax.nn.silu(self.dense1(h)))


def downsample(x: jax.Array) -> jax.Array:
  """2x2 average pooling (guided-diffusion's Downsample without a conv)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample(x: jax.Array) -> jax.Array:
  """2x nearest-neighbour upsampling."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def dropout(x: jax.Array, rate: float, *, train: bool, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout with an explicit key (no RNG state in the model, so the model's
  call is a pure function and rematerialisation recomputes the same mask)."""
  if not train or rate == 0.0:
    return x
  if rng is None:
    raise UserError(f"dropout {rate} is on (train=True) but no dropout_rng was given; "
                    "pass dropout_rng=<a jax.random key> to the model")
  shard = rules.batch_shard()
  if shard is None:
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  else:  # one shard of the batch: the whole batch's mask, so masks do not depend on the split
    count, index = shard
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0] * count, *x.shape[1:]))
    keep = jax.lax.dynamic_slice_in_dim(keep, index * x.shape[0], x.shape[0])
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class ResBlock(nnx.Module):
  """BigGAN-style residual block with scale-shift norm (Dhariwal & Nichol 2021, §3;
  Brock et al. 2019, figure 15):

    h = conv(resample(silu(GN(x))))
    h = conv(dropout(silu(GN(h) * (1 + scale) + shift)))      # (scale, shift) = W emb
    out = shortcut(resample(x)) + h

  `resample` is 'up', 'down' or None: up/down-sampling happens inside the block, as in
  BigGAN. The last conv is zero-initialised, so every block starts as the identity.
  """

  def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, num_groups: int,
               dropout: float = 0.0, resample: str | None = None, dtype: Any,
               rngs: nnx.Rngs):
    if resample not in (None, "up", "down"):
      raise ValueError(f"resample must be 'up', 'down' or None, got {resample!r}")
    rngs = local_rngs(rngs)
    self.resample = resample
    self.dtype = dtype
    self.norm1 = group_norm(in_ch, num_groups, rngs=rngs)
    self.conv1 = conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)
    self.emb_proj = dense(emb_dim, 2 * out_ch, ("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.norm2 = group_norm(out_ch, num_groups, rngs=rngs)
    self.dropout = dropout
    self.conv2 = conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs, zero_init=True)
    self.shortcut = (conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs)
                     if in_ch != out_ch else None)

  def _resample(self, x: jax.Array) -> jax.Array:
    if self.resample == "up":
      return upsample(x)
    if self.resample == "down":
      return downsample(x)
    return x

  def __call__(self, x: jax.Array, emb: jax.Array, *, train: bool = False,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    h = jax.nn.silu(self.norm1(x)).astype(self.dtype)
    h = self.conv1(self._resample(h))
    x = self._resample(x)
    scale, shift = jnp.split(self.emb_proj(jax.nn.silu(emb))[:, None, None, :], 2, axis=-1)
    h = self.norm2(h) * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
    h = dropout(jax.nn.silu(h).astype(self.dtype), self.dropout, train=train,
                rng=dropout_rng)
    h = self.conv2(h)
    if self.shortcut is not None:
      x = self.shortcut(x)
    return x.astype(self.dtype) + h
