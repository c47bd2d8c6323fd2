"""parallel/rules.py: logical axis names -> mesh axes, on abstract models only."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from imagen_jax.nn import EfficientUNet, UNet
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import rules

TINY = dict(text_dim=8, model_channels=16, head_dim=8, num_groups=4)


def test_logical_to_mesh():
  assert rules.logical_to_mesh(("batch", None, "length")) == PartitionSpec(
      ("data", "fsdp"), None, None)
  assert rules.logical_to_mesh(("embed", "mlp")) == PartitionSpec("fsdp", "tensor")
  conv_axes = ("conv_height", "conv_width", "conv_in", "conv_out")
  assert rules.logical_to_mesh(conv_axes) == PartitionSpec(None, None, None, "fsdp")
  # A mesh axis is used once per array: the second 'embed' is replicated.
  assert rules.logical_to_mesh(("embed", "embed")) == PartitionSpec("fsdp", None)
  # batch takes fsdp, so the weight-like dim after it cannot.
  assert rules.logical_to_mesh(("batch", "embed")) == PartitionSpec(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="'pixels' has no rule"):
    rules.logical_to_mesh(("pixels",))


def test_t5_names_have_rules():
  names = {name for name, _ in rules.LOGICAL_AXIS_RULES}
  assert {"embed", "vocab", "heads", "kv", "mlp", "relpos_buckets", "batch", "length",
          "text_embed", "norm"} <= names
  assert rules.logical_to_mesh(("vocab", "embed")) == PartitionSpec("tensor", "fsdp")
  assert rules.logical_to_mesh(("relpos_buckets", "heads")) == PartitionSpec(None,
                                                                             "tensor")


@pytest.mark.parametrize("ctor", [
    lambda: UNet(image_size=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), rngs=nnx.Rngs(0), **TINY),
    lambda: EfficientUNet(image_size=16, lowres_size=8, channel_mult=(1, 2),
                          num_res_blocks=(1, 2), self_attention=False, rngs=nnx.Rngs(0),
                          **TINY),
    lambda: EfficientUNet(image_size=16, lowres_size=8, channel_mult=(1, 2),
                          num_res_blocks=(1, 1), self_attention=True, rngs=nnx.Rngs(0),
                          **TINY),
], ids=["unet", "efficient_unet", "efficient_unet_self_attention"])
def test_every_parameter_has_a_partition_spec(ctor, devices):
  abstract = nnx.eval_shape(ctor)
  params = nnx.state(abstract, nnx.Param)
  mesh = mesh_lib.make_mesh("fsdp:4,tensor:2")
  shardings = rules.state_shardings(params, mesh)
  used_axes = set()
  leaves = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert len(leaves) == len(sharding_leaves) > 20
  for (path, var), sharding_var in zip(leaves, sharding_leaves):
    names = rules.variable_logical_axes(var)
    where = jax.tree_util.keystr(path)
    assert names is not None, f"{where} has no logical axis names"
    assert len(names) == var.get_value().ndim, f"{where}: {names} vs {var.get_value().shape}"
    assert all(n is not None for n in names), f"{where}: {names}"
    spec = rules.logical_to_mesh(names)  # raises for a name without a rule
    sharding = sharding_var.get_value()
    assert sharding.mesh == mesh
    for dim, axes in zip(var.get_value().shape, sharding.spec):
      if axes is not None:
        size = 1
        for a in ((axes,) if isinstance(axes, str) else axes):
          size *= mesh.shape[a]
          used_axes.add(a)
        assert dim % size == 0
    assert len(sharding.spec) <= len(spec)
  # The rules really split weights over both model-parallel axes.
  assert {"fsdp", "tensor"} <= used_axes


def test_indivisible_dimension_is_replicated(devices):
  mesh = mesh_lib.make_mesh("fsdp:4,tensor:2")
  spec = rules.fit_spec_to_shape(PartitionSpec("fsdp", "tensor"), (6, 4), mesh)
  assert spec == PartitionSpec(None, "tensor")
