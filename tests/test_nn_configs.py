"""The model gin configs: paper-size parameter counts (abstract shapes only, never
allocated), tiny configs, gin macros, and `init_model`."""

import math

import gin
import jax
import numpy as np
import pytest
from flax import nnx

from imagen_jax import nn
from imagen_jax.cli import gin_utils
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import rules


def abstract_from(gin_file, bindings=()):
  gin_utils.parse_gin([gin_file], bindings)
  return nn.abstract_model()


@pytest.mark.parametrize("gin_file, paper_params, kind, image_size, lowres_size", [
    ("models/imagen_base64_2b.gin", 2.0e9, nn.UNet, 64, None),
    ("models/imagen_sr256_600m.gin", 600e6, nn.EfficientUNet, 256, 64),
    ("models/imagen_sr1024_400m.gin", 400e6, nn.EfficientUNet, 1024, 256),
])
def test_paper_configs_match_the_paper_sizes(gin_file, paper_params, kind, image_size,
                                             lowres_size, devices):
  model = abstract_from(gin_file)
  assert type(model) is kind
  params = nnx.state(model, nnx.Param)
  # Abstract: shapes only, nothing allocated.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  count = nn.param_count(model)
  assert abs(count - paper_params) / paper_params < 0.10, f"{count:,} parameters"
  assert (model.image_size, model.lowres_size, model.text_dim, model.channels) == (
      image_size, lowres_size, 4096, 3)
  assert model.dtype == np.dtype("bfloat16") and model.remat
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
  # Every parameter has one logical name per dimension, each with a rule.
  for var in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = rules.variable_logical_axes(var)
    assert names is not None and len(names) == len(var.get_value().shape)
    rules.logical_to_mesh(names)
  # FSDP over 8 devices leaves each device about 1/8 of the parameters.
  shardings = rules.state_shardings(params, mesh_lib.make_mesh("fsdp:8"))
  per_device = sum(math.prod(s.shard_shape(v.shape)) for v, s in
                   zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))
  assert per_device < count / 7.9


@pytest.mark.parametrize("gin_file, kind, image_size, lowres_size", [
    ("models/tiny_base.gin", nn.UNet, 16, None),
    ("models/tiny_sr.gin", nn.EfficientUNet, 64, 16),
])
def test_tiny_configs(gin_file, kind, image_size, lowres_size):
  model = abstract_from(gin_file)
  assert type(model) is kind
  assert 1e6 <= nn.param_count(model) <= 4e6
  assert (model.image_size, model.lowres_size, model.text_dim) == (image_size, lowres_size,
                                                                   64)
  # Run files override the macros.
  gin.clear_config()
  model = abstract_from(gin_file, ["TEXT_DIM = 32", "IMAGE_SIZE = 32"])
  assert (model.text_dim, model.image_size) == (32, 32)


def test_tiny_sr_is_fully_convolutional():
  model = abstract_from("models/tiny_sr.gin")
  blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, nn.AttentionBlock)]
  assert blocks and all(b.use_text and not b.self_attention for b in blocks)


def test_init_model_creates_sharded_params(devices):
  gin_utils.parse_gin(["models/tiny_base.gin"], [
      "UNet.model_channels = 16", "UNet.channel_mult = (1,)", "UNet.num_res_blocks = 1",
      "UNet.attention_resolutions = ()", "UNet.head_dim = 8", "UNet.num_groups = 4",
      "TEXT_DIM = 8"])
  mesh = mesh_lib.make_mesh("fsdp:4,tensor:2")
  model = nn.init_model(seed=0, mesh=mesh)
  params = nnx.state(model, nnx.Param)
  expected = rules.state_shardings(params, mesh)
  for value, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    assert value.sharding.is_equivalent_to(sharding, value.ndim)
  assert any(not v.sharding.is_fully_replicated for v in jax.tree.leaves(params))
  # Compiled with nn.INIT_COMPILER_OPTIONS (faster to compile): the same values, bit for
  # bit, as the initialisation compiled with XLA's default options.
  default = jax.jit(lambda: nnx.state(nn.create_model(rngs=nnx.Rngs(0)), nnx.Param))()
  for value, expected in zip(jax.tree.leaves(params), jax.tree.leaves(default)):
    np.testing.assert_array_equal(value, expected)
  # Zero-initialised output layer (each block starts as the identity, as in ADM).
  assert not np.asarray(model.out_conv.kernel[...]).any()
  assert np.asarray(model.input_conv.kernel[...]).std() > 0


@pytest.mark.parametrize("gin_file, image_size, batch_size, optimizer", [
    ("experiments/web_base64.gin", 64, 2048, "adafactor"),
    ("experiments/web_sr256.gin", 256, 4096, "adam"),
])
def test_web_experiments_read_converted_shards(gin_file, image_size, batch_size, optimizer):
  """The LAION/CC12M-style runs of docs/data.md: records: shards and a cache by default,
  paths the user overrides, the paper's model and optimizer underneath."""
  macro = lambda name: gin.query_parameter(f"{name}/macro.value")
  gin_utils.parse_gin([gin_file], finalize=False)  # MODEL_DIR: the user's to set
  assert macro("DATASET") == "records:data/web/records/*.array_record"
  assert macro("CACHE_DIR") == "data/web/t5xxl"
  assert (macro("IMAGE_SIZE"), macro("BATCH_SIZE")) == (image_size, batch_size)
  assert gin.query_parameter("make_optimizer.name") == optimizer
  gin.clear_config()
  gin_utils.parse_gin([gin_file], ["DATASET = 'records:gs://b/laion/*.array_record'",
                                   "CACHE_DIR = 'gs://b/t5xxl'", "MODEL_DIR = 'gs://b/run'"])
  assert macro("DATASET") == "records:gs://b/laion/*.array_record"
  assert (macro("CACHE_DIR"), macro("MODEL_DIR")) == ("gs://b/t5xxl", "gs://b/run")
