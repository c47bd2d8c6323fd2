"""The Flax T5 encoder against an independent numpy implementation of the T5 equations.

The reference below is written from Raffel et al. 2020 §2.1 and the Hugging Face / Mesh-TF
conventions (weights `[out, in]`, `y = x @ W.T`), on the raw tensors of the checkpoint file,
sharing no code with `imagen_jax.text.t5`.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from imagen_jax.errors import UserError
from imagen_jax.parallel import rules
from imagen_jax.text import t5

V10 = dict(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=12,
           layer_norm_epsilon=1e-6, feed_forward_proj="relu", model_type="t5")
V11 = dict(V10, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
           relative_attention_max_distance=128, num_layers=3)


# --- numpy reference -------------------------------------------------------------------

def ref_bucket(rel, num_buckets, max_distance):
  """T5 bidirectional bucket of one relative position (key - query), scalar arithmetic."""
  half = num_buckets // 2
  bucket = half if rel > 0 else 0
  n = abs(rel)
  exact = half // 2
  if n < exact:
    return bucket + n
  large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact))
  return bucket + min(large, half - 1)


def ref_rms_norm(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def ref_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_encoder(w, cfg, ids, mask):
  """T5 encoder in float64 numpy, on Hugging Face tensors `w` (key -> [out, in])."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  heads, dkv, eps = cfg["num_heads"], cfg["d_kv"], cfg["layer_norm_epsilon"]
  emb = w.get("encoder.embed_tokens.weight", w.get("shared.weight"))
  x = emb[ids]                                               # [B, L, D]
  B, L = ids.shape
  table = w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
  bias = np.zeros((heads, L, L))
  for q in range(L):
    for k in range(L):
      bias[:, q, k] = table[ref_bucket(k - q, cfg["relative_attention_num_buckets"],
                                       cfg["relative_attention_max_distance"])]
  neg = np.where(mask, 0.0, np.finfo(np.float32).min)[:, None, None, :]  # HF's extended mask

  def split(t):  # [B, L, H*K] -> [B, H, L, K]
    return t.reshape(B, L, heads, dkv).transpose(0, 2, 1, 3)

  for i in range(cfg["num_layers"]):
    p = f"encoder.block.{i}.layer."
    h = ref_rms_norm(x, w[p + "0.layer_norm.weight"], eps)
    q, k, v = (split(h @ w[p + f"0.SelfAttention.{n}.weight"].T) for n in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) + bias[None] + neg   # no 1/sqrt(d_kv)
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    att = (probs @ v).transpose(0, 2, 1, 3).reshape(B, L, heads * dkv)
    x = x + att @ w[p + "0.SelfAttention.o.weight"].T
    h = ref_rms_norm(x, w[p + "1.layer_norm.weight"], eps)
    if cfg["feed_forward_proj"] == "gated-gelu":
      ff = ref_gelu_tanh(h @ w[p + "1.DenseReluDense.wi_0.weight"].T) * (
          h @ w[p + "1.DenseReluDense.wi_1.weight"].T)
    else:
      ff = np.maximum(h @ w[p + "1.DenseReluDense.wi.weight"].T, 0.0)
    x = x + ff @ w[p + "1.DenseReluDense.wo.weight"].T
  return ref_rms_norm(x, w["encoder.final_layer_norm.weight"], eps)


# --- checkpoints written by the test itself ---------------------------------------------

