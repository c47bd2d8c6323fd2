"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") as a Flax NNX module, loaded from Hugging Face CLIP directories.

The two towers are the ones of transformers' `CLIPModel`, so a Hugging Face checkpoint
gives the same embeddings:

- text: token + absolute position embeddings, a pre-norm transformer with a causal mask,
  a final layer norm, and the pooled output at the end-of-text token (§2.4: "the
  activations of the highest layer of the transformer at the [EOS] token"). The position is
  the first `eos_token_id` in the ids; configs from before transformers PR #24773 write
  `eos_token_id=2`, and there, as in transformers, it is the argmax of the ids (the
  end-of-text token has the largest id in CLIP's vocabulary).
- vision: a ViT (Dosovitskiy et al. 2021): a patch convolution without bias, a class token,
  position embeddings, a layer norm before the transformer ("pre_layrnorm", sic) and one
  on the class token after it.
- each transformer layer is `x + attn(ln1(x))`, `x + fc2(act(fc1(ln2(x))))`, with
  `hidden_act` "quick_gelu" (x * sigmoid(1.702 x), OpenAI's models) or "gelu".
- `text_projection`, `visual_projection` (no bias) map both into one embedding space;
  `logit_scale` is the learned log temperature.

Images are NHWC (the project's layout), already preprocessed (`imagen_jax.eval.clip_score`
resizes and normalises as `preprocessor_config.json` says). Layer norms, softmaxes and the
residual stream are float32; `dtype` is the compute dtype of the matmuls.

Checkpoints use the Hugging Face layout: `config.json` (a `CLIPModel` config with
`text_config`, `vision_config`, `projection_dim`) plus `model.safetensors` or shards with
`model.safetensors.index.json`, read through `imagen_jax.weights`. HF `nn.Linear` weights
are `[out, in]`; our kernels are `[in, ...out]` and are transposed on load and save.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from imagen_jax import weights as weight_io
from imagen_jax.errors import UserError

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
_NEG_INF = -1e30  # logits of masked keys; finite so that softmax never sees inf - inf
# transformers' marker for configs written before it pooled at `eos_token_id`.
_LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers' `CLIPTextConfig` fields (its defaults: OpenAI's ViT-B/32 text tower)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers' `CLIPVisionConfig` fields (its defaults: OpenAI's ViT-B/32)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


def _check_tower(name: str, tower) -> None:
  for field in dataclasses.fields(tower):
    value = getattr(tower, field.name)
    if isinstance(value, int) and field.name.endswith(("size", "layers", "heads",
                                                       "embeddings", "channels")):
      if value <= 0:
        raise UserError(f"CLIP {name} {field.name}={value} must be positive")
  if tower.hidden_act not in _ACTIVATIONS:
    raise UserError(f"CLIP {name} hidden_act={tower.hidden_act!r} is not supported; use one "
                    f"of {sorted(_ACTIVATIONS)}")
  if tower.hidden_size % tower.num_attention_heads:
    raise UserError(f"CLIP {name} hidden_size={tower.hidden_size} is not a multiple of "
                    f"num_attention_heads={tower.num_attention_heads}")


def _tower_from_json(cls, config: Mapping[str, Any], key: str):
  """Defaults, updated by `key` and then by the older `{key}_dict` (which transformers
  lets win, as in openai/clip-vit-large-patch14's config.json)."""
  values: dict[str, Any] = {}
  for part in (config.get(key), config.get(f"{key}_dict")):
    if part is not None and not isinstance(part, Mapping):
      raise UserError(f"CLIP config.json's {key} must be an object; got {part!r}")
    values.update(part or {})
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: v for k, v in values.items() if k in fields}
  size = kwargs.get("image_size")
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      raise UserError(f"CLIP vision image_size={size} is not square; only square images "
                      "are supported")
    kwargs["image_size"] = size[0]
  for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
    if name in kwargs and not isinstance(kwargs[name], int):
      if kwargs[name] is None:
        kwargs.pop(name)
      else:
        raise UserError(f"CLIP text {name}={kwargs[name]!r} must be one integer")
  return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A Hugging Face `CLIPModel` config: the two towers and the shared projection size."""
  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  def __post_init__(self):
    _check_tower("text", self.text)
    _check_tower("vision", self.vision)
    if self.projection_dim <= 0:
      raise UserError(f"CLIP projection_dim={self.projection_dim} must be positive")

  @classmethod
  def from_hf_json(cls, config: Mapping[str, Any]) -> "CLIPConfig":
    """Reads a Hugging Face CLIP `config.json` dict (unknown keys are ignored)."""
    if config.get("model_type", "clip") != "clip":
      raise UserError(f"config.json has model_type={config.get('model_type')!r}; expected "
                      "a CLIPModel checkpoint (model_type 'clip')")
    try:
      return cls(text=_tower_from_json(CLIPTextConfig, config, "text_config"),
                 vision=_tower_from_json(CLIPVisionConfig, config, "vision_config"),
                 projection_dim=int(config.get("projection_dim", 512)),
                 logit_scale_init_value=float(config.get("logit_scale_init_value", 2.6592)))
    except TypeError as e:
      raise UserError(f"CLIP config.json has a field of the wrong type: {e}") from e

  def to_hf_json(self) -> dict[str, Any]:
    text = dataclasses.asdict(self.text)
    text.update(model_type="clip_text_model", projection_dim=self.projection_dim)
    vision = dataclasses.asdict(self.vision)
    vision.update(model_type="clip_vision_model", projection_dim=self.projection_dim)
    return {"model_type": "clip", "architectures": ["CLIPModel"], "text_config": text,
            "vision_config": vision, "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value}


def _param(rngs: nnx.Rngs, shape, std: float, names: tuple[str, ...], param_dtype,
           mean: float = 0.0) -> nnx.Param:
  value = mean + std * jax.random.normal(rngs.params(), shape, jnp.float32)
  # Sharding comes from the logical names through parallel/rules.py, so the module can be
  # built without a mesh in scope.
  return nnx.Param(value.astype(param_dtype), out_sharding=names, eager_sharding=False)


class LayerNorm(nnx.Module):
  """torch's LayerNorm: (x - mean) / sqrt(var + eps) * scale + bias, in float32."""

  def __init__(self, dim: int, eps: float, *, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",),
                           eager_sharding=False)
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",),
                          eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    out = centred * jax.lax.rsqrt(var + self.eps)
    return out * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class Attention(nnx.Module):
  """Multi-head self-attention with biases, logits scaled by 1/sqrt(head_dim)."""

  def __init__(self, dim: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    k = dim // heads
    self.dtype = dtype
    self.head_dim = k
    for name in ("query", "key", "value"):
      setattr(self, name, _param(rngs, (dim, heads, k), dim ** -0.5,
                                 ("embed", "heads", "kv"), param_dtype))
      setattr(self, f"{name}_bias", nnx.Param(jnp.zeros((heads, k), param_dtype),
                                              out_sharding=("heads", "kv"),
                                              eager_sharding=False))
    self.out = _param(rngs, (heads, k, dim), dim ** -0.5, ("heads", "kv", "embed"),
                      param_dtype)
    self.out_bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",),
                              eager_sharding=False)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """x [B, L, D]; mask [L, L] bool (True = may attend) or None -> [B, L, D] float32."""
    dt = self.dtype
    x = x.astype(dt)

    def project(name):
      y = jnp.einsum("bld,dhk->blhk", x, getattr(self, name)[...].astype(dt))
      return y + getattr(self, f"{name}_bias")[...].astype(dt)

    q, k, v = project("query"), project("key"), project("value")
    logits = jnp.einsum("bqhk,bmhk->bhqm", q, k, preferred_element_type=jnp.float32)
    logits = logits * self.head_dim ** -0.5
    if mask is not None:
      logits = jnp.where(mask, logits, _NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(dt)
    attended = jnp.einsum("bhqm,bmhk->bqhk", weights, v)
    out = jnp.einsum("blhk,hkd->bld", attended, self.out[...].astype(dt),
                     preferred_element_type=jnp.float32)
    return out + self.out_bias[...].astype(jnp.float32)


class MLP(nnx.Module):
  """fc2(act(fc1(x)))."""

  def __init__(self, dim: int, hidden: int, activation: str, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.activation = _ACTIVATIONS[activation]
    self.fc1 = _param(rngs, (dim, hidden), dim ** -0.5, ("embed", "mlp"), param_dtype)
    self.fc1_bias = nnx.Param(jnp.zeros((hidden,), param_dtype), out_sharding=("mlp",),
                              eager_sharding=False)
    self.fc2 = _param(rngs, (hidden, dim), hidden ** -0.5, ("mlp", "embed"), param_dtype)
    self.fc2_bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",),
                              eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    h = jnp.einsum("bld,df->blf", x.astype(dt), self.fc1[...].astype(dt),
                   preferred_element_type=jnp.float32)
    h = self.activation(h + self.fc1_bias[...].astype(jnp.float32))
    out = jnp.einsum("blf,fd->bld", h.astype(dt), self.fc2[...].astype(dt),
                     preferred_element_type=jnp.float32)
    return out + self.fc2_bias[...].astype(jnp.float32)


class EncoderLayer(nnx.Module):

  def __init__(self, tower, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, eps = tower.hidden_size, tower.layer_norm_eps
    self.norm1 = LayerNorm(d, eps, param_dtype=param_dtype)
    self.attention = Attention(d, tower.num_attention_heads, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    self.norm2 = LayerNorm(d, eps, param_dtype=param_dtype)
    self.mlp = MLP(d, tower.intermediate_size, tower.hidden_act, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = x + self.attention(self.norm1(x), mask)
    return x + self.mlp(self.norm2(x))


def _layers(tower, *, dtype, param_dtype, rngs) -> nnx.List:
  return nnx.List([EncoderLayer(tower, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                   for _ in range(tower.num_hidden_layers)])


class TextTransformer(nnx.Module):
  """CLIP's text tower without projection: ids [B, L] -> (hidden [B, L, D], pooled [B, D])."""

  def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.config = config
    self.token_embedding = _param(rngs, (config.vocab_size, d), 0.02, ("vocab", "embed"),
                                  param_dtype)
    self.position_embedding = _param(rngs, (config.max_position_embeddings, d), 0.01,
                                     ("length", "embed"), param_dtype)
    self.layers = _layers(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.final_norm = LayerNorm(d, config.layer_norm_eps, param_dtype=param_dtype)

  def pool_positions(self, input_ids: jax.Array) -> jax.Array:
    """[B] index of the pooled token: the first `eos_token_id` (argmax of the ids for
    legacy configs), exactly as transformers' CLIPTextTransformer."""
    if self.config.eos_token_id == _LEGACY_EOS_TOKEN_ID:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)

  def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    length = input_ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise UserError(f"CLIP text of {length} tokens is longer than max_position_embeddings="
                      f"{self.config.max_position_embeddings}; tokenize with that max length")
    x = jnp.take(self.token_embedding[...], input_ids, axis=0).astype(jnp.float32)
    x = x + self.position_embedding[...][:length].astype(jnp.float32)
    causal = jnp.tril(jnp.ones((length, length), bool))
    for layer in self.layers:
      x = layer(x, causal)
    hidden = self.final_norm(x)
    pooled = jnp.take_along_axis(hidden, self.pool_positions(input_ids)[:, None, None],
                                 axis=1)[:, 0]
    return hidden, pooled


class VisionTransformer(nnx.Module):
  """CLIP's ViT without projection: pixels [B, S, S, C] -> (hidden [B, 1 + N, D],
  pooled [B, D], the class token after the post layer norm)."""

  def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, p, c = config.hidden_size, config.patch_size, config.num_channels
    self.config = config
    self.dtype = dtype
    self.patch_embedding = _param(rngs, (p, p, c, d), (p * p * c) ** -0.5,
                                  ("conv_height", "conv_width", "conv_in", "conv_out"),
                                  param_dtype)
    self.class_embedding = _param(rngs, (d,), d ** -0.5, ("embed",), param_dtype)
    self.position_embedding = _param(rngs, (config.num_patches + 1, d), 0.02,
                                     ("length", "embed"), param_dtype)
    self.pre_norm = LayerNorm(d, config.layer_norm_eps, param_dtype=param_dtype)
    self.layers = _layers(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_norm = LayerNorm(d, config.layer_norm_eps, param_dtype=param_dtype)

  def patchify(self, pixels: jax.Array) -> jax.Array:
    """[B, S, S, C] -> [B, N, D]: the stride-p convolution as one matmul over patches,
    patches in row-major order (torch's `flatten(2)` of the conv output)."""
    b, s, _, c = pixels.shape
    p, g = self.config.patch_size, s // self.config.patch_size
    patches = pixels.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    dt = self.dtype
    out = jnp.einsum("bghpqc,pqcd->bghd", patches.astype(dt),
                     self.patch_embedding[...].astype(dt), preferred_element_type=jnp.float32)
    return out.reshape(b, g * g, -1)

  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    size = self.config.image_size
    if pixels.ndim != 4 or pixels.shape[1:] != (size, size, self.config.num_channels):
      raise UserError(f"CLIP images must be [B, {size}, {size}, "
                      f"{self.config.num_channels}] (preprocessed); got {pixels.shape}")
    patches = self.patchify(pixels)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(jnp.float32),
                           (patches.shape[0], 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    x = self.pre_norm(x + self.position_embedding[...].astype(jnp.float32))
    for layer in self.layers:
      x = layer(x, None)
    return x, self.post_norm(x[:, 0])


class CLIP(nnx.Module):
  """Both towers and their projections.

  `encode_text(ids [B, L] int)` and `encode_image(pixels [B, S, S, 3])` return the
  projected (unnormalised) embeddings [B, projection_dim], float32, as transformers'
  `get_text_features` / `get_image_features`; calling the module gives the logits of
  every image against every text, `exp(logit_scale) * cos` [B_image, B_text].
  """

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.text_model = TextTransformer(config.text, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
    self.vision_model = VisionTransformer(config.vision, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
    self.text_projection = _param(rngs, (config.text.hidden_size, config.projection_dim),
                                  config.text.hidden_size ** -0.5, ("embed", "embed"),
                                  param_dtype)
    self.visual_projection = _param(
        rngs, (config.vision.hidden_size, config.projection_dim),
        config.vision.hidden_size ** -0.5, ("embed", "embed"), param_dtype)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype),
                                 out_sharding=(), eager_sharding=False)  # a scalar

  def _project(self, x: jax.Array, kernel: nnx.Param) -> jax.Array:
    return jnp.einsum("bd,dp->bp", x.astype(self.dtype), kernel[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def encode_text(self, input_ids: jax.Array) -> jax.Array:
    return self._project(self.text_model(input_ids)[1], self.text_projection)

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    return self._project(self.vision_model(pixels)[1], self.visual_projection)

  def __call__(self, input_ids: jax.Array, pixels: jax.Array) -> jax.Array:
    image = normalize(self.encode_image(pixels))
    text = normalize(self.encode_text(input_ids))
    return jnp.exp(self.logit_scale[...].astype(jnp.float32)) * image @ text.T


def normalize(x: jax.Array) -> jax.Array:
  """x / ||x|| over the last axis (the zero vector stays zero)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny)


# --- Hugging Face checkpoint layout ----------------------------------------------------

_SAME = (lambda w: w, lambda w: w)
_LINEAR = (lambda w: w.T, lambda w: w.T)


def _attention_maps(heads: int, head_dim: int):
  """HF q/k/v [H*K, D] weight and [H*K] bias <-> our [D, H, K] and [H, K]; HF out_proj
  [D, H*K] <-> our [H, K, D]."""
  qkv = (lambda w: w.T.reshape(-1, heads, head_dim),
         lambda k: k.reshape(k.shape[0], -1).T)
  qkv_bias = (lambda b: b.reshape(heads, head_dim), lambda b: b.reshape(-1))
  out = (lambda w: w.T.reshape(heads, head_dim, -1),
         lambda k: k.reshape(heads * head_dim, -1).T)
  return qkv, qkv_bias, out


def _layer_rows(prefix: str, ours: tuple[Any, ...], tower) -> list[tuple]:
  heads = tower.num_attention_heads
  qkv, qkv_bias, out = _attention_maps(heads, tower.hidden_size // heads)
  rows = []
  for i in range(tower.num_hidden_layers):
    hf, me = f"{prefix}.encoder.layers.{i}", ours + ("layers", i)
    for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      rows += [(me + ("attention", name), f"{hf}.self_attn.{proj}.weight", *qkv),
               (me + ("attention", f"{name}_bias"), f"{hf}.self_attn.{proj}.bias",
                *qkv_bias)]
    rows += [
        (me + ("attention", "out"), f"{hf}.self_attn.out_proj.weight", *out),
        (me + ("attention", "out_bias"), f"{hf}.self_attn.out_proj.bias", *_SAME),
        (me + ("mlp", "fc1"), f"{hf}.mlp.fc1.weight", *_LINEAR),
        (me + ("mlp", "fc1_bias"), f"{hf}.mlp.fc1.bias", *_SAME),
        (me + ("mlp", "fc2"), f"{hf}.mlp.fc2.weight", *_LINEAR),
        (me + ("mlp", "fc2_bias"), f"{hf}.mlp.fc2.bias", *_SAME),
    ]
    rows += _norm_rows(f"{hf}.layer_norm1", me + ("norm1",))
    rows += _norm_rows(f"{hf}.layer_norm2", me + ("norm2",))
  return rows


def _norm_rows(hf: str, ours: tuple[Any, ...]) -> list[tuple]:
  return [(ours + ("scale",), f"{hf}.weight", *_SAME), (ours + ("bias",), f"{hf}.bias", *_SAME)]


def hf_key_map(config: CLIPConfig) -> list[tuple[tuple[Any, ...], str, Callable, Callable]]:
  """(path in the NNX module, HF key, HF->ours, ours->HF) for every parameter."""
  conv = (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
  text, vision = ("text_model",), ("vision_model",)
  rows = [
      (text + ("token_embedding",), "text_model.embeddings.token_embedding.weight", *_SAME),
      (text + ("position_embedding",), "text_model.embeddings.position_embedding.weight",
       *_SAME),
      (vision + ("patch_embedding",), "vision_model.embeddings.patch_embedding.weight",
       *conv),
      (vision + ("class_embedding",), "vision_model.embeddings.class_embedding", *_SAME),
      (vision + ("position_embedding",),
       "vision_model.embeddings.position_embedding.weight", *_SAME),
      (("text_projection",), "text_projection.weight", *_LINEAR),
      (("visual_projection",), "visual_projection.weight", *_LINEAR),
      (("logit_scale",), "logit_scale", *_SAME),
  ]
  rows += _norm_rows("text_model.final_layer_norm", text + ("final_norm",))
  rows += _norm_rows("vision_model.pre_layrnorm", vision + ("pre_norm",))
  rows += _norm_rows("vision_model.post_layernorm", vision + ("post_norm",))
  rows += _layer_rows("text_model", text, config.text)
  rows += _layer_rows("vision_model", vision, config.vision)
  return rows


def _variable(module: nnx.Module, path: tuple[Any, ...]) -> nnx.Variable:
  node = module
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


def read_config(path: str | os.PathLike) -> CLIPConfig:
  path = epath.Path(path)
  if not path.is_dir():
    raise UserError(f"CLIP directory {os.fspath(path)!r} does not exist; pass a Hugging Face "
                    "CLIP directory (config.json, model.safetensors, tokenizer files)")
  return CLIPConfig.from_hf_json(weight_io.read_json(path / "config.json",
                                                     "a Hugging Face CLIP config"))


def load_clip(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=None) -> CLIP:
  """Loads a Hugging Face `CLIPModel` directory (local or gs://).

  The weights stay on the host (numpy); callers place them (`jax.device_put` with
  `parallel.rules.state_shardings`). `param_dtype` defaults to `dtype`.
  """
  path = epath.Path(path)
  config = read_config(path)
  param_dtype = dtype if param_dtype is None else param_dtype
  rows = hf_key_map(config)
  weights = weight_io.read_hf_weights(path, [row[1] for row in rows])
  module = nnx.eval_shape(lambda: CLIP(config, dtype=dtype, param_dtype=param_dtype,
                                       rngs=nnx.Rngs(0)))
  for ours, key, to_ours, _ in rows:
    variable = _variable(module, ours)
    try:
      value = np.asarray(to_ours(weights[key]))
    except ValueError as e:  # a reshape that cannot work
      raise UserError(f"CLIP tensor {key!r} has shape {weights[key].shape}, which does not "
                      f"fit config.json ({e})") from e
    if tuple(value.shape) != tuple(variable.shape):
      raise UserError(f"CLIP tensor {key!r} has shape {weights[key].shape}; config.json "
                      f"implies {tuple(variable.shape)} (after transposing HF's [out, in]);"
                      " the config and the weights do not belong together")
    variable.set_value(value.astype(np.dtype(param_dtype)))
  return module


def clip_to_hf(module: CLIP) -> dict[str, np.ndarray]:
  """The module's weights as a Hugging Face `CLIPModel` state dict."""
  tensors = {}
  for ours, key, _, to_hf in hf_key_map(module.config):
    value = np.asarray(jax.device_get(_variable(module, ours)[...]))
    tensors[key] = np.array(to_hf(value), order="C")  # keeps 0-d logit_scale 0-d
  return tensors


def random_clip(config: CLIPConfig, seed: int = 0, spread: float = 0.0) -> CLIP:
  """A CLIP with random weights drawn by numpy, for tests: no XLA program to compile (on
  CPU, compiling ~100 threefry draws takes tens of seconds). Kernels are N(0, 1/fan_in),
  layer-norm scales 1, other vectors 0, `logit_scale` the config's; with `spread > 0` the
  vectors and scalars get N(0, spread²) added, so a test of the weight layout sees every
  tensor. Same seed, same weights."""
  rng = np.random.default_rng(seed)
  module = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
  for path, variable in nnx.to_flat_state(nnx.state(module)):
    shape = tuple(variable.shape)
    if len(shape) >= 2:
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    else:
      base = 1.0 if path[-1] == "scale" else 0.0
      if path == ("logit_scale",):
        base = config.logit_scale_init_value
      value = base + spread * rng.normal(size=shape)
    _variable(module, path).set_value(jnp.asarray(value, variable.dtype))
  return module


def save_clip(path: str | os.PathLike, module: CLIP) -> str:
  """Writes `config.json` and `model.safetensors` in the Hugging Face layout, which
  `load_clip` and transformers' `CLIPModel.from_pretrained` read. The tokenizer and
  preprocessor files are written by `imagen_jax.text.clip_tokenizer.save_tokenizer` and
  `imagen_jax.eval.clip_score.save_preprocessor_config`."""
  import safetensors.numpy
  path = epath.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(module.config.to_hf_json(), indent=2) + "\n")
  data = safetensors.numpy.save(clip_to_hf(module), metadata={"format": "pt"})
  (path / "model.safetensors").write_bytes(data)
  return os.fspath(path)
