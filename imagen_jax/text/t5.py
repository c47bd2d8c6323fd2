"""A Flax NNX T5 encoder, with loading from Hugging Face checkpoints.

Imagen (Saharia et al. 2022, §2.1) conditions on a frozen T5-XXL encoder. This is the T5
encoder of Raffel et al. 2020 (§2.1 "Model") in the two published variants:

- v1.0: feed-forward `wo(relu(wi x))`;
- v1.1 (and Flan-T5): gated GELU, `wo(gelu_tanh(wi_0 x) * wi_1 x)` (Shazeer 2020, "GLU
  variants improve Transformer"); Hugging Face calls it `feed_forward_proj="gated-gelu"`.

Both use, per layer, pre-norm residual blocks `x + SelfAttention(RMSNorm(x))` and
`x + FeedForward(RMSNorm(x))`, where RMSNorm is T5's layer norm: `scale * x /
sqrt(mean(x²) + eps)`, with no mean subtraction and no bias. No dense layer has a bias.
Attention logits are NOT divided by sqrt(d_kv): T5 folds that factor into the
initialisation of the query weights. A learned scalar bias per head and per relative-position
bucket (`relative_position_bucket`, bidirectional) is computed once, in the first layer, and
added to the logits of every layer. A final RMSNorm follows the last layer. Dropout is off:
this module is for inference only (the encoder is frozen).

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`,
`relpos_buckets`) as `out_sharding` metadata, which `imagen_jax.parallel.rules` maps to mesh
axes, so the 4.6B-parameter XXL encoder can be sharded over a pod.

Checkpoints use the Hugging Face layout: `config.json` plus `model.safetensors` or sharded
safetensors with `model.safetensors.index.json`. Only `encoder.*` tensors and the token
embedding are read (decoder tensors are ignored). Hugging Face `nn.Linear` weights are stored
`[out, in]`; we keep kernels `[in, ...out]` and transpose on load and save.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from imagen_jax import files
from imagen_jax import weights as weight_io
from imagen_jax.errors import UserError

# Hugging Face's names for the activation of the feed-forward ("gated-gelu" is the tanh
# approximation, `gelu_new` in transformers; plain "gelu" is the exact erf form).
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}
_NEG_INF = -1e30  # logits of masked keys; finite, so an all-padding row stays finite


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The fields of a Hugging Face T5 `config.json` that the encoder needs."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"  # "relu" (v1.0) or "gated-gelu" (v1.1)

  def __post_init__(self):
    parts = self.feed_forward_proj.split("-")
    ok = (len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated")) and (
        parts[-1] in ("relu", "gelu", "silu"))
    if not ok:
      raise UserError(f"unsupported T5 feed_forward_proj {self.feed_forward_proj!r}; "
                      "supported: relu, gelu, silu and their gated- forms (v1.0 is "
                      "'relu', v1.1 'gated-gelu')")
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      if int(getattr(self, name)) <= 0:
        raise UserError(f"T5 config {name}={getattr(self, name)} must be positive")

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation_name(self) -> str:
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"  # as transformers' T5Config does
    return self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_hf_json(cls, config: Mapping[str, Any]) -> "T5Config":
    """Reads a Hugging Face T5 config dict (unknown keys are ignored)."""
    if config.get("model_type", "t5") not in ("t5", "mt5", "umt5"):
      raise UserError(f"config.json has model_type={config.get('model_type')!r}; "
                      "expected a T5 checkpoint ('t5', 'mt5' or 'umt5')")
    if config.get("model_type") == "umt5":
      # umT5 gives every layer its own relative position bias; this encoder shares one.
      raise UserError("umT5 checkpoints (a relative position bias per layer) are not "
                      "supported; use T5 v1.0/v1.1, Flan-T5 or mT5")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in fields}
    if "num_layers" not in kwargs and "num_hidden_layers" in config:
      kwargs["num_layers"] = config["num_hidden_layers"]
    return cls(**kwargs)

  def to_hf_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out.update(model_type="t5", architectures=["T5EncoderModel"],
               dense_act_fn=self.activation_name, is_gated_act=self.is_gated,
               is_encoder_decoder=True, tie_word_embeddings=True, dropout_rate=0.0,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
               num_decoder_layers=self.num_layers)
    return out


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """T5's bidirectional relative-position buckets (Raffel et al. 2020, §2.1).

  `relative_position = key_pos - query_pos`. Half the buckets hold keys after the query.
  Within a half, distances below `num_buckets // 4` get a bucket each, and larger distances
  share buckets that grow logarithmically up to `max_distance`, beyond which all distances
  share the last bucket. Same integer arithmetic as mesh-tensorflow and transformers.
  """
  num_buckets //= 2
  buckets = (relative_position > 0).astype(np.int32) * num_buckets
  distance = np.abs(relative_position)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):  # log(0) where distance == 0 is masked by is_small
    large = max_exact + (
        np.log(np.maximum(distance, 1).astype(np.float32) / max_exact)
        / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  large = np.minimum(large, num_buckets - 1)
  return buckets + np.where(distance < max_exact, distance, large)


def _param(rngs: nnx.Rngs, shape, std: float, names: tuple[str, ...], dtype) -> nnx.Param:
  value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  # eager_sharding=False: sharding is applied by the caller (parallel/rules.py), so the
  # module can be built without a mesh in scope.
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
  """T5LayerNorm: `scale * x / sqrt(mean(x²) + eps)`, computed in float32."""

  def __init__(self, dim: int, eps: float, *, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",),
                           eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return x * self.scale[...].astype(jnp.float32)


class SelfAttention(nnx.Module):
  """Multi-head self-attention without biases and without 1/sqrt(d_kv) scaling."""

  def __init__(self, config: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, h, k = config.d_model, config.num_heads, config.d_kv
    self.dtype = dtype
    # Mesh-TF / transformers initialisation; the query's extra 1/sqrt(d_kv) replaces the
    # usual scaling of the logits.
    self.query = _param(rngs, (d, h, k), (d * k) ** -0.5, ("embed", "heads", "kv"),
                        param_dtype)
    self.key = _param(rngs, (d, h, k), d ** -0.5, ("embed", "heads", "kv"), param_dtype)
    self.value = _param(rngs, (d, h, k), d ** -0.5, ("embed", "heads", "kv"), param_dtype)
    self.out = _param(rngs, (h, k, d), (h * k) ** -0.5, ("heads", "kv", "embed"),
                      param_dtype)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """x [B, L, D] float32; bias [B, H, L, L] float32 (position bias + mask)."""
    dt = self.dtype
    x = x.astype(dt)
    q = jnp.einsum("bld,dhk->blhk", x, self.query[...].astype(dt))
    k = jnp.einsum("bld,dhk->blhk", x, self.key[...].astype(dt))
    v = jnp.einsum("bld,dhk->blhk", x, self.value[...].astype(dt))
    logits = jnp.einsum("bqhk,bmhk->bhqm", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(dt)
    attended = jnp.einsum("bhqm,bmhk->bqhk", weights, v)
    return jnp.einsum("blhk,hkd->bld", attended, self.out[...].astype(dt),
                      preferred_element_type=jnp.float32)


class FeedForward(nnx.Module):
  """`wo(act(wi x))` (v1.0) or `wo(act(wi_0 x) * wi_1 x)` (gated, v1.1)."""

  def __init__(self, config: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = config.d_model, config.d_ff
    self.dtype = dtype
    self.activation = _ACTIVATIONS[config.activation_name]
    self.gated = config.is_gated
    self.wi = _param(rngs, (d, f), d ** -0.5, ("embed", "mlp"), param_dtype)
    if self.gated:
      self.wi_gate = _param(rngs, (d, f), d ** -0.5, ("embed", "mlp"), param_dtype)
    self.wo = _param(rngs, (f, d), f ** -0.5, ("mlp", "embed"), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    x = x.astype(dt)
    # In the gated form `wi` is HF's wi_0 (through the activation), `wi_gate` is wi_1.
    h = self.activation(jnp.einsum("bld,df->blf", x, self.wi[...].astype(dt)))
    if self.gated:
      h = h * jnp.einsum("bld,df->blf", x, self.wi_gate[...].astype(dt))
    return jnp.einsum("blf,fd->bld", h.astype(dt), self.wo[...].astype(dt),
                      preferred_element_type=jnp.float32)


class EncoderLayer(nnx.Module):

  def __init__(self, config: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    eps = config.layer_norm_epsilon
    self.attention_norm = RMSNorm(config.d_model, eps, param_dtype=param_dtype)
    self.attention = SelfAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps, param_dtype=param_dtype)
    self.mlp = FeedForward(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), bias)
    return x + self.mlp(self.mlp_norm(x))


class T5Encoder(nnx.Module):
  """The T5 encoder stack. `dtype` is the compute dtype of the matmuls; the residual stream,
  norms and softmax stay in float32 and the output is float32."""

  def __init__(self, config: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.embedding = _param(rngs, (config.vocab_size, config.d_model), 1.0,
                            ("vocab", "embed"), param_dtype)
    self.relative_attention_bias = _param(
        rngs, (config.relative_attention_num_buckets, config.num_heads),
        config.d_model ** -0.5, ("relpos_buckets", "heads"), param_dtype)
    self.layers = nnx.List([
        EncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon,
                              param_dtype=param_dtype)

  def position_bias(self, length: int) -> jax.Array:
    """[1, H, L, L] bias from the first layer's table, shared by every layer."""
    positions = np.arange(length)
    buckets = relative_position_bucket(
        positions[None, :] - positions[:, None], self.config.relative_attention_num_buckets,
        self.config.relative_attention_max_distance)
    table = self.relative_attention_bias[...].astype(jnp.float32)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """input_ids [B, L] int; attention_mask [B, L] (nonzero = real token) -> [B, L, D]."""
    length = input_ids.shape[1]
    x = jnp.take(self.embedding[...], input_ids, axis=0).astype(jnp.float32)
    mask = attention_mask.astype(bool)[:, None, None, :]
    bias = jnp.where(mask, self.position_bias(length), _NEG_INF)
    for layer in self.layers:
      x = layer(x, bias)
    return self.final_norm(x)


