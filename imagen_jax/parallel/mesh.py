"""The device mesh: three named axes, ('data', 'fsdp', 'tensor'), as MaxText names them.

- `data`: pure data parallelism (parameters replicated).
- `fsdp`: data parallelism with parameters and optimizer state sharded (ZeRO-3 style).
- `tensor`: attention heads and MLP widths split across devices (Megatron style).

The batch is split over `data` and `fsdp` together. A mesh is written as
`"data:8,fsdp:4,tensor:2"`; missing axes have size 1 and one axis may be `-1`
(all remaining devices).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from imagen_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """Parses `"data:8,fsdp:4"` into `{"data": 8, "fsdp": 4}`.

  Raises UserError for an unknown axis name, a repeated axis, or a size that is not a
  positive integer or -1.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise UserError(f"mesh spec {spec!r} is empty; write it as e.g. 'data:8,fsdp:4' with "
                    f"axes from {MESH_AXES}")
  shape: dict[str, int] = {}
  for part in spec.split(","):
    part = part.strip()
    name, sep, size_text = part.partition(":")
    name = name.strip()
    if not sep:
      raise UserError(f"mesh entry {part!r} in {spec!r} has no size; write NAME:SIZE, "
                      "e.g. 'fsdp:4'")
    if name not in MESH_AXES:
      raise UserError(f"unknown mesh axis {name!r} in {spec!r}; the axes are {MESH_AXES}")
    if name in shape:
      raise UserError(f"mesh axis {name!r} appears twice in {spec!r}")
    try:
      size = int(size_text)
    except ValueError:
      raise UserError(f"mesh axis {name!r} has size {size_text!r} in {spec!r}; sizes are "
                      "positive integers, or -1 for the remaining devices") from None
    if size < 1 and size != -1:
      raise UserError(f"mesh axis {name!r} has size {size} in {spec!r}; sizes are positive "
                      "integers, or -1 for the remaining devices")
    shape[name] = size
  return shape


def resolve_mesh_shape(shape: Mapping[str, int] | str | None,
                       num_devices: int) -> tuple[int, int, int]:
  """Sizes of ('data', 'fsdp', 'tensor') for `num_devices`; fills in -1 and missing axes.

  `None` means pure data parallelism over every device (`data:-1`).
  """
  if shape is None:
    shape = {"data": -1}
  elif isinstance(shape, str):
    shape = parse_mesh_spec(shape)
  else:
    shape = dict(shape)
    for name, size in shape.items():
      if name not in MESH_AXES:
        raise UserError(f"unknown mesh axis {name!r}; the axes are {MESH_AXES}")
      if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
        raise UserError(f"mesh axis {name!r} has size {size!r}; sizes are positive "
                        "integers, or -1 for the remaining devices")
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  described = ",".join(f"{n}:{s}" for n, s in zip(MESH_AXES, sizes))
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise UserError(f"mesh {described} has more than one axis of size -1; at most one axis "
                    "may take the remaining devices")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise UserError(f"mesh {described}: the fixed axes ({fixed} devices) do not divide "
                      f"the {num_devices} devices; choose sizes whose product divides "
                      f"{num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(f"mesh {described} has {fixed} devices but there are {num_devices}; "
                    "make the sizes multiply to the device count, or give one axis -1")
  return tuple(sizes)


def make_mesh(shape: Mapping[str, int] | str | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with all three axes of `MESH_AXES` over `devices` (default: all devices).

  The axis types are `Auto`: XLA propagates shardings from the annotated inputs, and the
  model code runs unchanged on one device or many. Use it with `jax.set_mesh(mesh)` and
  `jax.jit(..., in_shardings=..., out_shardings=...)`.
  """
  num_devices = len(devices) if devices is not None else jax.device_count()
  sizes = resolve_mesh_shape(shape, num_devices)
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_spec(ndim: int) -> PartitionSpec:
  """The partition spec of a batch-major array: batch over (data, fsdp), the rest whole."""
  if ndim < 1:
    raise ValueError(f"a batch array has at least one dimension, got ndim={ndim}")
  return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(ndim))


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split: the product of the `data` and `fsdp` axes."""
  return math.prod(mesh.shape[name] for name in BATCH_AXES)
