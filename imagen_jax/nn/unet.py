"""The Imagen U-Nets (Saharia et al. 2022) as Flax NNX modules.

- `UNet`: the 64x64 base model, appendix F.1, which adapts the ADM U-Net of Dhariwal &
  Nichol 2021 (guided-diffusion's `UNetModel` with `resblock_updown`,
  `use_scale_shift_norm` and 64 channels per head).
- `EfficientUNet`: the super-resolution model, appendix B.1 (figures A.28-A.31) and
  F.2-F.3.

Both are called as

    model(x_t, log_snr, text_emb, text_mask, *, lowres=None, lowres_log_snr=None,
          inpaint=None, train=False, dropout_rng=None) -> prediction [B, H, W, C], float32

with `x_t` [B,H,W,C], `log_snr` [B] (the noise level as a log signal-to-noise ratio,
DESIGN.md §4), `text_emb` [B,L,text_dim] and `text_mask` [B,L] bool. A dropped caption is
an all-zero embedding with an all-false mask. Padding positions never change the output.

An inpainting model (GLIDE, Nichol et al. 2021, section 4) is built with
`inpaint_channels` > 0 (4: the masked image and the mask) and called with `inpaint`
[B, H, W, inpaint_channels], concatenated to x_t before the first convolution; the mask is 1
where the image is regenerated, and the masked image is image * (1 - mask)
(`diffusion.masks.inpaint_input`).

Dropout (only with `train=True` and a `dropout` rate > 0) takes its randomness from the
`dropout_rng` key: the models hold no RNG state, so a call is a pure function of
(parameters, inputs, key), `nnx.split(model)` holds only parameters, and remat recomputes
the same masks. Block i uses `fold_in(dropout_rng, i)`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.dtypes import as_dtype
from imagen_jax.errors import UserError
from imagen_jax.nn import layers
from imagen_jax.nn.attention import AttentionBlock, AttentionPool, TextLayer
from imagen_jax.parallel.rules import constrain

IMAGE_AXES = ("batch", None, None, None)


class Block(nnx.Module):
  """A residual block, optionally followed by an attention block."""

  def __init__(self, res: layers.ResBlock, attn: AttentionBlock | None = None):
    self.res = res
    self.attn = attn

  def __call__(self, h, emb, text, text_mask, dropout_rng, *, train: bool = False):
    h = self.res(h, emb, train=train, dropout_rng=dropout_rng)
    if self.attn is not None:
      h = self.attn(h, text, text_mask)
    return constrain(h, IMAGE_AXES)


def level_divisor(name: str, image_size: int, channel_mult: Sequence[int]) -> int:
  """2 ** (levels - 1), the factor the image size must divide by; a clear error if not."""
  divisor = 2 ** (len(channel_mult) - 1)
  if image_size % divisor:
    raise UserError(f"{name} image_size {image_size} is not a multiple of {divisor} "
                    f"(2 ** (levels - 1) for channel_mult {tuple(channel_mult)})")
  return divisor


def block_rngs(dropout_rng: jax.Array | None):
  """A function giving a fresh dropout key per block: fold_in(dropout_rng, block index)."""
  counter = itertools.count()
  if dropout_rng is None:
    return lambda: None
  return lambda: jax.random.fold_in(dropout_rng, next(counter))


def _apply(block, train, *args):
  return block(*args, train=train)


def run_block(block: nnx.Module, *args, train: bool, remat: bool):
  """Calls `block(*args, train=train)`, recomputing its activations in the backward pass
  when `remat` (gradient checkpointing, `nnx.remat`)."""
  if remat:
    return nnx.remat(_apply, static_argnums=(1,))(block, train, *args)
  return block(*args, train=train)


class _ConditionedUNet(nnx.Module):
  """What both U-Nets share: input checks, the text and noise-level conditioning."""

  image_size: int
  lowres_size: int | None
  text_dim: int
  channels: int

  def _init_conditioning(self, *, model_channels: int, emb_dim: int, head_dim: int,
                         text_positions: int, text_layers: int, dtype: Any,
                         rngs: nnx.Rngs) -> None:
    self.time_embed = layers.NoiseLevelEmbedding(model_channels, emb_dim, dtype=dtype,
                                                 rngs=rngs)
    # The text is layer-normed once, projected to the model width once, and each
    # attention layer projects that to its own keys and values (GLIDE/ADM's encoder_kv).
    self.text_norm = layers.layer_norm(self.text_dim, rngs=rngs)
    self.text_proj = layers.dense(self.text_dim, model_channels, ("text_embed", "embed"),
                                  dtype=dtype, rngs=rngs)
    # Optional learned absolute positions of the text tokens, added after the projection.
    # Imagen has none: a trained T5 already encodes word order. An encoder that encodes
    # it weakly (the quickstart's random T5) leaves attention a bag of words, where "a red
    # circle above a blue square" and "a blue square above a red circle" look alike.
    self.text_positions = text_positions
    init = layers.partitioned(nnx.initializers.normal(model_channels ** -0.5),
                              ("length", "embed"))
    self.text_position = (nnx.Param(init(rngs.params(), (text_positions, model_channels)))
                          if text_positions else None)
    # Optional trainable transformer layers over the projected text (attention.TextLayer).
    self.text_layers = nnx.List([TextLayer(model_channels, head_dim=head_dim, dtype=dtype,
                                           rngs=rngs) for _ in range(text_layers)])
    self.text_pool = AttentionPool(model_channels, emb_dim, head_dim=head_dim, dtype=dtype,
                                   rngs=rngs)

  def _check_inputs(self, x_t, log_snr, text_emb, text_mask, divisor: int, train: bool,
                    dropout_rng) -> None:
    name = type(self).__name__
    if train and self.dropout_rate > 0 and dropout_rng is None:
      raise UserError(f"{name} has dropout {self.dropout_rate} and train=True: pass "
                      "dropout_rng=<a jax.random key> (e.g. fold_in(step_key, ...))")
    if x_t.ndim != 4 or x_t.shape[-1] != self.channels:
      raise UserError(f"{name} expects images [B, H, W, {self.channels}], got x_t of shape "
                      f"{x_t.shape}")
    b, h, w, _ = x_t.shape
    if h % divisor or w % divisor:
      raise UserError(f"{name} downsamples by {divisor}: image size {h}x{w} must be a "
                      f"multiple of {divisor}; resize or crop the images, or use fewer "
                      "channel_mult levels")
    if jnp.shape(log_snr) not in ((b,), ()):
      raise UserError(f"{name}: log_snr must have shape [{b}] (one noise level per "
                      f"example), got {jnp.shape(log_snr)}")
    if text_emb.ndim != 3 or text_emb.shape[0] != b or text_emb.shape[2] != self.text_dim:
      raise UserError(f"{name} expects text_emb [{b}, L, {self.text_dim}] (text_dim "
                      f"{self.text_dim}), got {text_emb.shape}; set the model's text_dim "
                      "(gin macro TEXT_DIM) to the text encoder's width")
    if self.text_positions and text_emb.shape[1] > self.text_positions:
      raise UserError(f"{name} has text_positions={self.text_positions} (learned text "
                      f"positions) but got {text_emb.shape[1]} text tokens; embed with "
                      f"max_length <= {self.text_positions} or build the model with "
                      "text_positions >= the text length")
    if text_mask.shape != text_emb.shape[:2]:
      raise UserError(f"{name}: text_mask must have shape {text_emb.shape[:2]}, got "
                      f"{text_mask.shape}")

  def _inpaint_input(self, x, inpaint):
    """x with the inpainting channels concatenated (a model with inpaint_channels > 0)."""
    name, n = type(self).__name__, self.inpaint_channels
    if not n:
      if inpaint is not None:
        raise UserError(f"{name} was built without inpaint_channels and takes no inpaint "
                        "input; build it with inpaint_channels=4 (an inpainting model)")
      return x
    if inpaint is None or inpaint.shape != (*x.shape[:3], n):
      raise UserError(f"{name} is an inpainting model (inpaint_channels={n}): pass inpaint "
                      f"[{', '.join(map(str, x.shape[:3]))}, {n}] (the masked image and the "
                      f"mask), got {None if inpaint is None else inpaint.shape}")
    return jnp.concatenate([x, inpaint.astype(x.dtype)], axis=-1)

  def _conditioning(self, log_snr, text_emb, text_mask, batch: int):
    """-> (time+text embedding [B, emb_dim], projected text [B,L,model_channels], mask)."""
    log_snr = jnp.broadcast_to(jnp.asarray(log_snr, jnp.float32), (batch,))
    mask = text_mask.astype(bool)
    # Padding holds anything (zeros from the cache); zero it so it can never leak.
    text = jnp.where(mask[..., None], text_emb.astype(jnp.float32), 0.0)
    text = self.text_proj(self.text_norm(text).astype(self.dtype))
    if self.text_position is not None:
      text = text + self.text_position[:text.shape[1]].astype(self.dtype)
    for layer in self.text_layers:
      text = layer(text, mask)
    emb = self.time_embed(log_snr) + self.text_pool(text, mask)
    return emb, text, mask


def encoder_path(res, attn, middle_attn, *, model_channels: int,
                 channel_mult: Sequence[int], num_res_blocks: int, image_size: int):
  """The base U-Net's down path and middle (ADM, Dhariwal & Nichol 2021), shared by `UNet`
  and the noise-aware classifier (`nn.classifier`, ADM's "encoder half of the UNet").

  Per level, `num_res_blocks` blocks `Block(res(cin, cout), attn(cout, resolution))`, then
  (except at the last level) a downsampling `Block(res(ch, ch, "down"))`; the middle is
  res-middle_attn(ch)-res. `res(cin, cout, resample=None)`, `attn(ch, resolution)` (None:
  no attention) and `middle_attn(ch)` build the layers.
  -> (down blocks, middle blocks, the channels of every skip (input conv first), the
  lowest resolution).
  """
  ch = model_channels
  skip_channels = [ch]
  down, resolution = [], image_size
  for level, mult in enumerate(channel_mult):
    for _ in range(num_res_blocks):
      down.append(Block(res(ch, mult * model_channels),
                        attn(mult * model_channels, resolution)))
      ch = mult * model_channels
      skip_channels.append(ch)
    if level != len(channel_mult) - 1:
      down.append(Block(res(ch, ch, "down")))
      resolution //= 2
      skip_channels.append(ch)
  middle = [Block(res(ch, ch), middle_attn(ch)), Block(res(ch, ch))]
  return down, middle, skip_channels, resolution


@gin.configurable
class UNet(_ConditionedUNet):
  """The base U-Net (Imagen appendix F.1; ADM of Dhariwal & Nichol 2021).

  Down path: per level, `num_res_blocks` residual blocks (with attention where the
  feature resolution is in `attention_resolutions`), then a residual block that
  downsamples (BigGAN-style). A middle of res-attention-res. Up path: per level,
  `num_res_blocks + 1` residual blocks fed the concatenated skip features, then an
  upsampling residual block. Each attention layer attends over the image tokens and the
  layer-normed text tokens; scale-shift norms see the time embedding plus the
  attention-pooled text.
  """

  def __init__(self, *, image_size: int = 64, channels: int = 3, text_dim: int = 4096,
               model_channels: int = 512, channel_mult: Sequence[int] = (1, 2, 3, 4),
               num_res_blocks: int = 3, attention_resolutions: Sequence[int] = (32, 16, 8),
               head_dim: int = 64, dropout: float = 0.0, num_groups: int = 32,
               emb_mult: int = 4, text_positions: int = 0, text_layers: int = 0,
               coord_channels: bool = False, inpaint_channels: int = 0,
               dtype: Any = "float32", remat: bool = False, rngs: nnx.Rngs):
    rngs = layers.local_rngs(rngs)
    self.image_size = image_size
    self.coord_channels = coord_channels
    self.inpaint_channels = inpaint_channels
    self.lowres_size = None
    self.text_dim = text_dim
    self.channels = channels
    self.dtype = as_dtype(dtype)
    self.remat = remat
    self.dropout_rate = dropout
    self.divisor = level_divisor("UNet", image_size, channel_mult)
    dt = self.dtype
    emb_dim = emb_mult * model_channels
    self._init_conditioning(model_channels=model_channels, emb_dim=emb_dim,
                            head_dim=head_dim, text_positions=text_positions,
                            text_layers=text_layers, dtype=dt,
                            rngs=rngs)

    def res(cin, cout, resample=None):
      return layers.ResBlock(cin, cout, emb_dim, num_groups=num_groups, dropout=dropout,
                             resample=resample, dtype=dt, rngs=rngs)

    def attn(ch, resolution):
      if resolution not in attention_resolutions:
        return None
      return AttentionBlock(ch, text_dim=model_channels, self_attention=True,
                            head_dim=head_dim,
                            num_groups=num_groups, dtype=dt, rngs=rngs)

    ch = model_channels
    # x_t, the coordinates, then the inpainting channels (last: INIT_FROM zero-pads them).
    self.input_conv = layers.conv(channels + 2 * coord_channels + inpaint_channels, ch, 3,
                                  dtype=dt, rngs=rngs)
    down, middle, skip_channels, resolution = encoder_path(
        res, attn, lambda c: AttentionBlock(c, text_dim=model_channels, head_dim=head_dim,
                                            num_groups=num_groups, dtype=dt, rngs=rngs),
        model_channels=model_channels, channel_mult=channel_mult,
        num_res_blocks=num_res_blocks, image_size=image_size)
    ch = skip_channels[-1]
    self.down = nnx.List(down)
    self.middle = nnx.List(middle)
    up = []
    for level, mult in reversed(list(enumerate(channel_mult))):
      for i in range(num_res_blocks + 1):
        out_ch = mult * model_channels
        up.append(Block(res(ch + skip_channels.pop(), out_ch), attn(out_ch, resolution)))
        ch = out_ch
      if level:
        up.append(Block(res(ch, ch, "up")))
        resolution *= 2
    self.up = nnx.List(up)
    # Which up blocks take a skip (all but the upsampling ones).
    self.up_takes_skip = tuple(b.res.resample is None for b in up)
    self.out_norm = layers.group_norm(ch, num_groups, rngs=rngs)
    self.out_conv = layers.conv(ch, channels, 3, dtype=dt, rngs=rngs, zero_init=True)

  def __call__(self, x_t, log_snr, text_emb, text_mask, *, lowres=None,
               lowres_log_snr=None, inpaint=None, train: bool = False,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    if lowres is not None or lowres_log_snr is not None:
      raise UserError("UNet is a base (text-to-image) model and takes no lowres or "
                      "lowres_log_snr; super-resolution stages use EfficientUNet")
    self._check_inputs(x_t, log_snr, text_emb, text_mask, self.divisor, train,
                      dropout_rng)
    emb, text, mask = self._conditioning(log_snr, text_emb, text_mask, x_t.shape[0])
    block_rng = block_rngs(dropout_rng)
    x = x_t.astype(self.dtype)
    if self.coord_channels:
      x = jnp.concatenate([x, layers.coordinates(x.shape[:3], self.dtype)], axis=-1)
    h = constrain(self.input_conv(self._inpaint_input(x, inpaint)), IMAGE_AXES)
    skips = [h]
    for block in self.down:
      h = run_block(block, h, emb, text, mask, block_rng(), train=train,
                    remat=self.remat)
      skips.append(h)
    for block in self.middle:
      h = run_block(block, h, emb, text, mask, block_rng(), train=train,
                    remat=self.remat)
    for block, takes_skip in zip(self.up, self.up_takes_skip):
      if takes_skip:
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = run_block(block, h, emb, text, mask, block_rng(), train=train,
                    remat=self.remat)
    h = jax.nn.silu(self.out_norm(h)).astype(self.dtype)
    return self.out_conv(h).astype(jnp.float32)


class DBlock(nnx.Module):
  """Efficient U-Net down block (figure A.29): downsample first, then residual blocks;
  attention after the last one at the lowest level."""

  def __init__(self, down: nnx.Conv | None, blocks: list[Block]):
    self.down = down
    self.blocks = nnx.List(blocks)


class UBlock(nnx.Module):
  """Efficient U-Net up block (figure A.30): residual blocks on the scaled skip
  concatenated to the input, attention at the lowest level, upsampling last."""

  def __init__(self, blocks: list[Block], up: nnx.Conv | None):
    self.blocks = nnx.List(blocks)
    self.up = up


def merge_skip(h: jax.Array, skip: jax.Array, scale: float) -> jax.Array:
  """Concatenates a U-Net skip connection, scaled (Imagen appendix B.1: by 1/√2)."""
  return jnp.concatenate([h, skip * jnp.asarray(scale, skip.dtype)], axis=-1)


@gin.configurable
class EfficientUNet(_ConditionedUNet):
  """The Efficient U-Net for super-resolution (Imagen appendix B.1, F.2-F.3).

  Compared with `UNet`: per-level block counts (`num_res_blocks`, more blocks at low
  resolution, where they are cheap); the skip connection of each level is scaled by
  `skip_scale` = 1/√2 before concatenation; each DBlock downsamples (stride-2 conv)
  before its convolutions and each UBlock upsamples (nearest + conv) after them. Text
  enters through cross-attention at the lowest level (and the pooled embedding), with
  optional self-attention there. With `self_attention=False` the model is fully
  convolutional: trained on crops, it samples at any size that 2 ** (levels - 1) divides.

  Conditioning on the low-resolution image: `lowres` [B, h, w, C] at its own resolution
  (the previous stage's output size, or a crop of it) is resized inside the model to the
  size of `x_t` (`jax.image.resize`, bicubic) and concatenated to `x_t` as extra input
  channels. Its augmentation level `lowres_log_snr` [B] (noise conditioning augmentation,
  Imagen §2.5) is embedded like the time and added to the time embedding.
  """

  def __init__(self, *, image_size: int = 256, lowres_size: int = 64, channels: int = 3,
               text_dim: int = 4096, model_channels: int = 128,
               channel_mult: Sequence[int] = (1, 2, 4, 8),
               num_res_blocks: Sequence[int] = (2, 4, 8, 8), self_attention: bool = True,
               cross_attention: bool = True, head_dim: int = 64, dropout: float = 0.0,
               num_groups: int = 32, emb_mult: int = 4, skip_scale: float = 2 ** -0.5,
               text_positions: int = 0, text_layers: int = 0, inpaint_channels: int = 0,
               dtype: Any = "float32", remat: bool = False, rngs: nnx.Rngs):
    if len(num_res_blocks) != len(channel_mult):
      raise UserError(f"EfficientUNet num_res_blocks {tuple(num_res_blocks)} needs one "
                      f"count per level of channel_mult {tuple(channel_mult)}")
    rngs = layers.local_rngs(rngs)
    self.image_size = image_size
    self.lowres_size = lowres_size
    self.inpaint_channels = inpaint_channels
    self.text_dim = text_dim
    self.channels = channels
    self.dtype = as_dtype(dtype)
    self.remat = remat
    self.dropout_rate = dropout
    self.skip_scale = skip_scale
    self.divisor = level_divisor("EfficientUNet", image_size, channel_mult)
    dt = self.dtype
    emb_dim = emb_mult * model_channels
    self._init_conditioning(model_channels=model_channels, emb_dim=emb_dim,
                            head_dim=head_dim, text_positions=text_positions,
                            text_layers=text_layers, dtype=dt,
                            rngs=rngs)
    self.lowres_embed = layers.NoiseLevelEmbedding(model_channels, emb_dim, dtype=dt,
                                                   rngs=rngs)

    def res(cin, cout):
      return layers.ResBlock(cin, cout, emb_dim, num_groups=num_groups, dropout=dropout,
                             dtype=dt, rngs=rngs)

    def lowest_attention(ch):
      if not (self_attention or cross_attention):
        return None
      return AttentionBlock(ch, text_dim=model_channels if cross_attention else None,
                            self_attention=self_attention, head_dim=head_dim,
                            num_groups=num_groups, dtype=dt, rngs=rngs)

    widths = [m * model_channels for m in channel_mult]
    last = len(widths) - 1
    # x_t, the resized low-resolution image and the inpainting channels, concatenated.
    self.input_conv = layers.conv(2 * channels + inpaint_channels, model_channels, 3,
                                  dtype=dt, rngs=rngs)
    dblocks, ch = [], model_channels
    for level, (width, n) in enumerate(zip(widths, num_res_blocks)):
      if level:
        down = layers.conv(ch, width, 3, strides=2, dtype=dt, rngs=rngs)
      else:
        down = layers.conv(ch, width, 3, dtype=dt, rngs=rngs) if ch != width else None
      blocks = [Block(res(width, width)) for _ in range(n)]
      if level == last and blocks:
        blocks[-1] = Block(blocks[-1].res, lowest_attention(width))
      dblocks.append(DBlock(down, blocks))
      ch = width
    self.dblocks = nnx.List(dblocks)
    ublocks = []
    for level in reversed(range(len(widths))):
      width, n = widths[level], num_res_blocks[level]
      blocks = [Block(res(ch + width if i == 0 else width, width)) for i in range(max(n, 1))]
      if level == last:
        blocks[-1] = Block(blocks[-1].res, lowest_attention(width))
      up = (layers.conv(width, widths[level - 1], 3, dtype=dt, rngs=rngs) if level
            else None)
      ublocks.append(UBlock(blocks, up))
      ch = widths[level - 1] if level else width
    self.ublocks = nnx.List(ublocks)
    self.out_norm = layers.group_norm(ch, num_groups, rngs=rngs)
    self.out_conv = layers.conv(ch, channels, 3, dtype=dt, rngs=rngs, zero_init=True)

  def __call__(self, x_t, log_snr, text_emb, text_mask, *, lowres=None,
               lowres_log_snr=None, inpaint=None, train: bool = False,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    if lowres is None or lowres_log_snr is None:
      raise UserError("EfficientUNet is a super-resolution model: pass lowres (the "
                      "low-resolution image, [B, h, w, C]) and lowres_log_snr (its "
                      "augmentation level, [B])")
    self._check_inputs(x_t, log_snr, text_emb, text_mask, self.divisor, train,
                      dropout_rng)
    b, height, width, c = x_t.shape
    if lowres.ndim != 4 or lowres.shape[0] != b or lowres.shape[-1] != c:
      raise UserError(f"EfficientUNet expects lowres [{b}, h, w, {c}], got {lowres.shape}")
    if jnp.shape(lowres_log_snr) not in ((b,), ()):
      raise UserError(f"lowres_log_snr must have shape [{b}], got "
                      f"{jnp.shape(lowres_log_snr)}")
    lowres = lowres.astype(jnp.float32)
    if lowres.shape[1:3] != (height, width):
      lowres = jax.image.resize(lowres, (b, height, width, c), method="bicubic")
    emb, text, mask = self._conditioning(log_snr, text_emb, text_mask, b)
    block_rng = block_rngs(dropout_rng)
    aug = jnp.broadcast_to(jnp.asarray(lowres_log_snr, jnp.float32), (b,))
    emb = emb + self.lowres_embed(aug)

    h = jnp.concatenate([x_t.astype(jnp.float32), lowres], axis=-1).astype(self.dtype)
    h = constrain(self.input_conv(self._inpaint_input(h, inpaint)), IMAGE_AXES)
    skips = []
    for dblock in self.dblocks:
      if dblock.down is not None:
        h = dblock.down(h)
      for block in dblock.blocks:
        h = run_block(block, h, emb, text, mask, block_rng(), train=train,
                    remat=self.remat)
      skips.append(h)
    for ublock in self.ublocks:
      h = merge_skip(h, skips.pop(), self.skip_scale)
      for block in ublock.blocks:
        h = run_block(block, h, emb, text, mask, block_rng(), train=train,
                    remat=self.remat)
      if ublock.up is not None:
        h = ublock.up(layers.upsample(h))
    h = jax.nn.silu(self.out_norm(h)).astype(self.dtype)
    return self.out_conv(h).astype(jnp.float32)
