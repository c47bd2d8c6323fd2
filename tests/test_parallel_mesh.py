"""parallel/mesh.py: mesh specs, the mesh and the batch sharding (8 simulated devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from imagen_jax.errors import UserError
from imagen_jax.parallel import mesh as mesh_lib


def test_parse_mesh_spec():
  assert mesh_lib.parse_mesh_spec("data:8,fsdp:4") == {"data": 8, "fsdp": 4}
  assert mesh_lib.parse_mesh_spec(" tensor:2 , data:-1") == {"tensor": 2, "data": -1}


@pytest.mark.parametrize("spec, words", [
    ("model:2", "unknown mesh axis 'model'"),
    ("data:two", "size 'two'"),
    ("data:0", "size 0"),
    ("data:2,data:4", "appears twice"),
    ("data", "no size"),
    ("", "empty"),
])
def test_parse_mesh_spec_errors(spec, words):
  with pytest.raises(UserError, match=words):
    mesh_lib.parse_mesh_spec(spec)


def test_make_mesh_fills_axes(devices):
  mesh = mesh_lib.make_mesh("fsdp:4,tensor:2")
  assert mesh.axis_names == mesh_lib.MESH_AXES
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert dict(mesh_lib.make_mesh("data:-1,tensor:2").shape) == {"data": 4, "fsdp": 1,
                                                                "tensor": 2}
  assert dict(mesh_lib.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert mesh_lib.data_parallel_size(mesh_lib.make_mesh({"data": 2, "fsdp": 4})) == 8
  small = mesh_lib.make_mesh({"fsdp": -1}, devices=devices[:2])
  assert dict(small.shape) == {"data": 1, "fsdp": 2, "tensor": 1}
  assert set(small.devices.flat) == set(devices[:2])


@pytest.mark.parametrize("shape, words", [
    ("data:3", "has 3 devices but there are 8"),
    ("data:3,fsdp:-1", "do not divide the 8 devices"),
    ("data:-1,fsdp:-1", "more than one axis"),
    ({"pipeline": 2}, "unknown mesh axis 'pipeline'"),
])
def test_make_mesh_errors(shape, words):
  with pytest.raises(UserError, match=words):
    mesh_lib.make_mesh(shape)


def test_batch_sharding_splits_rows_over_data_and_fsdp(devices):
  assert mesh_lib.batch_spec(4) == PartitionSpec(("data", "fsdp"), None, None, None)
  mesh = mesh_lib.make_mesh("data:2,fsdp:2,tensor:2")
  x = jax.device_put(np.arange(8 * 3).reshape(8, 3), mesh_lib.batch_sharding(mesh, 2))
  # 4-way batch split (data x fsdp), replicated over tensor: each device holds 2 rows.
  shards = x.addressable_shards
  assert len(shards) == 8 and all(s.data.shape == (2, 3) for s in shards)
  assert len({s.index[0].start for s in shards}) == 4
