"""Checkpoints (orbax), the run's metadata files, and loading a trained model.

MODEL_DIR/
  checkpoints/<step>/   orbax CheckpointManager: items `params`, `ema_params`, `opt_state`,
                        `train` ({step, rng}) and `meta` (JSON: step, data position, loss)
  config.gin            the operative gin config of the run
  model.gin             the model's part of it (enough to rebuild the model elsewhere)
  model.json            model kind, sizes, text width, objective, schedule, text encoder
                        identity, format version (checked when a run resumes)

No pickle: orbax stores arrays with tensorstore and metadata as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from imagen_jax import files, nn
from imagen_jax.errors import UserError
from imagen_jax.train import state as state_lib

FORMAT_VERSION = 1
# model.json keys that must match for a run to resume in (or fine-tune from) a directory.
IDENTITY_KEYS = ("model_class", "image_size", "lowres_size", "text_dim", "channels",
                 "num_params", "param_shapes_sha256")

_ITEMS = ("params", "ema_params", "opt_state", "train", "meta")


# ----------------------------------------------------------------------------- model.json

def param_shapes_digest(params) -> str:
  import hashlib
  desc = sorted(("/".join(p), tuple(np.shape(x)), str(np.dtype(x.dtype)))
                for p, x in state_lib.tree_paths(params).items())
  return hashlib.sha256(repr(desc).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """A checkpoint's model description: MODEL_DIR/model.json (DESIGN.md section 5 attributes
  plus the training settings that sampling must repeat).

  The defaults are those of a model.json that lacks the key, in one place: every reader goes
  through `from_json`. `aug_schedule` and `lowres_resize` default to what `LossConfig`
  trains with ("cosine", and "none": the low-res image is noised at its own size and the
  EfficientUNet resizes it), because a record without them came from a run with those
  defaults. `step`, `model_gin` and `use_ema` are set by `load_for_inference`, not stored.
  """
  model_class: str
  image_size: int
  text_dim: int
  lowres_size: int | None = None
  channels: int = 3
  objective: str = "eps"
  schedule: str = "cosine"
  aug_schedule: str = "cosine"
  lowres_resize: str = "none"
  max_time: float = 1.0  # LossConfig.max_time: the noise levels trained are t <= max_time
  inpaint_channels: int = 0
  encoder: dict | None = None
  num_params: int | None = None
  param_shapes_sha256: str | None = None
  format_version: int = FORMAT_VERSION
  # A noise-aware classifier (LossConfig.task = 'classifier'): its label set's name
  # (data.labels) and class count. None for a diffusion model.
  labels: str | None = None
  num_classes: int | None = None
  step: int | None = None
  model_gin: str | None = None
  use_ema: bool | None = None

  _LOADED = ("step", "model_gin", "use_ema")  # set on load, never written to model.json

  @property
  def stage(self) -> str:
    return "base" if self.lowres_size is None else "sr"

  @property
  def is_sr(self) -> bool:
    return self.lowres_size is not None

  @classmethod
  def from_json(cls, record: dict) -> "ModelInfo":
    """Reads a model.json record (unknown keys, like the derived `stage`, are ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = [k for k in ("model_class", "image_size", "text_dim") if k not in record]
    if missing:
      raise UserError(f"model.json lacks {missing}; it was not written by imagen-train")
    return cls(**{k: v for k, v in record.items() if k in fields})

  def to_json(self) -> dict:
    """The model.json record (with the derived `stage`, for readers of the file)."""
    out = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._LOADED}
    out["stage"] = self.stage
    return out


def model_info(model: nnx.Module, params, *, loss_cfg, encoder: dict | None) -> ModelInfo:
  """The description of a model about to be trained with `loss_cfg`."""
  lowres_size = getattr(model, "lowres_size", None)
  num_classes = getattr(model, "num_classes", None)
  task = getattr(loss_cfg, "task", "diffusion")
  if (task == "classifier") != (num_classes is not None):
    raise UserError(f"LossConfig.task={task!r} does not fit the model "
                    f"{type(model).__name__}: train a classifier (create_model.model_cls = "
                    "@NoisyClassifier) with task 'classifier' and a U-Net with 'diffusion'")
  return ModelInfo(
      labels=getattr(model, "labels", None) if num_classes else None,
      num_classes=None if num_classes is None else int(num_classes),
      model_class=type(model).__name__, image_size=int(model.image_size),
      lowres_size=None if lowres_size is None else int(lowres_size),
      text_dim=int(model.text_dim), channels=int(getattr(model, "channels", 3)),
      objective=loss_cfg.objective, schedule=loss_cfg.schedule,
      aug_schedule=loss_cfg.aug_schedule, lowres_resize=loss_cfg.lowres_resize,
      max_time=float(loss_cfg.max_time),
      inpaint_channels=int(getattr(model, "inpaint_channels", 0)), encoder=encoder,
      num_params=nn.param_count(params),
      param_shapes_sha256=param_shapes_digest(params))


def read_model_json(model_dir) -> ModelInfo | None:
  path = epath.Path(model_dir) / "model.json"
  if not path.exists():
    return None
  return ModelInfo.from_json(json.loads(path.read_text()))


