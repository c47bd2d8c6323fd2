"""Logical axis names -> mesh axes, in t5x's style (t5x/partitioning.py).

Every parameter is created with logical axis names (`nnx.with_partitioning`, see
`imagen_jax.nn.layers.partitioned`). The rules below map each name to a mesh axis of
`('data', 'fsdp', 'tensor')`, or to None (replicated):

- `batch` -> ('data', 'fsdp'): the batch is split over both data-parallel axes.
- the large dimension of each weight (`embed`, `conv_out`, `text_embed`) -> `fsdp`: the
  parameters and optimizer state are sharded ZeRO-3 style and gathered per layer.
- attention heads, MLP widths and the vocabulary -> `tensor`.
- small or positional dimensions (`norm`, `kv`, conv kernel sides, ...) -> replicated.

A logical name may appear in more than one rule: the first rule whose mesh axes are not
already used by another dimension of the same array wins (as in t5x), so a weight named
`('embed', 'embed')` is sharded on its first dimension only. A dimension whose size the
mesh axes do not divide is replicated instead (tiny test models, odd channel counts);
this costs memory, never correctness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax.parallel.mesh import BATCH_AXES

MeshAxes = str | tuple[str, ...] | None

LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    # Weights: large dimensions over fsdp, heads and MLP over tensor.
    ("embed", "fsdp"),
    ("text_embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("conv_height", None),
    ("conv_width", None),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("relpos_buckets", None),
    ("norm", None),
)

_KNOWN_NAMES = frozenset(name for name, _ in LOGICAL_AXIS_RULES)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh(spec: Sequence[str | None] | PartitionSpec,
                    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
                    ) -> PartitionSpec:
  """Maps logical axis names (one per array dimension) to a mesh PartitionSpec.

  Raises ValueError for a name that no rule lists: every name a module uses must be in
  the rules, so that nothing is replicated by accident.
  """
  known = {name for name, _ in rules}
  used: set[str] = set()
  out = []
  for name in spec:
    if name is None:
      out.append(None)
      continue
    if name not in known:
      raise ValueError(f"logical axis name {name!r} has no rule; add it to "
                       "LOGICAL_AXIS_RULES in imagen_jax/parallel/rules.py")
    chosen = None
    for rule_name, mesh_axes in rules:
      if rule_name != name:
        continue
      axes = _as_tuple(mesh_axes)
      if not axes:
        break  # an explicit "replicate" rule
      if not used.intersection(axes):
        chosen = axes
        break
    if chosen is None:
      out.append(None)
    else:
      used.update(chosen)
      out.append(chosen[0] if len(chosen) == 1 else chosen)
  return PartitionSpec(*out)


def fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh
                      ) -> PartitionSpec:
  """Replicates every dimension whose size the mesh axes assigned to it do not divide."""
  out = []
  for i, size in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    n = math.prod(mesh.shape[a] for a in _as_tuple(axes))
    out.append(axes if axes is not None and size % n == 0 else None)
  return PartitionSpec(*out)


def variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical names a Variable was created with (`nnx.with_partitioning`), or None."""
  metadata = variable.get_metadata()
  for key in ("out_sharding", "sharding", "sharding_names"):
    names = metadata.get(key)
    if names:
      return tuple(names)
  return None


def state_shardings(state: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for every Variable of an NNX state or module (abstract or real).

  The result has the structure of `state` (each Variable holds a NamedSharding instead of
  its value), as `nnx.get_named_sharding` returns, so it can be passed straight to
  `jax.jit(in_shardings=..., out_shardings=...)` or `jax.device_put`. Variables without
  logical names are replicated.
  """

  def sharding_of(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      names = variable_logical_axes(x)
      spec = PartitionSpec() if names is None else logical_to_mesh(names, rules)
      spec = fit_spec_to_shape(spec, getattr(value, "shape", ()), mesh)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _manual_axes(mesh) -> frozenset[str]:
  return frozenset(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                   if kind == jax.sharding.AxisType.Manual)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names, under the mesh set with
  `jax.set_mesh`; a no-op without a mesh or when the mesh does not divide the shape.
  Inside a `shard_map`, its manual axes are dropped: x is already one shard along them."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not set(mesh.axis_names) >= {"data", "fsdp"}:
    return x
  spec = logical_to_mesh(logical_axes)
  manual = _manual_axes(mesh)
  if manual:
    spec = PartitionSpec(*(tuple(a for a in _as_tuple(axes) if a not in manual) or None
                           for axes in spec))
  spec = fit_spec_to_shape(spec, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def _manual_batch_axes() -> tuple[str, ...]:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return ()
  return tuple(a for a in BATCH_AXES if a in _manual_axes(mesh))


def batch_shard() -> tuple[int, jax.Array] | None:
  """(number of shards, this shard's index) inside a `shard_map` that splits the batch
  over the batch axes ('data', 'fsdp'); None elsewhere."""
  axes = _manual_batch_axes()
  if not axes:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes), jax.lax.axis_index(axes)


def whole_batch_sum(x: jax.Array) -> jax.Array:
  """x summed over the batch's shards inside a `shard_map` that splits the batch (a
  statistic of the whole batch, as outside one); x itself elsewhere."""
  axes = _manual_batch_axes()
  return jax.lax.psum(x, axes) if axes else x
