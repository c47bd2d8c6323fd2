"""Where training and inference start: the model's abstract layout, then its state restored
from a checkpoint, initialised from another run (INIT_FROM), or freshly initialised.

Nothing is allocated before the shardings are known: the model is built with
`nnx.eval_shape`, its parameter shardings come from the logical axis rules, and every
array is created (or restored) straight onto its target layout. The loop, the planner
(`train.plan`, abstract only) and inference loading (`checkpoint.load_for_inference`) all
go through `setup_initial_state`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax import nn
from imagen_jax.errors import UserError
from imagen_jax.parallel import rules
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train import state as state_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InitialState:
  """The model's structure and where its state starts.

  origin: "abstract" (shapes only), "resumed" (this run's checkpoint), "init_from" (another
  run's parameters, new optimizer state), "init" (fresh) or "inference" (one parameter tree).
  state: a TrainState (ShapeDtypeStructs when abstract), None for inference.
  params: for inference, the restored parameters (EMA or raw); else state.params.
  step: the checkpoint step restored from (None for a fresh or abstract start).
  """
  model: nnx.Module              # abstract: attributes (image_size, text_dim, ...) only
  graphdef: Any
  rest: Any                      # the non-parameter state (abstract until restored)
  params_shapes: Any
  param_shardings: Any
  origin: str = "abstract"
  state: state_lib.TrainState | None = None
  state_shardings: state_lib.TrainState | None = None
  params: Any = None
  step: int | None = None


def abstract_layout(create_fn: Callable[[], nnx.Module], mesh) -> InitialState:
  """The model built abstractly (nothing allocated) and its parameter shardings on mesh."""
  with state_lib.no_eager_sharding():
    model = nnx.eval_shape(create_fn)
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
  shardings = state_lib.param_shardings_from_nnx(params_state, mesh, rules.state_shardings)
  return InitialState(model=model, graphdef=graphdef, rest=rest,
                      params_shapes=nnx.to_pure_dict(params_state), param_shardings=shardings)


def setup_initial_state(create_fn: Callable[[], nnx.Module], mesh, *, tx=None, seed: int = 0,
                        checkpointer: ckpt_lib.Checkpointer | None = None,
                        init_from=None, init_from_ema: bool = False,
                        step: int | None = None, abstract: bool = False,
                        layout: InitialState | None = None) -> InitialState:
  """The model's layout and starting state on `mesh`, in this order of precedence:

  - `tx` None (inference): one parameter tree of the run `init_from` (EMA when
    `init_from_ema`), at checkpoint `step` (default the latest);
  - `abstract`: the train state's shapes and shardings only (planning);
  - `checkpointer` holds a checkpoint: the whole train state restored (resume);
  - `init_from`: that run's parameters (and EMA if `init_from_ema`), a new optimizer state;
  - otherwise a fresh state from `seed`.
  `create_fn()` builds the model (a fresh `nnx.Rngs` each call); `layout` reuses an
  `abstract_layout` already made.
  """
  out = layout or abstract_layout(create_fn, mesh)
  if tx is None:
    return _inference_params(out, create_fn, init_from, init_from_ema, step)
  out.state = jax.eval_shape(lambda p: state_lib.init_train_state(p, tx, seed),
                             out.params_shapes)
  out.state_shardings = state_lib.train_state_shardings(out.state, out.param_shardings, mesh)
  if abstract:
    return out
  latest = None if checkpointer is None else checkpointer.latest_step()
  with jax.set_mesh(mesh), state_lib.no_eager_sharding():
    out.rest = ckpt_lib.model_rest_state(create_fn)
    if latest is not None:
      out.state, _ = checkpointer.restore(state_lib.abstract_like(out.state,
                                                                  out.state_shardings))
      out.origin, out.step = "resumed", latest
      log.info("resumed from %s at step %d", checkpointer.directory, latest)
      return out
    params, ema = None, None
    if init_from:
      params, ema, out.step = _init_from_params(out, init_from, init_from_ema)
      out.origin = "init_from"
    else:
      params = nn.jit_init(lambda: state_lib.split_model(create_fn())[1],
                           out_shardings=out.param_shardings)()
      out.origin = "init"
    out.state = nn.jit_init(lambda p, e: _fresh_state(p, e, tx, seed),
                            out_shardings=out.state_shardings)(params, ema)
  out.params = out.state.params
  return out


def _fresh_state(params, ema, tx, seed):
  state = state_lib.init_train_state(params, tx, seed)
  return state if ema is None else state.replace(ema_params=ema)


def _target(layout: InitialState):
  return state_lib.abstract_like(layout.params_shapes, layout.param_shardings)


def _init_from_params(layout: InitialState, init_from, init_from_ema: bool):
  """INIT_FROM's parameters (and EMA) onto this model's layout; UserError if another model.

  The one shape change allowed: this model is an inpainting model with more
  `inpaint_channels` than the source (a text-to-image model has 0). The source's input
  convolution is then zero-padded along its input-channel axis (`pad_input_conv`), so at step
  0 the model's output equals the source's, whatever the inpainting input (GLIDE section 4).
  """
  source = ckpt_lib.read_model_json(init_from)
  if source is None:
    raise UserError(f"INIT_FROM={init_from!r} has no model.json; point it at a MODEL_DIR "
                    "written by imagen-train")
  extra = int(getattr(layout.model, "inpaint_channels", 0)) - int(source.inpaint_channels)
  source_shapes = (input_conv_without(layout.params_shapes, extra) if extra > 0
                   else layout.params_shapes)
  if source.param_shapes_sha256 != ckpt_lib.param_shapes_digest(source_shapes):
    count = nn.param_count(layout.params_shapes)
    raise UserError(f"INIT_FROM={init_from!r} holds a {source.model_class} with "
                    f"{source.num_params} parameters of other shapes than this "
                    f"{type(layout.model).__name__} ({count}); use the same model config as "
                    "that run (only inpaint_channels may grow, from a text-to-image model)")
  target = state_lib.abstract_like(source_shapes, layout.param_shardings)
  params, step = ckpt_lib.restore_params(init_from, target, use_ema=False)
  ema = None
  if init_from_ema:
    ema, _ = ckpt_lib.restore_params(init_from, target, step=step, use_ema=True)
  if extra > 0:
    pad = jax.jit(lambda p: pad_input_conv(p, extra), out_shardings=layout.param_shardings)
    params = pad(params)
    ema = None if ema is None else pad(ema)
    log.info("INIT_FROM: input_conv zero-padded with %d inpainting input channels", extra)
  log.info("initialised from %s step %d", init_from, step)
  return params, ema, step


def input_conv_without(params_shapes: dict, extra: int) -> dict:
  """The parameter shapes with `extra` fewer input channels in input_conv's kernel (the
  layout of the model without those inpainting channels)."""
  kernel = params_shapes["input_conv"]["kernel"]
  shape = (*kernel.shape[:-2], kernel.shape[-2] - extra, kernel.shape[-1])
  return {**params_shapes, "input_conv": {
      **params_shapes["input_conv"], "kernel": jax.ShapeDtypeStruct(shape, kernel.dtype)}}


def pad_input_conv(params: dict, extra: int) -> dict:
  """`extra` zero input channels appended to input_conv's kernel [kh, kw, in, out] (the
  inpainting channels come last in the model's input)."""
  kernel = params["input_conv"]["kernel"]
  widths = [(0, 0)] * kernel.ndim
  widths[-2] = (0, extra)
  return {**params, "input_conv": {**params["input_conv"],
                                   "kernel": jnp.pad(kernel, widths)}}


def _inference_params(layout: InitialState, create_fn, model_dir, use_ema: bool,
                      step: int | None) -> InitialState:
  layout.params, layout.step = ckpt_lib.restore_params(model_dir, _target(layout), step=step,
                                                       use_ema=use_ema)
  layout.rest = ckpt_lib.model_rest_state(create_fn)
  layout.origin = "inference"
  return layout
