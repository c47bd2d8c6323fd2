"""The noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, "Diffusion
Models Beat GANs", section 4 and appendix: the "downsampling trunk of the UNet model with an
attention pool at the 8x8 layer to produce the final output").

`NoisyClassifier` is the encoder half of `nn.unet.UNet`: the same input convolution, the
same down path and middle (`unet.encoder_path`, the same blocks), conditioned on the noise
level exactly as the U-Net is (the log-SNR embedding `layers.NoiseLevelEmbedding` feeds
every residual block's scale-shift norm). It has no text input: its attention layers are
self-attention only. The lowest-resolution features are normalised (GroupNorm, SiLU), then
attention-pooled (`attention.AttentionPool`: one learned query over the spatial tokens and a
learned null token, as ADM's `AttentionPool2d`) into one vector, and a linear layer gives
the logits.

    model(x_t, log_snr, *, train=False, dropout_rng=None) -> logits [B, num_classes], f32

Trained by `imagen-train` with `LossConfig.task = 'classifier'` (train/step.py) on noised
images at random log-SNR; at sampling, `diffusion.classifier_guidance` takes the gradient of
log_softmax(logits)[y] with respect to x_t.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.dtypes import as_dtype
from imagen_jax.errors import UserError
from imagen_jax.nn import layers
from imagen_jax.nn.attention import AttentionBlock, AttentionPool
from imagen_jax.nn.unet import (IMAGE_AXES, block_rngs, encoder_path, level_divisor,
                                run_block)
from imagen_jax.parallel.rules import constrain


@gin.configurable
class NoisyClassifier(nnx.Module):
  """ADM's noise-aware classifier: the base U-Net's encoder half with an attention pool.

  Args mirror `UNet`'s (a classifier built with the U-Net's settings has exactly its down
  path and middle); `num_classes` logits; `labels` names the data's label function
  (`train.step.LABELS`, e.g. "shapes_object": the 18 colour-shape objects of one-object
  shapes captions), recorded in model.json so that sampling parses prompts the same way.
  """

  def __init__(self, *, image_size: int = 64, channels: int = 3, num_classes: int = 18,
               labels: str = "shapes_object", model_channels: int = 128,
               channel_mult: Sequence[int] = (1, 2, 3, 4), num_res_blocks: int = 2,
               attention_resolutions: Sequence[int] = (16, 8), head_dim: int = 64,
               dropout: float = 0.0, num_groups: int = 32, emb_mult: int = 4,
               dtype: Any = "float32", remat: bool = False, rngs: nnx.Rngs):
    rngs = layers.local_rngs(rngs)
    if num_classes < 2:
      raise UserError(f"NoisyClassifier num_classes={num_classes} must be >= 2")
    self.image_size, self.channels = image_size, channels
    self.num_classes, self.labels = num_classes, labels
    self.text_dim = 0          # no text input (model.json records 0)
    self.lowres_size = None
    self.dtype = as_dtype(dtype)
    self.remat, self.dropout_rate = remat, dropout
    self.divisor = level_divisor("NoisyClassifier", image_size, channel_mult)
    dt = self.dtype
    emb_dim = emb_mult * model_channels
    self.time_embed = layers.NoiseLevelEmbedding(model_channels, emb_dim, dtype=dt,
                                                 rngs=rngs)

    def res(cin, cout, resample=None):
      return layers.ResBlock(cin, cout, emb_dim, num_groups=num_groups, dropout=dropout,
                             resample=resample, dtype=dt, rngs=rngs)

    def self_attention(ch):
      return AttentionBlock(ch, text_dim=None, self_attention=True, head_dim=head_dim,
                            num_groups=num_groups, dtype=dt, rngs=rngs)

    self.input_conv = layers.conv(channels, model_channels, 3, dtype=dt, rngs=rngs)
    down, middle, skips, _ = encoder_path(
        res, lambda ch, r: self_attention(ch) if r in attention_resolutions else None,
        self_attention, model_channels=model_channels, channel_mult=channel_mult,
        num_res_blocks=num_res_blocks, image_size=image_size)
    self.down, self.middle = nnx.List(down), nnx.List(middle)
    ch = skips[-1]
    self.out_norm = layers.group_norm(ch, num_groups, rngs=rngs)
    self.pool = AttentionPool(ch, ch, head_dim=head_dim, dtype=dt, rngs=rngs)
    self.head = layers.dense(ch, num_classes, ("embed", "vocab"), dtype=dt, rngs=rngs)

  def __call__(self, x_t, log_snr, *, train: bool = False,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    name = type(self).__name__
    if train and self.dropout_rate > 0 and dropout_rng is None:
      raise UserError(f"{name} has dropout {self.dropout_rate} and train=True: pass "
                      "dropout_rng")
    if x_t.ndim != 4 or x_t.shape[-1] != self.channels or x_t.shape[1] % self.divisor \
        or x_t.shape[2] % self.divisor:
      raise UserError(f"{name} expects images [B, H, W, {self.channels}] with H and W "
                      f"multiples of {self.divisor}, got {x_t.shape}")
    b = x_t.shape[0]
    if jnp.shape(log_snr) not in ((b,), ()):
      raise UserError(f"{name}: log_snr must have shape [{b}], got {jnp.shape(log_snr)}")
    emb = self.time_embed(jnp.broadcast_to(jnp.asarray(log_snr, jnp.float32), (b,)))
    block_rng = block_rngs(dropout_rng)
    h = constrain(self.input_conv(x_t.astype(self.dtype)), IMAGE_AXES)
    for block in list(self.down) + list(self.middle):
      h = run_block(block, h, emb, None, None, block_rng(), train=train, remat=self.remat)
    h = jax.nn.silu(self.out_norm(h)).astype(self.dtype)
    tokens = h.reshape(b, -1, h.shape[-1])
    pooled = self.pool(tokens, jnp.ones(tokens.shape[:2], bool))
    return self.head(pooled).astype(jnp.float32)