def random_hf_weights(cfg, seed, *, tied):
  """Random tensors under HF names, with random (not unit) layer-norm scales."""
  rng = np.random.default_rng(seed)
  d, f, inner = cfg["d_model"], cfg["d_ff"], cfg["num_heads"] * cfg["d_kv"]

  def r(*shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  w = {("shared.weight" if tied else "encoder.embed_tokens.weight"): r(cfg["vocab_size"], d,
                                                                        scale=1.0),
       "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
           r(cfg["relative_attention_num_buckets"], cfg["num_heads"], scale=1.0),
       "encoder.final_layer_norm.weight": 1.0 + r(d)}
  for i in range(cfg["num_layers"]):
    p = f"encoder.block.{i}.layer."
    w[p + "0.layer_norm.weight"] = 1.0 + r(d)
    for n in "qkv":
      w[p + f"0.SelfAttention.{n}.weight"] = r(inner, d)
    w[p + "0.SelfAttention.o.weight"] = r(d, inner)
    w[p + "1.layer_norm.weight"] = 1.0 + r(d)
    names = ["wi_0", "wi_1"] if cfg["feed_forward_proj"] == "gated-gelu" else ["wi"]
    for n in names:
      w[p + f"1.DenseReluDense.{n}.weight"] = r(f, d)
    w[p + "1.DenseReluDense.wo.weight"] = r(d, f)
  return w


def write_checkpoint(path, cfg, w, *, sharded, extra=None):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  tensors = dict(w, **(extra or {}))
  if not sharded:
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
    return path
  keys = sorted(tensors)
  parts = [keys[::2], keys[1::2]]
  weight_map = {}
  for j, part in enumerate(parts):
    name = f"model-{j + 1:05d}-of-00002.safetensors"
    safetensors.numpy.save_file({k: tensors[k] for k in part}, str(path / name))
    weight_map.update({k: name for k in part})
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("t5")
  # v1.0: single file, untied embedding key, plus decoder tensors that must be ignored.
  w10 = random_hf_weights(V10, 0, tied=False)
  decoder = {"decoder.block.0.layer.0.SelfAttention.q.weight": np.ones((3, 3), np.float32),
             "lm_head.weight": np.ones((40, 32), np.float32)}
  write_checkpoint(root / "v10", V10, w10, sharded=False, extra=decoder)
  # v1.1: sharded with an index, tied embedding stored only as shared.weight.
  w11 = random_hf_weights(V11, 1, tied=True)
  write_checkpoint(root / "v11", V11, w11, sharded=True)
  return {"v10": (root / "v10", V10, w10), "v11": (root / "v11", V11, w11), "root": root}


def _batch(length, vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(2, length)).astype(np.int32)
  mask = np.zeros((2, length), bool)
  mask[0, :length] = True          # a full row
  mask[1, :length // 2 + 1] = True  # a padded row
  ids[~mask] = 0
  return ids, mask


@pytest.mark.parametrize("variant", ["v10", "v11"])
def test_matches_numpy_reference(checkpoints, variant):
  path, cfg, w = checkpoints[variant]
  encoder = t5.load_encoder(path)
  ids, mask = _batch(16, cfg["vocab_size"])
  out = np.asarray(encoder(ids, mask))
  assert out.shape == (2, 16, cfg["d_model"]) and out.dtype == np.float32
  expected = ref_encoder(w, cfg, ids, mask)
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)
  assert encoder.config.feed_forward_proj == cfg["feed_forward_proj"]
  assert encoder.name == variant


def test_weights_identity_ignores_layout(checkpoints, tmp_path):
  """The same tensors, tied+sharded or untied+single: same weights_sha256; else differs."""
  _, cfg, w = checkpoints["v11"]
  untied = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
            for k, v in w.items()}
  other = write_checkpoint(tmp_path / "single", cfg, untied, sharded=False)
  a, b = t5.load_encoder(checkpoints["v11"][0]), t5.load_encoder(other)
  assert a.weights_sha256 == b.weights_sha256
  assert a.weights_sha256 != t5.load_encoder(checkpoints["v10"][0]).weights_sha256


def test_save_random_encoder_writes_hf_layout(tmp_path):
  cfg = t5.T5Config(**{k: v for k, v in V11.items() if k != "model_type"})
  path = t5.save_random_encoder(tmp_path / "a", cfg, seed=3)
  t5.save_random_encoder(tmp_path / "b", cfg, seed=3)
  data = (tmp_path / "a" / "model.safetensors").read_bytes()
  assert data == (tmp_path / "b" / "model.safetensors").read_bytes()  # deterministic
  w = safetensors.numpy.load_file(str(tmp_path / "a" / "model.safetensors"))
  inner = cfg.num_heads * cfg.d_kv
  assert w["encoder.block.0.layer.0.SelfAttention.q.weight"].shape == (inner, cfg.d_model)
  assert w["encoder.block.0.layer.0.SelfAttention.o.weight"].shape == (cfg.d_model, inner)
  assert w["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"].shape == (cfg.d_ff,
                                                                          cfg.d_model)
  assert "shared.weight" in w
  hf_cfg = json.loads((tmp_path / "a" / "config.json").read_text())
  assert t5.T5Config.from_hf_json(hf_cfg) == cfg
  encoder = t5.load_encoder(path)
  ids, mask = _batch(16, cfg.vocab_size, seed=1)
  np.testing.assert_allclose(np.asarray(encoder(ids, mask)),
                             ref_encoder(w, hf_cfg, ids, mask), rtol=2e-4, atol=2e-4)