# --- Hugging Face checkpoint layout ----------------------------------------------------

def _to_nnx_3d(heads: int, d_kv: int, out: bool):
  """HF [out, in] Linear weight <-> our [D, H, K] (q, k, v) or [H, K, D] (o) kernel."""
  if out:  # o: HF [D, H*K] -> [H, K, D]
    return (lambda w: w.T.reshape(heads, d_kv, -1),
            lambda k: k.reshape(heads * d_kv, -1).T)
  return (lambda w: w.T.reshape(-1, heads, d_kv),  # q/k/v: HF [H*K, D] -> [D, H, K]
          lambda k: k.reshape(k.shape[0], heads * d_kv).T)


def hf_key_map(config: T5Config) -> list[tuple[tuple[Any, ...], str, Callable, Callable]]:
  """(path in the NNX state, HF key, HF->ours, ours->HF) for every parameter."""
  h, k = config.num_heads, config.d_kv
  same = (lambda w: w, lambda w: w)
  linear = (lambda w: w.T, lambda w: w.T)
  qkv = _to_nnx_3d(h, k, out=False)
  out = _to_nnx_3d(h, k, out=True)
  rows = [(("embedding",), "encoder.embed_tokens.weight", *same),
          (("relative_attention_bias",),
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", *same),
          (("final_norm", "scale"), "encoder.final_layer_norm.weight", *same)]
  for i in range(config.num_layers):
    pre = f"encoder.block.{i}.layer"
    ours = ("layers", i)
    rows += [
        (ours + ("attention_norm", "scale"), f"{pre}.0.layer_norm.weight", *same),
        (ours + ("attention", "query"), f"{pre}.0.SelfAttention.q.weight", *qkv),
        (ours + ("attention", "key"), f"{pre}.0.SelfAttention.k.weight", *qkv),
        (ours + ("attention", "value"), f"{pre}.0.SelfAttention.v.weight", *qkv),
        (ours + ("attention", "out"), f"{pre}.0.SelfAttention.o.weight", *out),
        (ours + ("mlp_norm", "scale"), f"{pre}.1.layer_norm.weight", *same),
        (ours + ("mlp", "wo"), f"{pre}.1.DenseReluDense.wo.weight", *linear),
    ]
    if config.is_gated:
      rows += [(ours + ("mlp", "wi"), f"{pre}.1.DenseReluDense.wi_0.weight", *linear),
               (ours + ("mlp", "wi_gate"), f"{pre}.1.DenseReluDense.wi_1.weight", *linear)]
    else:
      rows += [(ours + ("mlp", "wi"), f"{pre}.1.DenseReluDense.wi.weight", *linear)]
  return rows


_EMBEDDING_KEYS = ("encoder.embed_tokens.weight", "shared.weight")


def read_config(path: str | os.PathLike) -> T5Config:
  path = epath.Path(path)
  if not path.is_dir():
    raise UserError(f"T5 checkpoint directory {os.fspath(path)!r} does not exist; pass a "
                    "directory with config.json and model.safetensors (Hugging Face layout)")
  config_file = path / "config.json"
  if not config_file.exists():
    raise UserError(f"{config_file} is missing; a T5 checkpoint directory needs "
                    "config.json next to its safetensors weights")
  try:
    return T5Config.from_hf_json(json.loads(config_file.read_text()))
  except (ValueError, TypeError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"{config_file} is not a valid T5 config: {e}") from e


def _read_encoder_weights(path: epath.Path, config: T5Config) -> dict[str, np.ndarray]:
  """HF key -> array for every tensor the encoder needs (decoder keys are ignored)."""
  files = weight_io.weight_files(path)
  needed = [row[1] for row in hf_key_map(config)]
  embedding = next((k for k in _EMBEDDING_KEYS if k in files), None)
  if embedding is None:
    raise UserError(f"checkpoint {path} has no token embedding: expected "
                    f"{' or '.join(_EMBEDDING_KEYS)}")
  sources = {key: key for key in needed}
  sources["encoder.embed_tokens.weight"] = embedding
  missing = [src for src in sources.values() if src not in files]
  if missing:
    raise UserError(f"checkpoint {path} lacks {len(missing)} encoder tensor(s), first "
                    f"{missing[0]!r}; is it a T5 checkpoint with config.json's num_layers="
                    f"{config.num_layers} and feed_forward_proj="
                    f"{config.feed_forward_proj!r}?")
  raw = weight_io.read_hf_weights(path, sources.values(), files)
  return {key: raw[src] for key, src in sources.items()}


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
  """sha256 over (key, dtype, shape, bytes) of the encoder tensors, in key order.

  It identifies the encoder weights whatever the file layout (single or sharded, tied or
  untied embedding keys, extra decoder tensors), so a cache made from one copy of a
  checkpoint is accepted with another copy.
  """
  digest = hashlib.sha256()
  for key in sorted(weights):
    array = np.ascontiguousarray(weights[key])
    digest.update(f"{key}|{array.dtype.str}|{array.shape}\n".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _get_variable(module: nnx.Module, path: tuple[Any, ...]) -> nnx.Variable:
  node = module
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


class Encoder:
  """A loaded, frozen T5 encoder: `encoder(input_ids, attention_mask) -> [B, L, d_model]`.

  `graphdef` and `state` are the split module; `apply(state, ids, mask)` is the pure
  function (jit it with shardings of your own, as `encode.TextEncoder` does). After
  `load_encoder` the state holds host (numpy) arrays. Calling the object copies them to
  the default device once, and then runs a jitted `apply`.
  """

  def __init__(self, module: T5Encoder, *, name: str, weights_sha256: str):
    self.config: T5Config = module.config
    self.name = name
    self.weights_sha256 = weights_sha256
    self.dtype = module.dtype
    self.graphdef, self.state = nnx.split(module)  # host (numpy) arrays after load_encoder
    self._jitted = jax.jit(self.apply)
    self._device_state = None

  def apply(self, state, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return nnx.merge(self.graphdef, state)(input_ids, attention_mask)

  def __call__(self, input_ids, attention_mask) -> jax.Array:
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, bool)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise UserError(f"encoder expects input_ids and attention_mask of one shape [B, L]; "
                      f"got {input_ids.shape} and {attention_mask.shape}")
    if self._device_state is None:
      self._device_state = jax.device_put(self.state)
    return self._jitted(self._device_state, input_ids, attention_mask)

  def __repr__(self):
    c = self.config
    return (f"Encoder({self.name!r}, d_model={c.d_model}, layers={c.num_layers}, "
            f"heads={c.num_heads}, ff={c.feed_forward_proj})")


def load_encoder(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=None,
                 name: str | None = None) -> Encoder:
  """Loads the encoder of a Hugging Face T5 checkpoint directory.

  Args:
    path: directory with `config.json` and `model.safetensors` (or shards listed in
      `model.safetensors.index.json`); local or gs://.
    dtype: compute dtype of the matmuls (float32 or bfloat16). Output is float32.
    param_dtype: dtype the weights are held in; defaults to `dtype` (bf16 halves the
      memory of T5-XXL, 4.6B parameters: 9.2 GB instead of 18.4 GB).
    name: the encoder's name in identities; defaults to config.json's `_name_or_path`,
      else the directory name.
  """
  path = epath.Path(path)
  config = read_config(path)
  param_dtype = dtype if param_dtype is None else param_dtype
  weights = _read_encoder_weights(path, config)
  abstract = nnx.eval_shape(lambda: T5Encoder(config, dtype=dtype, param_dtype=param_dtype,
                                              rngs=nnx.Rngs(0)))
  for ours, key, to_ours, _ in hf_key_map(config):
    variable = _get_variable(abstract, ours)
    expected = tuple(variable.shape)
    try:
      value = to_ours(weights[key])
    except ValueError as e:  # a reshape that cannot work
      raise UserError(f"checkpoint tensor {key!r} has shape {weights[key].shape}, which "
                      f"does not fit config.json ({e})") from e
    if tuple(value.shape) != expected:
      raise UserError(f"checkpoint tensor {key!r} has shape {weights[key].shape}; "
                      f"config.json implies {expected} (after transposing HF's [out, in]);"
                      " the config and the weights do not belong together")
    # Kept on the host: the caller places the weights (TextEncoder shards them over the
    # mesh), so T5-XXL is never gathered on one device.
    variable.set_value(np.asarray(value).astype(np.dtype(param_dtype)))
  if name is None:
    config_json = json.loads((path / "config.json").read_text())
    name = config_json.get("_name_or_path") or path.name
  return Encoder(abstract, name=str(name), weights_sha256=weights_sha256(weights))


def encoder_to_hf(module: T5Encoder) -> dict[str, np.ndarray]:
  """The module's weights as a Hugging Face state dict (embedding as `shared.weight`)."""
  tensors = {}
  for ours, key, _, to_hf in hf_key_map(module.config):
    value = np.asarray(jax.device_get(_get_variable(module, ours)[...]))
    tensors[key] = np.ascontiguousarray(to_hf(value))
  tensors["shared.weight"] = tensors.pop("encoder.embed_tokens.weight")
  return tensors


def random_encoder(config: T5Config, seed: int = 0,
                   position_bias_std: float | None = None) -> T5Encoder:
  """A T5 encoder with random weights (T5's initialisation). Same seed -> same weights.

  `position_bias_std` replaces the initial scale of the relative position bias (T5's
  d_model ** -0.5, which training grows); larger makes attention depend on word order.
  """
  module = T5Encoder(config, rngs=nnx.Rngs(seed))
  if position_bias_std is not None:
    bias = module.relative_attention_bias
    bias[...] = bias[...] * (position_bias_std * config.d_model ** 0.5)
  return module


def save_encoder(path: str | os.PathLike, module: T5Encoder,
                 spiece_model: str | os.PathLike | None = None) -> str:
  """Writes an encoder in the HF layout, which `load_encoder` reads back.

  `config.json`, `model.safetensors` (HF key names and `[out, in]` layout, tied embedding
  as `shared.weight`) and, if given, a copy of `spiece_model` as `spiece.model`.
  """
  import safetensors.numpy
  path = epath.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  files.write_atomic(path / "config.json",
                     json.dumps(module.config.to_hf_json(), indent=2) + "\n")
  # safetensors writes local files only; build the bytes and write them through epath.
  data = safetensors.numpy.save(encoder_to_hf(module), metadata={"format": "np"})
  files.write_atomic(path / "model.safetensors", data)
  if spiece_model is not None:
    source = epath.Path(spiece_model)
    if not source.exists():
      raise UserError(f"sentencepiece model {os.fspath(source)!r} does not exist")
    files.write_atomic(path / "spiece.model", source.read_bytes())
  return os.fspath(path)


def save_random_encoder(path: str | os.PathLike, config: T5Config, seed: int = 0,
                        spiece_model: str | os.PathLike | None = None,
                        position_bias_std: float | None = None) -> str:
  """`save_encoder(path, random_encoder(...))`: for tests, which have no pretrained T5."""
  return save_encoder(path, random_encoder(config, seed, position_bias_std), spiece_model)
