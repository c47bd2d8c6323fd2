"""The training state: a pytree of plain arrays, split off an NNX model.

An NNX model is split into a graph definition (static: the module structure), its
parameters (`nnx.Param`, trained, kept here as a nested dict of arrays) and the rest of its
state (none for our U-Nets, which take dropout keys as call arguments; RNG streams of other
models are allowed and not checkpointed). Plain nested dicts make the state easy to shard, checkpoint with
orbax and export to safetensors.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a checkpoint holds all of it.

  step: int32 [] — optimizer updates done so far (also the data-iterator position).
  params, ema_params: nested dicts of float32 arrays with the model's parameter tree.
  opt_state: the optax state for `params`.
  rng: uint32 [2] raw root key; the key of step k is fold_in(rng, k).
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  ema_params: PyTree
  rng: jax.Array


@contextlib.contextmanager
def no_eager_sharding():
  """Creates Variables without placing them: shardings come from the jit out_shardings."""
  with nnx.use_eager_sharding(False):
    yield


def split_model(model: nnx.Module):
  """-> (graphdef, params as a nested dict, rest: the non-Param state, e.g. RNG streams).

  Raises for mutable non-parameter state other than RNG streams (e.g. batch statistics),
  which this trainer does not carry between steps.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  for path, var in nnx.to_flat_state(rest):
    if not isinstance(var, (nnx.RngKey, nnx.RngCount)):
      raise NotImplementedError(f"model state {'/'.join(map(str, path))} of type "
                                f"{type(var).__name__} is not a Param nor an RNG stream; "
                                "the trainer only carries parameters between steps")
  return graphdef, nnx.to_pure_dict(params), rest


def merge_model(graphdef, params: PyTree, rest) -> nnx.Module:
  """Inverse of split_model (works under jit on traced params). Fresh Variables are made
  for `rest` too, so the model may be reseeded inside any trace."""
  if isinstance(rest, nnx.State):
    rest = nnx.to_pure_dict(rest)
  return nnx.merge(graphdef, nnx.State(params), nnx.State(rest))


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def tree_paths(tree) -> dict[tuple[str, ...], Any]:
  """Flat {path of str keys: leaf}."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(_key_str(k) for k in path): leaf for path, leaf in flat}


def param_shardings_from_nnx(abstract_params_state, mesh, state_shardings_fn) -> PyTree:
  """Param shardings as a nested dict (same tree as split_model's params).

  `state_shardings_fn(state, mesh)` is `imagen_jax.parallel.rules.state_shardings`: it maps
  each Variable's logical axis names to mesh axes.
  """
  shardings = state_shardings_fn(abstract_params_state, mesh)
  if isinstance(shardings, nnx.State):
    shardings = nnx.to_pure_dict(shardings)
  # Drop any Variable wrappers: keep only the NamedSharding leaves, in the params' tree.
  leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  structure = jax.tree.structure(nnx.to_pure_dict(abstract_params_state))
  return jax.tree.unflatten(structure, leaves)


def opt_state_shardings(opt_state_shapes: PyTree, params_shapes: PyTree, param_shardings: PyTree,
                        mesh) -> PyTree:
  """Shardings for an optax state: a leaf shaped like a parameter, found at the same path
  (the optimizer state mirrors the params tree, e.g. Adam's mu/nu), gets that parameter's
  sharding; anything else (counts, Adafactor's factored row/column statistics) is small and
  replicated."""
  by_path = {}
  shape_of = tree_paths(params_shapes)
  for path, sharding in tree_paths(param_shardings).items():
    by_path[path] = (tuple(shape_of[path].shape), sharding)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = tuple(_key_str(k) for k in path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_state_shapes)


def train_state_shardings(state_shapes: TrainState, param_shardings: PyTree, mesh) -> TrainState:
  replicated = NamedSharding(mesh, P())
  return TrainState(
      step=replicated,
      params=param_shardings,
      opt_state=opt_state_shardings(state_shapes.opt_state, state_shapes.params,
                                    param_shardings, mesh),
      ema_params=param_shardings,
      rng=replicated)


def init_train_state(params: PyTree, optimizer: optax.GradientTransformation, seed: int,
                     step: int = 0) -> TrainState:
  """A fresh state; traceable (call it under jit with out_shardings to place it)."""
  return TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema_params=jax.tree.map(jnp.copy, params),
      rng=jax.random.key_data(jax.random.PRNGKey(seed)).astype(jnp.uint32))


def abstract_like(tree: PyTree, shardings: PyTree | None = None) -> PyTree:
  """ShapeDtypeStructs (with shardings when given) for restoring onto a target layout."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


