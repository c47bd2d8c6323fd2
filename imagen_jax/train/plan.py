"""Plans a training run without running it: parameters, FLOPs and memory per device.

Everything is abstract. The model comes from `nnx.eval_shape`, the optimizer state from
`jax.eval_shape`, and the train step is lowered ahead of time with `jax.ShapeDtypeStruct`
inputs that carry their shardings. No parameter is ever allocated, so a 2B model plans on a
laptop. The mesh's devices must exist (simulated CPU devices stand in for TPU chips: see
`imagen_jax/cli/plan.py`).

Figures:
- `params`: parameter count.
- `train_flops_per_example`: FLOPs of one train step (forward, backward, optimizer, EMA)
  over the global batch, from XLA's cost analysis of the lowered (global, unpartitioned)
  program. With remat on, it includes the recomputed forward pass;
  `model_flops_per_example` is the same step lowered without remat (the model FLOPs that MFU
  uses; see `train.metrics`).
- bytes per device: parameters, EMA and optimizer state from their shardings (exact), and
  the compiled step's memory analysis (arguments + outputs - donated aliases + temporaries).
  XLA:CPU's buffer assignment differs from TPU's and GPU's, so the compiled figure is an
  estimate of what an accelerator would use.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from imagen_jax import config, nn
from imagen_jax.errors import UserError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train import initial_state, optim, state as state_lib, step as step_lib

DEFAULT_TEXT_LENGTH = 128  # T5's default maximum caption length (text/vocab.py)


def gin_settings(batch_size: int | None = None) -> dict:
  """`plan_training`'s keyword arguments as the gin config sets them for a run: the
  BATCH_SIZE and MAX_LENGTH macros, `train.micro_batches`, `train.crop_size` and
  `make_optimizer.name`. An explicit `batch_size` (imagen-plan's --batch) wins."""
  settings = {"batch_size": batch_size, "batch_source": "--batch"}
  if batch_size is None:
    settings.update(batch_size=config.macro("BATCH_SIZE"), batch_source="BATCH_SIZE")
  return {**settings,
          "micro_batches": config.binding("train.micro_batches", 1) or 1,
          "crop_size": config.binding("train.crop_size"),
          "text_length": config.macro("MAX_LENGTH", DEFAULT_TEXT_LENGTH),
          "optimizer_name": optim.optimizer_name()}


def bytes_per_device(shapes: Any, shardings: Any) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs laid out by `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    shard = sharding.shard_shape(tuple(leaf.shape))
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return int(total)


def _abstract_batch(model, batch_size: int, text_length: int, crop_size: int | None):
  size = crop_size or model.image_size
  batch = {
      "image": jax.ShapeDtypeStruct((batch_size, size, size, model.channels), jnp.uint8),
      "text_emb": jax.ShapeDtypeStruct((batch_size, text_length, model.text_dim),
                                       jnp.bfloat16),
      "text_mask": jax.ShapeDtypeStruct((batch_size, text_length), jnp.bool_),
  }
  if model.lowres_size is not None:
    low = size * model.lowres_size // model.image_size
    batch["lowres"] = jax.ShapeDtypeStruct((batch_size, low, low, model.channels), jnp.uint8)
  return batch


def _lowered_flops(lowered) -> float:
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def plan_training(mesh, *, batch_size: int | None = None, batch_source: str = "--batch",
                  micro_batches: int = 1, crop_size: int | None = None,
                  text_length: int = DEFAULT_TEXT_LENGTH,
                  optimizer_name: str = optim.DEFAULT_OPTIMIZER,
                  compile_step: bool = True) -> dict:
  """Plans one train step of the model (`nn.abstract_model()`) and optimizer
  (`optim.make_optimizer()`) on `mesh`; `gin_settings()` gives a run's other values.

  `batch_size` is the global batch (None: one example per data-parallel shard); the other
  arguments are the run's `train.micro_batches`, `train.crop_size`, text length and the
  optimizer's name (`make_optimizer.name`: the optimizer whose state is planned). Raises UserError for a batch that the batch axes or
  the micro-batches do not divide.
  """
  dp = mesh_lib.data_parallel_size(mesh)
  source = batch_source
  if batch_size is None:
    batch_size, source = dp, "default: one example per data-parallel shard"
  if batch_size < 1 or batch_size % dp:
    raise UserError(f"global batch {batch_size} is not divisible by the data-parallel size "
                    f"{dp} (mesh data x fsdp); choose a multiple of {dp} with --batch")
  micro = micro_batches
  if (batch_size // dp) % micro and micro > 1:
    raise UserError(f"global batch {batch_size} over {dp} data-parallel shards does not "
                    f"split into train.micro_batches={micro}")

  tx, lr_fn = optim.make_optimizer(optimizer_name)
  # Raises UserError for an image size the model cannot divide.
  init = initial_state.setup_initial_state(
      lambda: nn.create_model(rngs=nnx.Rngs(params=0, dropout=1)), mesh, tx=tx,
      abstract=True)
  abstract, graphdef, rest = init.model, init.graphdef, init.rest
  params, state_shapes, state_shard = init.params_shapes, init.state, init.state_shardings
  batch = _abstract_batch(abstract, batch_size, text_length, crop_size)
  batch_shard = {k: mesh_lib.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
  replicated = NamedSharding(mesh, P())
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)

  def lower(no_remat: bool, for_flop_count: bool):
    step_fn = step_lib.make_train_step(
        graphdef, rest, tx, loss_cfg=step_lib.LossConfig(), lr_fn=lr_fn,
        micro_batches=micro, no_remat=no_remat, unroll_micro_batches=False,
        for_flop_count=for_flop_count,
        batch_sharding=lambda ndim: mesh_lib.batch_sharding(mesh, ndim))
    jitted = jax.jit(step_fn, in_shardings=(state_shard, batch_shard, replicated),
                     out_shardings=(state_shard, replicated), donate_argnums=0)
    with jax.set_mesh(mesh):
      return jitted.lower(state_shapes, batch, rng)

  # The memory estimate compiles the step an accelerator runs (micro-batches in a loop);
  # its FLOPs would be one micro-batch's, so they are counted on `for_flop_count`'s step.
  lowered = lower(no_remat=False, for_flop_count=False)
  step_flops = _lowered_flops(lower(no_remat=False, for_flop_count=True) if micro > 1
                              else lowered)
  remat = any(getattr(m, "remat", False) for _, m in nnx.iter_modules(abstract))
  model_flops = (_lowered_flops(lower(no_remat=True, for_flop_count=True)) if remat
                 else step_flops)

  param_bytes = bytes_per_device(state_shapes.params, state_shard.params)
  result = {
      "params": nn.param_count(params),
      "mesh": dict(mesh.shape),
      "devices": int(mesh.devices.size),
      "global_batch": int(batch_size),
      "batch_source": source,
      "image_size": int(crop_size or abstract.image_size),
      "lowres_size": abstract.lowres_size,
      "text_shape": [int(text_length), int(abstract.text_dim)],
      "optimizer": optimizer_name,
      "remat": bool(remat),
      "train_flops_per_example": step_flops / batch_size,
      "model_flops_per_example": model_flops / batch_size,
      "param_bytes_per_device": param_bytes,
      "ema_bytes_per_device": bytes_per_device(state_shapes.ema_params,
                                               state_shard.ema_params),
      "opt_state_bytes_per_device": bytes_per_device(state_shapes.opt_state,
                                                     state_shard.opt_state),
      "memory_note": ("compiled-step bytes come from XLA:CPU's memory analysis: an "
                      "estimate of what a TPU or GPU would use"),
  }
  state_bytes = (result["param_bytes_per_device"] + result["ema_bytes_per_device"] +
                 result["opt_state_bytes_per_device"])
  result["state_bytes_per_device"] = state_bytes
  if compile_step:
    with jax.set_mesh(mesh):
      compiled = lowered.compile()
    mem = compiled.memory_analysis()
    arguments = int(mem.argument_size_in_bytes)
    outputs = int(mem.output_size_in_bytes)
    aliased = int(mem.alias_size_in_bytes)
    temps = int(mem.temp_size_in_bytes)
    result.update({
        "step_argument_bytes": arguments,
        "step_output_bytes": outputs,
        "step_alias_bytes": aliased,
        "step_temp_bytes": temps,
        "bytes_per_device": arguments + outputs - aliased + temps,
    })
  else:
    result["bytes_per_device"] = state_bytes
    result["memory_note"] = ("not compiled (--no_compile): bytes_per_device counts the "
                             "train state only, without activations")
  return result


def format_plan(plan: dict) -> str:
  """A human-readable summary of `plan_training`'s result."""
  gib = 2.0**30
  mesh = ",".join(f"{k}:{v}" for k, v in plan["mesh"].items())
  lines = [
      f"parameters            {plan['params']:,} ({plan['params'] / 1e9:.3f} B)",
      f"mesh                  {mesh} ({plan['devices']} devices)",
      f"global batch          {plan['global_batch']} ({plan['batch_source']})",
      f"image                 {plan['image_size']} px"
      + (f", low-res {plan['lowres_size']} px" if plan["lowres_size"] else "")
      + f", text {plan['text_shape'][0]} x {plan['text_shape'][1]}",
      f"optimizer             {plan['optimizer']}, remat {'on' if plan['remat'] else 'off'}",
      f"train FLOPs/example   {plan['train_flops_per_example']:.4g}"
      f" (model FLOPs without remat {plan['model_flops_per_example']:.4g})",
      "bytes per device:",
      f"  parameters          {plan['param_bytes_per_device'] / gib:.3f} GiB",
      f"  EMA parameters      {plan['ema_bytes_per_device'] / gib:.3f} GiB",
      f"  optimizer state     {plan['opt_state_bytes_per_device'] / gib:.3f} GiB",
  ]
  if "step_temp_bytes" in plan:
    lines += [
        f"  step temporaries    {plan['step_temp_bytes'] / gib:.3f} GiB",
        f"  compiled step total {plan['bytes_per_device'] / gib:.3f} GiB",
    ]
  else:
    lines.append(f"  total (state only)  {plan['bytes_per_device'] / gib:.3f} GiB")
  lines.append(f"note: {plan['memory_note']}")
  return "\n".join(lines)


def devices_for(shape: dict[str, int]) -> int:
  """How many devices a fully specified mesh names (no -1 allowed when planning)."""
  if any(size == -1 for size in shape.values()):
    raise UserError(f"imagen-plan simulates exactly the devices a mesh names; give every "
                    f"axis a size instead of -1 (got {shape})")
  return int(np.prod(list(shape.values()))) if shape else 1