def check_or_write_model_json(model_dir, info: ModelInfo, *, write: bool = True) -> None:
  """Checks that the model.json already in model_dir describes this model, or (if `write`,
  i.e. on process 0) writes it. Every process checks, so every process stops on a mismatch."""
  old = read_model_json(model_dir)
  path = epath.Path(model_dir) / "model.json"
  if old is None:
    if write:
      files.write_atomic(path, json.dumps(info.to_json(), indent=2, sort_keys=True))
    return
  diffs = [f"{k}: {getattr(old, k)!r} in the directory, {getattr(info, k)!r} now"
           for k in IDENTITY_KEYS if getattr(old, k) != getattr(info, k)]
  if diffs:
    raise UserError(f"MODEL_DIR {os.fspath(model_dir)} holds a checkpoint of another model ("
                    + "; ".join(diffs) + "); use a new MODEL_DIR, or INIT_FROM to fine-tune "
                    "from that run")
  if old.encoder and info.encoder and old.encoder != info.encoder:
    raise UserError(f"MODEL_DIR {os.fspath(model_dir)} was trained with text encoder "
                    f"{old.encoder}, but the embedding cache now comes from "
                    f"{info.encoder}; use the original cache or a new MODEL_DIR")


# ----------------------------------------------------------------------------- checkpoints

class Checkpointer:
  """An orbax CheckpointManager over MODEL_DIR/checkpoints (async saves, keep the last K).

  All processes call save/restore (orbax coordinates multi-process writes); a checkpoint only
  appears under its step once complete, so a run killed mid-save leaves the previous one.
  """

  def __init__(self, model_dir, *, save_every: int = 1000, keep: int | None = 3,
               async_save: bool = True):
    self.directory = epath.Path(model_dir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(save_every)), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state: state_lib.TrainState, *, meta: dict | None = None,
           force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    meta = {"step": step, "data_position": step, "format_version": FORMAT_VERSION,
            **(meta or {})}
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        ema_params=ocp.args.StandardSave(state.ema_params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        train=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def restore(self, target: state_lib.TrainState, step: int | None = None):
    """Restores onto `target` (ShapeDtypeStructs with the target shardings) -> (state, meta)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target.params),
        ema_params=ocp.args.StandardRestore(target.ema_params),
        opt_state=ocp.args.StandardRestore(target.opt_state),
        train=ocp.args.StandardRestore({"step": target.step, "rng": target.rng}),
        meta=ocp.args.JsonRestore()))
    state = state_lib.TrainState(step=restored.train["step"], params=restored.params,
                                 opt_state=restored.opt_state,
                                 ema_params=restored.ema_params, rng=restored.train["rng"])
    return state, dict(restored.meta)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(model_dir, target_params, *, step: int | None = None,
                   use_ema: bool = True):
  """One parameter tree (EMA or raw) of a run's checkpoint, onto `target_params`
  (ShapeDtypeStructs with shardings). -> (params, step)."""
  directory = epath.Path(model_dir) / "checkpoints"
  if not directory.exists():
    raise UserError(f"no checkpoints under {os.fspath(model_dir)}; point at a MODEL_DIR "
                    "written by imagen-train")
  item = "ema_params" if use_ema else "params"
  # The options read_only implies, set here so that orbax does not warn it overrides them.
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  with ocp.CheckpointManager(directory, item_names=_ITEMS, options=options) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no complete checkpoint under {os.fspath(directory)}")
    if step not in manager.all_steps():
      raise UserError(f"no checkpoint for step {step} under {os.fspath(directory)}; "
                      f"available: {sorted(manager.all_steps())}")
    restored = manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(target_params)}))
    return restored[item], step


def model_rest_state(create_fn):
  """The model's non-parameter state (RNG streams) without materialising the parameters
  (jit drops the unused parameter initialisers)."""
  with state_lib.no_eager_sharding():
    return nn.jit_init(lambda: state_lib.split_model(create_fn())[2])()


def load_for_inference(model_dir, step: int | None = None, use_ema: bool = True, *,
                       mesh=None) -> tuple[nnx.Module, ModelInfo]:
  """A trained model and its description, from a MODEL_DIR written by imagen-train.

  The model is rebuilt from MODEL_DIR/model.gin (parsed on top of the current gin config)
  and its parameters restored straight onto their target shardings on `mesh` (default: all
  devices). -> (model, info): the `ModelInfo` of model.json with `step`, `model_gin` and
  `use_ema` set.
  """
  from imagen_jax import nn as nn_lib  # noqa: F401  (registers the model configurables)
  from imagen_jax.parallel import mesh as mesh_lib
  from imagen_jax.train import initial_state  # it builds on this module

  model_dir = epath.Path(model_dir)
  info = read_model_json(model_dir)
  gin_path = model_dir / "model.gin"
  if info is None or not gin_path.exists():
    raise UserError(f"{os.fspath(model_dir)} has no model.json/model.gin; pass a MODEL_DIR "
                    "written by imagen-train")
  model_gin = gin_path.read_text()
  with gin.unlock_config():
    gin.parse_config(model_gin)
  mesh = mesh_lib.make_mesh() if mesh is None else mesh

  def create():
    return nn_lib.create_model(rngs=nnx.Rngs(params=0, dropout=0))

  loaded = initial_state.setup_initial_state(create, mesh, init_from=model_dir,
                                             init_from_ema=use_ema, step=step)
  model = state_lib.merge_model(loaded.graphdef, loaded.params, loaded.rest)
  return model, dataclasses.replace(info, step=int(loaded.step), model_gin=model_gin,
                                    use_ema=use_ema)