def test_padding_does_not_change_real_tokens(checkpoints):
  path, cfg, _ = checkpoints["v11"]
  encoder = t5.load_encoder(path)
  real = np.array([5, 9, 13, 7, 21, 1], np.int32)
  outs = []
  for length in (16, 64):
    ids = np.zeros((1, length), np.int32)
    ids[0, :len(real)] = real
    outs.append(np.asarray(encoder(ids, ids != 0))[0, :len(real)])
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  # bfloat16 compute: float32 output, close to float32 compute.
  bf16 = t5.load_encoder(path, jnp.bfloat16)
  ids = np.zeros((1, 16), np.int32)
  ids[0, :len(real)] = real
  out = np.asarray(bf16(ids, ids != 0))
  assert out.dtype == np.float32
  assert bf16.state["embedding"][...].dtype == jnp.bfloat16
  rel = np.linalg.norm(out[0, :len(real)] - outs[0]) / np.linalg.norm(outs[0])
  assert rel < 0.05, rel


def test_relative_position_buckets():
  rel = np.arange(-203, 204, 7)
  got = t5.relative_position_bucket(rel, 32, 128)
  assert got.tolist() == [ref_bucket(int(r), 32, 128) for r in rel]
  # Keys before the query use buckets [0, 16), after it [16, 32); beyond max_distance all
  # share the last bucket of their half. Hand-computed: 8 + int(log(20/8)/log(16)*8) = 10.
  assert got[rel < 0].max() == 15 and got[rel > 0].min() >= 16 and got[rel == 0] == 0
  assert got[rel == 203] == 31 and got[rel == -203] == 15
  assert t5.relative_position_bucket(np.array([-20, 20, 5, -5]), 32, 128).tolist() == [
      10, 26, 21, 5]


def test_parameters_carry_logical_axes(checkpoints):
  encoder = t5.load_encoder(checkpoints["v11"][0])
  allowed = {"vocab", "embed", "heads", "kv", "mlp", "relpos_buckets"}
  count = 0
  for path, variable in nnx.to_flat_state(encoder.state):
    names = rules.variable_logical_axes(variable)
    assert names is not None and len(names) == variable[...].ndim, (path, names)
    assert set(names) <= allowed, (path, names)
    rules.logical_to_mesh(names)  # every name has a sharding rule
    count += 1
  cfg = V11
  assert count == 3 + cfg["num_layers"] * 9  # 4 attention, 3 gated FF, 2 norms; no biases


def test_config_rejects_unknown_activation():
  with pytest.raises(UserError, match="feed_forward_proj"):
    t5.T5Config.from_hf_json(dict(V10, feed_forward_proj="swish-mish"))


def test_load_errors(checkpoints, tmp_path):
  root = checkpoints["root"]
  with pytest.raises(UserError, match="does not exist"):
    t5.load_encoder(tmp_path / "nowhere")
  (tmp_path / "noconfig").mkdir()
  with pytest.raises(UserError, match="config.json"):
    t5.load_encoder(tmp_path / "noconfig")
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text(json.dumps(V10))
  (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(UserError, match="safetensors"):
    t5.load_encoder(tmp_path / "bin")
  # A missing tensor is named.
  w = dict(checkpoints["v10"][2])
  del w["encoder.block.1.layer.0.SelfAttention.k.weight"]
  write_checkpoint(tmp_path / "missing", V10, w, sharded=False)
  with pytest.raises(UserError, match=r"encoder\.block\.1\.layer\.0\.SelfAttention\.k"):
    t5.load_encoder(tmp_path / "missing")
  # A config that does not fit the weights: the mismatching tensor is named.
  write_checkpoint(tmp_path / "shape", dict(V10, d_ff=64), checkpoints["v10"][2],
                   sharded=False)
  with pytest.raises(UserError, match="DenseReluDense.w.*shape"):
    t5.load_encoder(tmp_path / "shape")
  assert root.exists()
