"""The training loop of one cascade stage: setup, resume, steps, checkpoints, metrics.

One flat function, `train`, in big_vision's spirit. Everything it needs comes from gin
(gin_configs/runs/train.gin binds its arguments to the required macros MODEL_DIR,
TRAIN_STEPS, DATASET and BATCH_SIZE); tests call it directly with a tiny model and
in-memory data.

Exactness: the state holds everything that feeds the next step (params, optimizer state,
EMA, step, root RNG); the data of step k is `pipeline.host_batch(k)`; the step key is
fold_in(root, k). So a run resumed from the checkpoint of step k does exactly what the
uninterrupted run did (same compiled program on the same mesh: bit-identical parameters).

Stopping: SIGTERM sets a flag that the loop checks after every step; on it the loop saves
a checkpoint and returns (preemptible TPU VMs send SIGTERM). With several processes the
same check is `multihost_utils.reached_preemption_sync_point`, so every host stops at the
same step. A non-finite loss or gradient norm stops the run with an error naming the step,
before any save: the last good checkpoint is never overwritten by a bad state.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from imagen_jax import config
from imagen_jax import images as images_lib
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.diffusion import conditioning
from imagen_jax.errors import UserError
from imagen_jax.parallel import hosts
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import rules
from imagen_jax.sample import stage as stage_lib
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train import metrics as metrics_lib
from imagen_jax.train import optim
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib
from imagen_jax.text import cache as cache_lib

log = logging.getLogger(__name__)

TRAIN_KEYS = ("image", "lowres", "text_emb", "text_mask")


class TrainingDiverged(UserError):
  """A non-finite loss or gradient norm; the message names the step and the kept checkpoint."""


# ----------------------------------------------------------------------------- stopping

TIME_CHECK_EVERY = 10  # steps between checks of train.max_minutes


def _past(deadline: float) -> bool:
  """Whether time.monotonic() passed `deadline`, on process 0's clock (every process must
  stop at the same step)."""
  return hosts.process0_decides(time.monotonic() >= deadline)


class PreemptionWatch:
  """SIGTERM -> stop at the next step boundary (one mechanism for one host and many).

  With one process a signal handler sets a flag. With several, JAX's preemption service
  (set up by `jax.distributed.initialize`) receives the signal on any host and
  `reached_preemption_sync_point(step)` returns True on all hosts at the same step.
  """

  def __init__(self):
    self.flag = False
    self._previous = None
    self.multi_process = jax.process_count() > 1

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.flag = True

  def __enter__(self):
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def requested(self, step: int) -> bool:
    if self.multi_process:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.flag


# ----------------------------------------------------------------------------- data

def open_cache(path, text_dim: int):
  """The embedding cache, checked against the model's text width."""
  if path is None or not epath.Path(path).exists():
    raise UserError(f"embedding cache {path!r} not found; build it with `imagen-embed "
                    "--gin_file=runs/embed.gin --gin.CACHE_DIR=\"'PATH'\" --gin.DATASET=...` "
                    "and pass the same --gin.CACHE_DIR to imagen-train")
  cache = cache_lib.EmbeddingCache.open(path)
  width = int(cache.manifest["d_model"])
  if width != text_dim:
    raise UserError(f"embedding cache {os.fspath(path)} holds {width}-wide text embeddings "
                    f"but the model's text_dim is {text_dim}; set the model's text_dim "
                    f"(gin macro TEXT_DIM) to {width}, or use a cache built with the "
                    "model's text encoder")
  return cache


