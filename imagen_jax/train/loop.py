"""The training loop of one cascade stage: setup, resume, steps, checkpoints, metrics.

`train` reads top to bottom, in big_vision's spirit: mesh, model layout, data, run
directory, initial state (`initial_state.setup_initial_state`: resume, INIT_FROM or fresh),
the compiled step, then `_run_steps`. Everything comes from gin
(gin_configs/runs/train.gin binds its arguments to the required macros MODEL_DIR,
TRAIN_STEPS, DATASET and BATCH_SIZE); tests call it directly with a tiny model and
in-memory data.

Exactness: the state holds everything that feeds the next step (params, optimizer state,
EMA, step, root RNG); the data of step k is `pipeline.host_batch(k)`; the step key is
fold_in(root, k). So a run resumed from the checkpoint of step k does exactly what the
uninterrupted run did (same compiled program on the same mesh: bit-identical parameters).

Stopping: SIGTERM (one process) or JAX's preemption service (several) makes
`hosts.preemption_requested` true at the same step everywhere; the loop then saves a
checkpoint and returns (preemptible TPU VMs send SIGTERM). A step whose loss or gradient
norm is not finite changes nothing (`step.make_train_step`) and is counted
(`nonfinite_steps`); after `max_nonfinite_steps` such steps in a row the run stops with an
error naming the step, without saving: the last good checkpoint stays the latest.

Progress: step k's metrics are fetched once step k+1 is queued, so the device never idles,
and the tqdm bar advances when a step has finished: it shows real steps/s.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import time
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from imagen_jax import config, files
from imagen_jax import images as images_lib
from imagen_jax.data import labels as labels_lib
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.diffusion import conditioning
from imagen_jax.errors import UserError
from imagen_jax.parallel import hosts
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.diffusion import stage as stage_lib
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train import initial_state as initial_lib
from imagen_jax.train import metrics as metrics_lib
from imagen_jax.train import optim
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib
from imagen_jax.text import cache as cache_lib

log = logging.getLogger(__name__)

TRAIN_KEYS = ("image", "lowres", "text_emb", "text_mask", "label")
EVAL_KEYS = TRAIN_KEYS + ("index",)
TIME_CHECK_EVERY = 10  # steps between checks of train.max_minutes


class TrainingDiverged(UserError):
  """Too many non-finite steps in a row; the message names the step and the kept checkpoint."""


def due(step: int, every: int | None) -> bool:
  """Whether a periodic action (every `every` steps) runs after `step`; never for 0/None.
  (big_vision's `itstime`.)"""
  return bool(every) and every > 0 and step % every == 0


def _past(deadline: float) -> bool:
  """Whether time.monotonic() passed `deadline`, on process 0's clock (every process must
  stop at the same step)."""
  return hosts.process0_decides(time.monotonic() >= deadline)


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


def to_global(host_batch: dict, mesh, keys=TRAIN_KEYS) -> dict:
  """This host's rows of the named features -> global jax.Arrays, batch over (data, fsdp)."""
  return hosts.host_local_to_global({k: v for k, v in host_batch.items() if k in keys}, mesh)


def _open_data(model, *, dataset, val_dataset, embedding_cache, batch_size, seed,
               crop_size, max_length, pipeline, val_pipeline, need_val: bool):
  """-> (pipeline, val_pipeline or None, text encoder identity or None). A model without
  text (text_dim 0: a noise-aware classifier) reads no cache; one with a label set
  (`NoisyClassifier.labels`) gets each caption's class in the batch (`label`)."""
  make_val = val_pipeline is None and bool(val_dataset) and need_val
  cache = None
  if (pipeline is None or make_val) and int(model.text_dim):  # captions -> T5 embeddings
    cache = open_cache(embedding_cache, int(model.text_dim))
  labels = getattr(model, "labels", None)
  label_fn = labels_lib.get_label_set(labels).data_label if labels else None
  if labels and need_val:
    raise UserError("a classifier run (LossConfig.task='classifier') has no validation "
                    "loss, sample previews or sample evaluations: set train.val_every, "
                    "train.sample_every and train.eval_every to 0 (its training accuracy "
                    "is logged)")
  max_length = max_length or (int(cache.manifest["max_length"]) if cache else None)

  def make(spec):
    return pipeline_lib.Pipeline(
        spec, cache, image_size=int(model.image_size),
        lowres_size=getattr(model, "lowres_size", None), crop_size=crop_size,
        global_batch_size=batch_size, seed=seed, max_length=max_length,
        process_index=jax.process_index(), process_count=jax.process_count(),
        label_fn=label_fn)

  if pipeline is None:
    if not dataset:
      raise UserError("DATASET is not set; e.g. --gin.DATASET=\"'shapes'\"")
    pipeline = make(dataset)
  if make_val:
    val_pipeline = make(val_dataset)
  return pipeline, val_pipeline, (cache.manifest.get("encoder") if cache else None)


def _batches(pipeline, start: int):
  """Host batches from step `start` on, prepared ahead in a background thread when the
  pipeline can."""
  if hasattr(pipeline, "iter_batches"):
    yield pipeline.host_batch(start)
    yield from pipeline.iter_batches(start + 1, prefetch=2)
  else:
    yield from (pipeline.host_batch(k) for k in itertools.count(start))


# ----------------------------------------------------------------------------- set-up

def _check_settings(*, batch_size, micro_batches, mesh, max_minutes, max_nonfinite_steps):
  if max_minutes is not None and max_minutes <= 0:
    raise UserError(f"train.max_minutes must be > 0 (or None for no time limit), got "
                    f"{max_minutes}")
  if max_nonfinite_steps < 1:
    raise UserError(f"train.max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
  dp = mesh_lib.data_parallel_size(mesh)
  if batch_size % dp:
    raise UserError(f"BATCH_SIZE={batch_size} is not divisible by the data-parallel size "
                    f"{dp} (mesh {dict(mesh.shape)}: data x fsdp); use a multiple of {dp}")
  if (batch_size // dp) % micro_batches:
    raise UserError(f"the per-device batch {batch_size // dp} is not divisible by "
                    f"micro_batches={micro_batches}; change BATCH_SIZE or micro_batches")
  if batch_size % jax.process_count():
    raise UserError(f"BATCH_SIZE={batch_size} is not divisible by the "
                    f"{jax.process_count()} processes")


def _make_mesh(mesh_shape, num_devices):
  if num_devices is not None and jax.process_count() > 1:
    raise UserError("train.num_devices only applies to single-process runs; leave it None")
  return hosts.global_mesh(mesh_shape, devices=(None if num_devices is None
                                                else jax.devices()[:num_devices]))


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The compiled train step and its cost: FLOPs per step as run (`hardware_flops`, with
  rematerialisation) and without recomputation (`model_flops`, for MFU)."""
  fn: Callable
  compile_s: float
  model_flops: float | None
  hardware_flops: float | None
  remat: bool


def _compile_step(init, tx, lr, loss_cfg, micro_batches, mesh, first_batch) -> CompiledStep:
  """Lowers and compiles the jitted step (state donated) for the first batch's shapes."""
  replicated = NamedSharding(mesh, P())
  batch = to_global(first_batch, mesh)
  batch_sh = {k: v.sharding for k, v in batch.items()}
  flat_grad_mesh = step_lib.flat_grad_mesh_for(mesh, init.state_shardings.params)
  step_kw = dict(loss_cfg=loss_cfg, lr_fn=lr, micro_batches=micro_batches,
                 batch_sharding=functools.partial(mesh_lib.batch_sharding, mesh),
                 flat_grad_mesh=flat_grad_mesh)
  jit_kw = dict(in_shardings=(init.state_shardings, batch_sh),
                out_shardings=(init.state_shardings, replicated))

  def jitted(no_remat=False, for_flop_count=False, **kw):
    fn = step_lib.make_train_step(init.graphdef, init.rest, tx, no_remat=no_remat,
                                  for_flop_count=for_flop_count, **step_kw)
    return jax.jit(lambda s, b: fn(s, b, step_lib.step_key(s.rng, s.step)), **jit_kw, **kw)

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = jitted(donate_argnums=(0,)).lower(init.state, batch)
    compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  if jax.process_count() > 1:
    # Processes compile at different speeds (only process 0 writes the compilation cache);
    # meet here so that the first step's collectives do not hit gloo's 30 s connect limit.
    hosts.sync_global_devices("train_step_compiled")
  # XLA's count of the run's step can be one device's (the flat sum's shard_map) or one
  # micro-batch's (their loop): then count the whole batch's on `for_flop_count`'s step.
  if flat_grad_mesh is not None or micro_batches > 1:
    with jax.set_mesh(mesh):
      lowered = jitted(for_flop_count=True).lower(init.state, batch)
  hardware = model = metrics_lib.cost_flops(lowered)
  remat = any(getattr(m, "remat", False) for _, m in nnx.iter_modules(init.model))
  if remat:  # model FLOPs = the same step without recomputation
    with jax.set_mesh(mesh):
      model = metrics_lib.cost_flops(jitted(no_remat=True, for_flop_count=True).lower(
          init.state, batch))
  log.info("compiled the train step in %.1fs; %.3g model FLOPs/step", compile_s,
           model or float("nan"))
  return CompiledStep(compiled, compile_s, model, hardware, remat)


def _peak_flops(given: float | None, model_flops: float | None) -> float | None:
  if given is not None or not model_flops:
    return given
  if jax.default_backend() == "cpu":
    # Simulated CPU devices share the machine's cores, and a matmul on one of them uses
    # every core: the measured peak is the machine's, split between the devices.
    return metrics_lib.measured_peak_flops(jnp.float32, n=1024) / jax.local_device_count()
  return metrics_lib.measured_peak_flops(jnp.bfloat16, n=8192)  # big matmuls to peak


# ----------------------------------------------------------------------------- metrics

class MetricsReporter:
  """Each finished step's metrics in; every flush, their means with throughput, MFU and
  the count of skipped (non-finite) steps out to the metric writer.

  Time spent outside training steps (validation, samples) is `exclude`d from steps/s.
  `consecutive_nonfinite` counts the skipped steps since the last finite one.
  """

  def __init__(self, writer, *, batch_size: int, num_devices: int, step: CompiledStep,
               peak: float | None, pipeline=None):
    self.writer, self.batch_size, self.num_devices = writer, batch_size, num_devices
    self.pipeline = pipeline  # its decode_failures (undecodable images replaced) are logged
    self.flops, self.peak = step, peak
    self.pending: list[dict] = []
    self.since = time.perf_counter()
    self.last: dict[str, Any] = {"compile_s": step.compile_s}
    self.history: list[dict] = []
    self.consecutive_nonfinite = 0

  def add(self, metrics: dict) -> None:
    self.pending.append(metrics)
    skipped = metrics.get("nonfinite", 0.0) > 0
    self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if skipped else 0

  def exclude(self, seconds: float) -> None:
    self.since += seconds

  def flush(self, step: int) -> dict:
    """Writes the means since the last flush at `step`; -> those scalars ({} if none)."""
    if not self.pending:
      return {}
    elapsed = time.perf_counter() - self.since
    steps_per_s = len(self.pending) / elapsed if elapsed > 0 else float("nan")
    # Means over the finite steps only; with none, the last finite values stand.
    good = [m for m in self.pending if not m.get("nonfinite")]
    scalars = {k: float(np.mean([m[k] for m in good])) for k in (good[-1] if good else ())
               if k != "nonfinite"}
    scalars["learning_rate"] = float(self.pending[-1]["learning_rate"])
    scalars["nonfinite_steps"] = float(sum(m.get("nonfinite", 0.0) for m in self.pending))
    scalars.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * self.batch_size)
    util = functools.partial(metrics_lib.utilisation, steps_per_s=steps_per_s,
                             peak_per_device=self.peak, num_devices=self.num_devices)
    scalars["mfu"] = util(self.flops.model_flops)
    if self.flops.remat:
      scalars["hfu"] = util(self.flops.hardware_flops)
    scalars["decode_failures"] = float(getattr(self.pipeline, "decode_failures", 0)) or None
    scalars = {k: v for k, v in scalars.items() if v is not None}
    self.writer.write_scalars(step, scalars)
    self.pending.clear()
    self.since = time.perf_counter()
    self.last.update(scalars)
    self.history.append({"step": step, **scalars})
    return scalars


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
          eval_every: int = 0, training_eval=None, init_from: str | None = None, init_from_ema: bool = False,
          peak_flops_per_device: float | None = None, stop_after: int | None = None,
          max_minutes: float | None = None, max_nonfinite_steps: int = 20,
          progress: bool = True, tensorboard: bool = True,
          loss_cfg: step_lib.LossConfig | None = None,
          create_model_fn: Callable | None = None, pipeline=None,
          val_pipeline=None) -> dict:
  """Trains one stage for `train_steps` optimizer steps in total (resuming if MODEL_DIR has
  a checkpoint) and returns {"state", "step", "status" ("done", "preempted" or
  "time_limit"), "metrics" (the last values), "history" (every logged interval),
  "compile_s", "model_flops", "peak_flops", "num_devices"}.

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
    log_every: steps between metric lines/summaries.
    val_every, val_batches: validation loss at fixed noise levels every val_every steps.
    sample_every, num_samples, sample_steps, sample_method, guidance_scale: a grid of EMA
      samples for the first num_samples validation (else training) captions.
    eval_every, training_eval: EMA samples scored every eval_every steps (0 = off) by
      training_eval (`@TrainingEval()`, FID and CLIP score: eval/in_training.py).
    init_from: another run's MODEL_DIR to fine-tune from (params; new optimizer state).
    init_from_ema: start the EMA from that run's EMA instead of from its params.
    peak_flops_per_device: for MFU; None measures a matmul's FLOP/s.
    stop_after: stop (saving a checkpoint) after this many steps of this run, as on SIGTERM.
    max_minutes: stop (saving a checkpoint) once this call has run this many minutes,
      setup and compilation included; checked every TIME_CHECK_EVERY steps, on process 0's
      clock. A time budget for runs whose machine speed is unknown (the quickstart);
      running again continues to train_steps exactly as if it had not stopped.
    max_nonfinite_steps: stop with TrainingDiverged after this many consecutive steps whose
      loss or gradient norm is not finite (each such step is skipped: no update).
    progress: show a tqdm bar (process 0).
    tensorboard: write TensorBoard summaries under MODEL_DIR/tb (else metrics are logged).
    loss_cfg: LossConfig (default from gin).
    create_model_fn, pipeline, val_pipeline: injection points for tests and benchmarks
      (anything with `host_batch(step)` is a pipeline).
  """
  started = time.monotonic()
  loss_cfg = (loss_cfg or step_lib.LossConfig()).validate()
  is_main = jax.process_index() == 0
  model_dir = epath.Path(model_dir)
  mesh = _make_mesh(mesh_shape, num_devices)
  _check_settings(batch_size=batch_size, micro_batches=micro_batches, mesh=mesh,
                  max_minutes=max_minutes, max_nonfinite_steps=max_nonfinite_steps)

  # The model, abstract first: nothing allocated before the shardings are known.
  if create_model_fn is None:
    from imagen_jax.nn import create_model as create_model_fn

  def create():  # a fresh Rngs per call: it is mutated while the model is built
    return create_model_fn(rngs=nnx.Rngs(params=seed, dropout=seed + 1))

  layout = initial_lib.abstract_layout(create, mesh)
  pipeline, val_pipeline, encoder = _open_data(
      layout.model, dataset=dataset, val_dataset=val_dataset,
      embedding_cache=embedding_cache, batch_size=batch_size, seed=seed,
      crop_size=crop_size, max_length=max_length, pipeline=pipeline,
      val_pipeline=val_pipeline, need_val=bool(val_every or sample_every or eval_every))
  info = ckpt_lib.model_info(layout.model, layout.params_shapes, loss_cfg=loss_cfg,
                             encoder=encoder)
  ckpt_lib.check_or_write_model_json(model_dir, info, write=is_main)
  tx, lr = optim.make_optimizer()
  checkpointer = ckpt_lib.Checkpointer(model_dir, save_every=checkpoint_every,
                                       keep=keep_checkpoints, async_save=async_checkpoint)
  init = initial_lib.setup_initial_state(create, mesh, tx=tx, seed=seed,
                                         checkpointer=checkpointer, init_from=init_from,
                                         init_from_ema=init_from_ema, layout=layout)
  start_step = int(jax.device_get(init.state.step))
  if start_step >= train_steps:
    checkpointer.close()
    log.info("MODEL_DIR is already at step %d >= TRAIN_STEPS=%d", start_step, train_steps)
    return {"state": init.state, "step": start_step, "status": "done", "metrics": {},
            "history": [], "compile_s": 0.0, "model_flops": None, "peak_flops": None}
  batches = _batches(pipeline, start_step)
  first = next(batches)
  step_fn = _compile_step(init, tx, lr, loss_cfg, micro_batches, mesh, first)
  peak = _peak_flops(peak_flops_per_device, step_fn.model_flops)
  run = _make_run(
      init, step_fn, checkpointer, mesh=mesh, model_dir=model_dir, loss_cfg=loss_cfg,
      pipeline=pipeline, val_pipeline=val_pipeline, peak=peak, seed=seed,
      info=info, first_run=start_step == 0, settings=LoopSettings(
          train_steps=train_steps, batch_size=batch_size, micro_batches=micro_batches,
          checkpoint_every=checkpoint_every, log_every=log_every, val_every=val_every,
          val_batches=val_batches, sample_every=sample_every, num_samples=num_samples,
          sample_steps=sample_steps, sample_method=sample_method,
          guidance_scale=guidance_scale, eval_every=eval_every, training_eval=training_eval,
          stop_after=stop_after, max_minutes=max_minutes, progress=progress,
          max_nonfinite_steps=max_nonfinite_steps, tensorboard=tensorboard, started=started))
  try:
    state, step, status = _run_steps(run, init.state, start_step, itertools.chain([first],
                                                                                  batches))
  finally:
    batches.close()
    checkpointer.close()
    run.writer.flush()
  return {"state": state, "step": step, "status": status, "metrics": run.reporter.last,
          "history": run.reporter.history, "compile_s": step_fn.compile_s,
          "model_flops": step_fn.model_flops, "peak_flops": peak,
          "num_devices": int(mesh.devices.size)}


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """`train`'s arguments that steer the loop once it is set up (see `train`)."""
  train_steps: int
  batch_size: int
  micro_batches: int
  checkpoint_every: int
  log_every: int
  val_every: int
  val_batches: int
  sample_every: int
  num_samples: int
  sample_steps: int
  sample_method: str
  guidance_scale: float
  eval_every: int
  training_eval: Any
  stop_after: int | None
  max_minutes: float | None
  max_nonfinite_steps: int
  progress: bool
  tensorboard: bool
  started: float  # time.monotonic() when train() began (max_minutes counts from it)


def _make_run(init, step_fn: CompiledStep, checkpointer, *, mesh, model_dir, loss_cfg,
              pipeline, val_pipeline, peak, seed, info, first_run,
              settings: LoopSettings) -> "_Run":
  """The run's fixed parts: metric writer, reporter, validation and sample functions."""
  c = settings
  is_main = jax.process_index() == 0
  writer = _open_run_dir(model_dir, tensorboard=c.tensorboard, first_run=first_run,
                         hparams={"batch_size": c.batch_size, "train_steps": c.train_steps,
                                  "num_params": info.num_params,
                                  "micro_batches": c.micro_batches,
                                  "mesh": str(dict(mesh.shape))})
  eval_fn = sampler = None
  if c.val_every and val_pipeline is not None:
    eval_fn = _make_eval(init.graphdef, init.rest, loss_cfg, mesh)
  sample_source = val_pipeline if val_pipeline is not None else pipeline
  if c.sample_every:
    sampler = _make_sampler(init.graphdef, init.rest, info, mesh,
                            min(c.num_samples, c.batch_size), c.sample_steps,
                            c.sample_method, c.guidance_scale, seed)
  training_eval = None
  if c.eval_every:
    training_eval = _make_training_eval(
        c.training_eval, _make_sampler(init.graphdef, init.rest, info, mesh, c.batch_size,
                                       c.sample_steps, c.sample_method, c.guidance_scale,
                                       seed),
        sample_source, mesh, seed, c.batch_size)
  periodic = functools.partial(
      _periodic, eval_fn=eval_fn, val_every=c.val_every, val_batches=c.val_batches,
      val_pipeline=val_pipeline, sampler=sampler, sample_every=c.sample_every,
      training_eval=training_eval, eval_every=c.eval_every, sample_source=sample_source,
      batch_size=c.batch_size, model_dir=model_dir, mesh=mesh, writer=writer,
      train_steps=c.train_steps)
  return _Run(
      mesh=mesh, step_fn=step_fn.fn, checkpointer=checkpointer, writer=writer,
      reporter=MetricsReporter(writer, batch_size=c.batch_size,
                               num_devices=mesh.devices.size, step=step_fn, peak=peak,
                               pipeline=pipeline),
      train_steps=c.train_steps, checkpoint_every=c.checkpoint_every,
      log_every=c.log_every, stop_after=c.stop_after,
      max_nonfinite_steps=c.max_nonfinite_steps,
      deadline=None if c.max_minutes is None else c.started + 60 * c.max_minutes,
      max_minutes=c.max_minutes, show=is_main and c.progress, is_main=is_main,
      periodic=periodic)


def _open_run_dir(model_dir, *, tensorboard: bool, first_run: bool, hparams: dict):
  """Writes config.gin and model.gin (process 0) and opens the metric writer."""
  is_main = jax.process_index() == 0
  if is_main:
    config.write_operative_config(model_dir)
    files.write_atomic(model_dir / "model.gin", config.model_gin_str())
  writer = metrics_lib.create_writer(model_dir, process_index=jax.process_index(),
                                     tensorboard=tensorboard)
  if is_main and first_run:
    writer.write_hparams(hparams)
  return writer


@dataclasses.dataclass(frozen=True)
class _Run:
  """What `_run_steps` needs, fixed for the whole run."""
  mesh: Any
  step_fn: Callable
  checkpointer: ckpt_lib.Checkpointer
  writer: Any
  reporter: MetricsReporter
  train_steps: int
  checkpoint_every: int
  log_every: int
  stop_after: int | None
  max_nonfinite_steps: int
  deadline: float | None
  max_minutes: float | None
  show: bool
  is_main: bool
  periodic: Callable  # (state, step, say) -> metrics of validation/sampling at that step


def _stop_reason(run: _Run, step: int, start_step: int) -> str | None:
  """"time_limit", "preempted" or None, the same on every process."""
  if (run.deadline is not None and step % TIME_CHECK_EVERY == 0 and step < run.train_steps
      and _past(run.deadline)):
    return "time_limit"
  if hosts.preemption_requested(step):
    return "preempted"
  if run.stop_after is not None and step - start_step >= run.stop_after:
    return "preempted"
  return None


def _run_steps(run: _Run, state, start_step: int, batches) -> tuple[Any, int, str]:
  """Steps from start_step to run.train_steps (or a stop) -> (state, step, status).

  Step k+1 is dispatched before step k's metrics are fetched (the device always has
  work queued); the bar advances when they arrive, so it counts finished steps.
  """
  from tqdm import tqdm
  bar = tqdm(total=run.train_steps, initial=start_step, disable=not run.show, desc="train",
             unit="step", dynamic_ncols=True)
  say = bar.write if run.show else log.info
  unfetched: list[tuple[int, Any]] = []

  def fetch_finished():
    for s, m in unfetched:
      run.reporter.add(jax.device_get(m))
      bar.update(1)
      if run.reporter.consecutive_nonfinite >= run.max_nonfinite_steps:
        raise _diverged(run, s)
    unfetched.clear()

  step, status = start_step, "done"
  try:
    with hosts.sigterm_requests_preemption(), jax.set_mesh(run.mesh):
      while step < run.train_steps:
        state, metrics = run.step_fn(state, to_global(next(batches), run.mesh))
        step += 1
        fetch_finished()  # the step before this one
        unfetched.append((step, metrics))
        stop = _stop_reason(run, step, start_step)
        save = stop is not None or step == run.train_steps or due(step, run.checkpoint_every)
        if save or due(step, run.log_every):
          fetch_finished()
          scalars = run.reporter.flush(step)
          if scalars and due(step, run.log_every):
            say(metrics_lib.console_line(step, run.train_steps, scalars))
        t_extra = time.perf_counter()  # validation/sampling time is not training time
        run.reporter.last.update(run.periodic(state, step, say if run.is_main else None))
        run.reporter.exclude(time.perf_counter() - t_extra)
        if save:
          run.checkpointer.save(state, force=True,
                                meta={"loss": run.reporter.last.get("loss"),
                                      "status": stop or "periodic"})
        if stop is not None:
          status = stop
          if stop == "time_limit":
            say(f"train.max_minutes={run.max_minutes:g} reached: stopping at step {step} of "
                f"{run.train_steps} (checkpoint saved; run again to continue)")
          else:
            log.info("stopping at step %d (checkpoint saved)", step)
          break
      fetch_finished()
  finally:
    bar.close()
  return state, step, status


def _diverged(run: _Run, step: int) -> TrainingDiverged:
  """The error for `max_nonfinite_steps` skipped steps in a row, ending at `step`."""
  run.checkpointer.wait()
  good = run.checkpointer.latest_step()
  kept = (f"the last good checkpoint (step {good}) is kept in {run.checkpointer.directory}"
          if good is not None else "no checkpoint was written")
  return TrainingDiverged(
      f"the loss or gradient norm was not finite for {run.max_nonfinite_steps} steps in a "
      f"row, up to step {step} (those steps were skipped); training stopped and {kept}. "
      "Lower the learning rate (lr_schedule.peak_lr), clip gradients harder "
      "(make_optimizer.clip_norm), check the data, or resume from that checkpoint")


def _periodic(state, step, say, *, mesh, writer, eval_fn, val_every, val_batches,
              val_pipeline, sampler, sample_every, sample_source, batch_size, model_dir,
              train_steps, training_eval=None, eval_every=0) -> dict:
  """Validation loss and the sample grid, when due at `step`; -> the validation metrics.
  `say` prints a line on process 0 (None on the others, which write nothing)."""
  out = {}
  if eval_fn is not None and due(step, val_every):
    out = _validate(eval_fn, state, val_pipeline, val_batches, mesh)
    writer.write_scalars(step, out)
    if say is not None:
      say(metrics_lib.console_line(step, train_steps, out))
  if training_eval is not None and due(step, eval_every):
    scores = training_eval(state)
    writer.write_scalars(step, scores)
    out.update(scores)
    if say is not None:
      say(metrics_lib.console_line(step, train_steps, scores))
  if sampler is not None and due(step, sample_every):
    grid = _sample_grid(sampler, state, sample_source, batch_size, mesh)
    if say is not None:
      _write_grid(model_dir, step, grid, writer)
  return out


def _make_eval(graphdef, rest, loss_cfg, mesh):
  eval_step = step_lib.make_eval_step(graphdef, rest, loss_cfg)
  return jax.jit(eval_step, out_shardings=NamedSharding(mesh, P()))


def _validate(eval_fn, state, pipeline, num_batches, mesh) -> dict:
  """Validation loss of params and EMA params over the first num_batches held-out batches,
  at the fixed noise levels of step.validation_levels."""
  out = {}
  for name, params in (("val_loss", state.params), ("val_loss_ema", state.ema_params)):
    sums, count = 0.0, 0.0
    for i in range(num_batches):
      s, c = eval_fn(params, to_global(pipeline.host_batch(i), mesh, EVAL_KEYS))
      sums = sums + np.asarray(jax.device_get(s), np.float64)
      count += float(c)
    out[name] = float(np.sum(sums) / (count * len(sums)))
  return out


def _make_sampler(graphdef, rest, info, mesh, num_samples, num_steps, method,
                  guidance_scale, seed):
  """jit(params, global batch, seeds=None) -> (uint8 samples, images, lowres or None) of the
  batch's first num_samples examples, replicated (so process 0 can write them).

  The samples are `imagen-sample`'s: example i is prompt i, sample 0 of root seed `seed`
  (or has seed `seeds[i]` when given),
  sampled by `sample_stage` with `preview/SamplerSettings` (gin) and the method, steps and
  guidance scale given here; an SR stage super-resolves the example's own low-res image.
  """
  with gin.config_scope("preview"):
    settings = stage_lib.SamplerSettings(sampler=method, num_steps=num_steps,
                                         guidance_scale=guidance_scale)
  if settings.classifier_scale:
    raise UserError("training previews do not load a classifier: drop "
                    "preview/SamplerSettings.classifier_scale (imagen-sample applies it, "
                    "docs/sample.md)")
  seeds = np.asarray(stage_lib.image_seeds(seed, range(num_samples), [0] * num_samples),
                     np.uint32)

  def run(params, batch, row_seeds=seeds):
    batch = {k: v[:num_samples] for k, v in batch.items()}
    fn = step_lib.model_fn(state_lib.merge_model(graphdef, params, rest), train=False)
    # An inpainting model previews text-to-image: all-unknown masks.
    shape = (num_samples, info.image_size, info.image_size)
    edit = ({"image": jnp.zeros((*shape, info.channels)), "mask": jnp.ones((*shape, 1))}
            if info.inpaint_channels else {})
    samples = stage_lib.sample_stage(fn, settings, info, row_seeds, 0,
                                     text_emb=jnp.asarray(batch["text_emb"], jnp.float32),
                                     text_mask=batch["text_mask"], lowres=batch.get("lowres"),
                                     **edit)
    return conditioning.to_uint8_image(samples), batch["image"], batch.get("lowres")

  return jax.jit(run, out_shardings=NamedSharding(mesh, P()))


def _make_training_eval(config, sampler, source, mesh, seed: int, batch_size: int):
  """`run(state) -> metrics`: EMA samples of the first `config.num_images` examples of
  `source` (fixed: the same captions and seeds at every evaluation), scored against their
  captions by `config.evaluator(mesh)` (e.g. eval.in_training.TrainingEval)."""
  if config is None:
    raise UserError("train.eval_every is set but train.training_eval is not: bind "
                    "train.training_eval = @TrainingEval() (docs/eval.md), or eval_every=0")
  if jax.process_count() > 1:
    raise UserError("train.eval_every runs in single-process training; score a checkpoint "
                    "with imagen-sample and imagen-eval fid / clip_score instead")
  evaluator = config.evaluator(mesh)
  num_batches = -(-config.num_images // batch_size)

  def run(state) -> dict:
    images, captions = [], []
    for b in range(num_batches):
      batch = source.host_batch(b)
      seeds = np.asarray(stage_lib.image_seeds(seed, batch["index"].tolist(),
                                               [0] * len(batch["index"])), np.uint32)
      samples, _, _ = jax.device_get(sampler(state.ema_params,
                                             to_global(batch, mesh, EVAL_KEYS), seeds))
      images.extend(np.asarray(samples))
      captions.extend(source.example(int(i))["caption"] for i in batch["index"])
    n = config.num_images
    return evaluator(images[:n], captions[:n])

  return run


def _sample_grid(sampler, state, pipeline, batch_size, mesh) -> np.ndarray:
  """Rows: [upsampled low-res input,] EMA samples, ground truth (fixed captions)."""
  samples, images, lowres = jax.device_get(
      sampler(state.ema_params, to_global(pipeline.host_batch(0), mesh, EVAL_KEYS)))
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