def global_batch(host_batch: dict, shardings: dict, global_size: int) -> dict:
  """This host's rows -> one global jax.Array per feature, batch split over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v),
                                                    (global_size,) + np.shape(v)[1:])
          for k, v in host_batch.items() if k in shardings}


# ----------------------------------------------------------------------------- the loop

@gin.configurable(denylist=["create_model_fn", "pipeline", "val_pipeline"])
def train(*, model_dir: str = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          dataset: str | None = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          embedding_cache: str | None = None, val_dataset: str | None = None,
          seed: int = 0, mesh_shape: str | None = "data:-1", num_devices: int | None = None,
          micro_batches: int = 1,
          crop_size: int | None = None, max_length: int | None = None,
          checkpoint_every: int = 1000, keep_checkpoints: int | None = 3,
          async_checkpoint: bool = True, log_every: int = 100, val_every: int = 0,
          val_batches: int = 2, sample_every: int = 0, num_samples: int = 8,
          sample_steps: int = 64, sample_method: str = "ddim", guidance_scale: float = 3.0,
          init_from: str | None = None, init_from_ema: bool = False,
          peak_flops_per_device: float | None = None, stop_after: int | None = None,
          max_minutes: float | None = None,
          progress: bool = True, tensorboard: bool = True, loss_cfg: step_lib.LossConfig | None = None,
          create_model_fn: Callable | None = None, pipeline=None,
          val_pipeline=None) -> dict:
  """Trains one stage for `train_steps` optimizer steps in total (resuming if MODEL_DIR has
  a checkpoint) and returns {"state", "step", "status" ("done", "preempted" or
  "time_limit"), "metrics"
  (the last values), "history" (every logged interval), "compile_s", "model_flops",
  "peak_flops"}.

  Args (gin: `train.NAME`):
    model_dir: run directory (checkpoints/, config.gin, model.gin, model.json, tb/, samples/).
    train_steps: total optimizer steps of the run, counting earlier (resumed) ones.
    dataset: DATASET spec of the training data (`imagen_jax.data.sources.get_source`).
    batch_size: GLOBAL batch size; divisible by the data-parallel size (data x fsdp).
    embedding_cache: the imagen-embed cache holding every caption's T5 embedding.
    val_dataset: held-out DATASET spec for the validation loss (e.g. 'shapes:held_out').
    seed: root seed (parameters, data order, noise).
    mesh_shape: e.g. 'data:-1' or 'data:2,fsdp:4' (axes data, fsdp, tensor; one may be -1).
    num_devices: use only the first num_devices devices (single process; tests, debugging).
    micro_batches: gradient accumulation: the batch is split into this many micro-batches.
    crop_size: SR stages trained on random crops of this side (Imagen 256->1024 on crops).
    max_length: text length L (default: the cache's max_length).
    checkpoint_every, keep_checkpoints, async_checkpoint: orbax CheckpointManager settings.
    log_every: steps between metric lines/summaries (also where NaNs are checked).
    val_every, val_batches: validation loss at fixed noise levels every val_every steps.
    sample_every, num_samples, sample_steps, sample_method, guidance_scale: a grid of EMA
      samples for the first num_samples validation (else training) captions.
    init_from: another run's MODEL_DIR to fine-tune from (params; new optimizer state).
    init_from_ema: start the EMA from that run's EMA instead of from its params.
    peak_flops_per_device: for MFU; None measures a matmul's FLOP/s.
    stop_after: stop (saving a checkpoint) after this many steps of this run, as on SIGTERM.
    max_minutes: stop (saving a checkpoint) once this call has run this many minutes,
      setup and compilation included; checked every TIME_CHECK_EVERY steps, on process 0's
      clock. A time budget for runs whose machine speed is unknown (the quickstart);
      running again continues to train_steps exactly as if it had not stopped.
    progress: show a tqdm bar (process 0).
    tensorboard: write TensorBoard summaries under MODEL_DIR/tb (else metrics are logged).
    loss_cfg: LossConfig (default from gin).
    create_model_fn, pipeline, val_pipeline: injection points for tests and benchmarks
      (anything with `host_batch(step)` is a pipeline).
  """
  started = time.monotonic()
  if max_minutes is not None and max_minutes <= 0:
    raise UserError(f"train.max_minutes must be > 0 (or None for no time limit), got "
                    f"{max_minutes}")
  loss_cfg = (loss_cfg or step_lib.LossConfig()).validate()
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0
  model_dir = epath.Path(model_dir)

  # ---- mesh and batch layout
  if num_devices is not None and process_count > 1:
    raise UserError("train.num_devices only applies to single-process runs; leave it None")
  mesh = mesh_lib.make_mesh(mesh_shape, devices=(None if num_devices is None
                                                 else jax.devices()[:num_devices]))
  dp = mesh_lib.data_parallel_size(mesh)
  if batch_size % dp:
    raise UserError(f"BATCH_SIZE={batch_size} is not divisible by the data-parallel size "
                    f"{dp} (mesh {dict(mesh.shape)}: data x fsdp); use a multiple of {dp}")
  if (batch_size // dp) % micro_batches:
    raise UserError(f"the per-device batch {batch_size // dp} is not divisible by "
                    f"micro_batches={micro_batches}; change BATCH_SIZE or micro_batches")
  if batch_size % process_count:
    raise UserError(f"BATCH_SIZE={batch_size} is not divisible by the {process_count} "
                    "processes")

  # ---- model (abstract first: nothing allocated before the shardings are known)
  if create_model_fn is None:
    from imagen_jax import nn as nn_lib
    create_model_fn = nn_lib.create_model

  def create():  # a fresh Rngs per call: it is mutated while the model is built
    return create_model_fn(rngs=nnx.Rngs(params=seed, dropout=seed + 1))

  with state_lib.no_eager_sharding():
    abstract_model = nnx.eval_shape(create)
  graphdef, abstract_params_state, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
  param_sh = state_lib.param_shardings_from_nnx(abstract_params_state, mesh,
                                                rules.state_shardings)
  params_shapes = nnx.to_pure_dict(abstract_params_state)

  # ---- data
  cache = None
  make_val = val_pipeline is None and bool(val_dataset) and bool(val_every or sample_every)
  if pipeline is None or make_val:  # the cache joins captions to their T5 embeddings
    cache = open_cache(embedding_cache, int(abstract_model.text_dim))
  max_length = max_length or (int(cache.manifest["max_length"]) if cache else None)
  encoder = cache.manifest.get("encoder") if cache is not None else None

  def make_pipeline(spec):
    return pipeline_lib.Pipeline(
        spec, cache, image_size=int(abstract_model.image_size),
        lowres_size=getattr(abstract_model, "lowres_size", None), crop_size=crop_size,
        global_batch_size=batch_size, seed=seed, max_length=max_length,
        process_index=process_index, process_count=process_count)

  if pipeline is None:
    if not dataset:
      raise UserError("DATASET is not set; e.g. --gin.DATASET=\"'shapes'\"")
    pipeline = make_pipeline(dataset)
  if make_val:
    val_pipeline = make_pipeline(val_dataset)

  # ---- run directory identity
  info = ckpt_lib.model_info(abstract_model, params_shapes, loss_cfg=loss_cfg,
                             encoder=encoder)
  ckpt_lib.check_or_write_model_json(model_dir, info, write=is_main)

  # ---- optimizer and state
  tx, lr = optim.make_optimizer()
  state_shapes = jax.eval_shape(lambda p: state_lib.init_train_state(p, tx, seed),
                                params_shapes)
  state_sh = state_lib.train_state_shardings(state_shapes, param_sh, mesh)
  replicated = NamedSharding(mesh, P())

  with state_lib.no_eager_sharding():
    init_params = jax.jit(lambda: state_lib.split_model(create())[1:],
                          out_shardings=(param_sh, jax.tree.map(lambda _: replicated,
                                                                abstract_rest)))
  checkpointer = ckpt_lib.Checkpointer(model_dir, save_every=checkpoint_every,
                                       keep=keep_checkpoints, async_save=async_checkpoint)
  latest = checkpointer.latest_step()
  with jax.set_mesh(mesh), state_lib.no_eager_sharding():
    if latest is not None:
      state, meta = checkpointer.restore(state_lib.abstract_like(state_shapes, state_sh))
      rest = ckpt_lib.model_rest_state(create)
      log.info("resumed from %s at step %d", checkpointer.directory, latest)
    else:
      params, rest = init_params()
      ema = None
      if init_from:
        source = ckpt_lib.read_model_json(init_from)
        if source is None:
          raise UserError(f"INIT_FROM={init_from!r} has no model.json; point it at a "
                          "MODEL_DIR written by imagen-train")
        if source.param_shapes_sha256 != info.param_shapes_sha256:
          raise UserError(f"INIT_FROM={init_from!r} holds a {source.model_class} with "
                          f"{source.num_params} parameters of other shapes than this "
                          f"{info.model_class} ({info.num_params}); use the same "
                          "model config as that run")
        target = state_lib.abstract_like(params_shapes, param_sh)
        params, from_step = ckpt_lib.restore_params(init_from, target, use_ema=False)
        if init_from_ema:
          ema, _ = ckpt_lib.restore_params(init_from, target, step=from_step, use_ema=True)
        log.info("initialised from %s step %d", init_from, from_step)
      state = jax.jit(lambda p, e: _fresh_state(p, e, tx, seed), out_shardings=state_sh)(
          params, ema)

  # ---- the step
  def shard_of(ndim):
    return mesh_lib.batch_sharding(mesh, ndim)

  start_step = int(jax.device_get(state.step))
  if start_step >= train_steps:
    checkpointer.close()
    log.info("MODEL_DIR is already at step %d >= TRAIN_STEPS=%d; nothing to do", start_step,
             train_steps)
    return {"state": state, "step": start_step, "status": "done", "metrics": {},
            "history": [], "compile_s": 0.0, "model_flops": None, "peak_flops": None}
  first = pipeline.host_batch(start_step)
  batch_sh = {k: shard_of(np.ndim(v)) for k, v in first.items() if k in TRAIN_KEYS}
  step_kw = dict(loss_cfg=loss_cfg, lr_fn=lr, micro_batches=micro_batches,
                 batch_sharding=shard_of)
  train_step = step_lib.make_train_step(graphdef, rest, tx, **step_kw)

  def with_step_key(fn):
    def run(state, batch):
      return fn(state, batch, step_lib.step_key(state.rng, state.step))
    return run

  jit_kw = dict(in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated))
  jitted = jax.jit(with_step_key(train_step), donate_argnums=(0,), **jit_kw)

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    batch = global_batch(first, batch_sh, batch_size)
    lowered = jitted.lower(state, batch)
    compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  if jax.process_count() > 1:
    # Processes compile at different speeds (only process 0 writes the compilation cache);
    # meet here so that the first step's collectives do not hit gloo's 30 s connect limit.
    hosts.sync_global_devices("train_step_compiled")
  hardware_flops = metrics_lib.cost_flops(lowered)
  model_flops = hardware_flops
  remat = any(getattr(m, "remat", False) for _, m in nnx.iter_modules(abstract_model))
  if remat:  # model FLOPs = the same step without recomputation
    no_remat = step_lib.make_train_step(graphdef, rest, tx, no_remat=True, **step_kw)
    with jax.set_mesh(mesh):
      model_flops = metrics_lib.cost_flops(
          jax.jit(with_step_key(no_remat), **jit_kw).lower(state, batch))
  peak = peak_flops_per_device
  if peak is None and model_flops:
    on_cpu = jax.default_backend() == "cpu"  # accelerators need big matmuls to peak
    peak = metrics_lib.measured_peak_flops(jnp.float32 if on_cpu else jnp.bfloat16,
                                           n=1024 if on_cpu else 8192)
  log.info("compiled the train step in %.1fs; %.3g model FLOPs/step", compile_s,
           model_flops or float("nan"))

  # ---- validation and samples
  eval_fn = None
  if val_every and val_pipeline is not None:
    eval_fn = _make_eval(graphdef, rest, loss_cfg, mesh)
  sampler = None
  if sample_every:
    sampler = _make_sampler(graphdef, rest, info, mesh, min(num_samples, batch_size),
                            sample_steps, sample_method, guidance_scale, seed)

  if is_main:
    config.write_operative_config(model_dir)
    (model_dir / "model.gin").write_text(config.model_gin_str())
  writer = metrics_lib.create_writer(model_dir, process_index=process_index,
                                     tensorboard=tensorboard)
  if is_main and start_step == 0:
    writer.write_hparams({"batch_size": batch_size, "train_steps": train_steps,
                          "num_params": info.num_params, "micro_batches": micro_batches,
                          "mesh": str(dict(mesh.shape))})

  # ---- loop
  pending: list[tuple[int, dict]] = []
  timer = {"t": time.perf_counter(), "steps": 0}
  last: dict[str, Any] = {"compile_s": compile_s}
  history: list[dict] = []

  def flush(step: int) -> dict:
    """Fetches pending metrics, stops on a non-finite value, writes the averages."""
    if not pending:
      return {}
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      bad = [k for k in ("loss", "grad_norm") if not np.isfinite(m[k])]
      if bad:
        checkpointer.wait()
        good = checkpointer.latest_step()
        kept = (f"the last good checkpoint (step {good}) is kept in {checkpointer.directory}"
                if good is not None else "no checkpoint was written")
        raise TrainingDiverged(
            f"{bad[0]} is {m[bad[0]]} at step {s}; training stopped and {kept}. Lower the "
            "learning rate (lr_schedule.peak_lr), clip gradients harder "
            "(make_optimizer.clip_norm) or resume from that checkpoint")
    elapsed = time.perf_counter() - timer["t"]
    steps_per_s = timer["steps"] / elapsed if elapsed > 0 else float("nan")
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    scalars["learning_rate"] = float(fetched[-1]["learning_rate"])
    scalars.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * batch_size)
    scalars["decode_failures"] = getattr(pipeline, "decode_failures", 0) or None  # if any
    mfu = metrics_lib.utilisation(model_flops, steps_per_s, peak, mesh.devices.size)
    if mfu is not None:
      scalars["mfu"] = mfu
    if remat:
      scalars["hfu"] = metrics_lib.utilisation(hardware_flops, steps_per_s, peak,
                                               mesh.devices.size)
    writer.write_scalars(step, {k: v for k, v in scalars.items() if v is not None})
    pending.clear()
    timer.update(t=time.perf_counter(), steps=0)
    return scalars

  from tqdm import tqdm
  bar = tqdm(total=train_steps, initial=start_step, disable=not (is_main and progress),
             desc="train", unit="step", dynamic_ncols=True)
  status = "done"
  step = start_step
  # Batches after the first, prepared ahead in a background thread when the pipeline can.
  if hasattr(pipeline, "iter_batches"):
    batches = pipeline.iter_batches(start_step + 1, prefetch=2)
  else:
    batches = (pipeline.host_batch(k) for k in itertools.count(start_step + 1))
  try:
    with PreemptionWatch() as watch, jax.set_mesh(mesh):
      while step < train_steps:
        host = first if step == start_step else next(batches)
        state, m = compiled(state, global_batch(host, batch_sh, batch_size))
        step += 1
        pending.append((step, m))
        timer["steps"] += 1
        bar.update(1)
        out_of_time = (max_minutes is not None and step % TIME_CHECK_EVERY == 0
                       and step < train_steps
                       and _past(started + 60 * max_minutes))
        stop = out_of_time or watch.requested(step) or (stop_after is not None
                                                        and step - start_step >= stop_after)
        if stop:
          status = "time_limit" if out_of_time else "preempted"
        save = stop or step == train_steps or step % checkpoint_every == 0
        if save or step % log_every == 0:
          scalars = flush(step)
          if scalars:
            last.update(scalars)
            history.append({"step": step, **scalars})
            if step % log_every == 0:
              line = metrics_lib.console_line(step, train_steps, scalars)
              (bar.write if is_main and progress else log.info)(line)
        t_extra = time.perf_counter()  # validation/sampling time is not training time
        if eval_fn is not None and step % val_every == 0:
          val = _validate(eval_fn, state, val_pipeline, val_batches, batch_size, mesh)
          writer.write_scalars(step, val)
          last.update(val)
          if is_main:
            (bar.write if progress else log.info)(
                metrics_lib.console_line(step, train_steps, val))
        if sampler is not None and step % sample_every == 0:
          source = val_pipeline if val_pipeline is not None else pipeline
          grid = _sample_grid(sampler, state, source, batch_size, mesh)
          if is_main:
            _write_grid(model_dir, step, grid, writer)
        timer["t"] += time.perf_counter() - t_extra
        if save:
          checkpointer.save(state, force=True,
                            meta={"loss": last.get("loss"),
                                  "status": status if stop else "periodic"})
        if stop:
          if out_of_time and is_main:
            (bar.write if progress else log.info)(
                f"train.max_minutes={max_minutes:g} reached: stopping at step {step} of "
                f"{train_steps} (checkpoint saved; run again to continue)")
          else:
            log.info("stopping at step %d (checkpoint saved)", step)
          break
  finally:
    batches.close()
    bar.close()
    checkpointer.close()
    writer.flush()
  return {"state": state, "step": step, "status": status, "metrics": last, "history": history,
          "compile_s": compile_s, "model_flops": model_flops, "peak_flops": peak,
          "num_devices": int(mesh.devices.size)}


def _fresh_state(params, ema, tx, seed):
  state = state_lib.init_train_state(params, tx, seed)
  if ema is not None:
    state = state.replace(ema_params=ema)
  return state


def _make_eval(graphdef, rest, loss_cfg, mesh):
  eval_step = step_lib.make_eval_step(graphdef, rest, loss_cfg)
  return jax.jit(eval_step, out_shardings=NamedSharding(mesh, P()))


def _validate(eval_fn, state, pipeline, num_batches, batch_size, mesh) -> dict:
  """Validation loss of params and EMA params over the first num_batches held-out batches,
  at the fixed noise levels of step.validation_levels."""
  out = {}
  for name, params in (("val_loss", state.params), ("val_loss_ema", state.ema_params)):
    sums, count = 0.0, 0.0
    for i in range(num_batches):
      host = pipeline.host_batch(i)
      shardings = {k: mesh_lib.batch_sharding(mesh, np.ndim(v)) for k, v in host.items()
                   if k in TRAIN_KEYS or k == "index"}
      s, c = eval_fn(params, global_batch(host, shardings, batch_size))
      sums = sums + np.asarray(jax.device_get(s), np.float64)
      count += float(c)
    out[name] = float(np.sum(sums) / (count * len(sums)))
  return out


def _make_sampler(graphdef, rest, info, mesh, num_samples, num_steps, method,
                  guidance_scale, seed):
  """jit(params, global batch) -> (uint8 samples, images, lowres or None) of the batch's
  first num_samples examples, replicated (so process 0 can write them).

  The samples are `imagen-sample`'s: example i is prompt i, sample 0 of root seed `seed`,
  sampled by `sample_stage` with `preview/SamplerSettings` (gin) and the method, steps and
  guidance scale given here; an SR stage super-resolves the example's own low-res image.
  """
  with gin.config_scope("preview"):
    settings = stage_lib.SamplerSettings(sampler=method, num_steps=num_steps,
                                         guidance_scale=guidance_scale)
  seeds = np.asarray(stage_lib.image_seeds(seed, range(num_samples), [0] * num_samples),
                     np.uint32)

  def run(params, batch):
    batch = {k: v[:num_samples] for k, v in batch.items()}
    fn = step_lib.model_fn(state_lib.merge_model(graphdef, params, rest), train=False)
    samples = stage_lib.sample_stage(fn, settings, info, seeds, 0,
                                     text_emb=jnp.asarray(batch["text_emb"], jnp.float32),
                                     text_mask=batch["text_mask"], lowres=batch.get("lowres"))
    return conditioning.to_uint8_image(samples), batch["image"], batch.get("lowres")

  return jax.jit(run, out_shardings=NamedSharding(mesh, P()))


def _sample_grid(sampler, state, pipeline, batch_size, mesh) -> np.ndarray:
  """Rows: [upsampled low-res input,] EMA samples, ground truth (fixed captions)."""
  host = pipeline.host_batch(0)
  shardings = {k: mesh_lib.batch_sharding(mesh, np.ndim(v)) for k, v in host.items()
               if k in TRAIN_KEYS or k == "index"}
  samples, images, lowres = jax.device_get(
      sampler(state.ema_params, global_batch(host, shardings, batch_size)))
  rows = [samples, np.asarray(images)]
  if lowres is not None:
    lowres = np.asarray(lowres)
    reps = samples.shape[1] // lowres.shape[1]
    rows.insert(0, lowres.repeat(reps, axis=1).repeat(reps, axis=2))
  zoom = max(1, -(-64 // samples.shape[1]))  # tiny images: enlarge (nearest) to >= 64 px
  return np.asarray(images_lib.make_grid(np.concatenate(rows, axis=0), pad=0,
                                         columns=samples.shape[0],
                                         cell_size=zoom * samples.shape[1]))


def _write_grid(model_dir, step, grid, writer) -> None:
  images_lib.write_png(epath.Path(model_dir) / "samples" / f"step_{step:08d}.png", grid)
  writer.write_images(step, {"samples": grid[None]})

