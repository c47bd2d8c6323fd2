"""Training metrics: FLOP counts and utilisation, metric writers, the console line.

MFU (model FLOP utilisation, PaLM appendix B) = model FLOPs per step x steps/s / (peak
FLOP/s per device x devices). Model FLOPs come from XLA's cost analysis of the step
lowered WITHOUT rematerialisation; with remat on, the same ratio computed from the step as
actually run (recomputation included) is the hardware FLOP utilisation (HFU).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from imagen_jax import images as images_lib

log = logging.getLogger(__name__)


def cost_flops(lowered_or_compiled) -> float | None:
  """Total FLOPs of a lowered (global, before partitioning) or compiled program."""
  try:
    cost = lowered_or_compiled.cost_analysis()
  except Exception as e:  # noqa: BLE001  (some backends have no cost model)
    log.warning("no XLA cost analysis: %s", e)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


_PEAK_CACHE: dict[str, float] = {}


def measured_peak_flops(dtype=jnp.bfloat16, n: int = 1024, repeats: int = 5) -> float:
  """Peak FLOP/s of one device, measured: the best of `repeats` timed n x n matmuls."""
  device = jax.local_devices()[0]  # jax.devices()[0] belongs to process 0 in multi-host runs
  key = f"{device.device_kind}/{jnp.dtype(dtype).name}/{n}"
  if key in _PEAK_CACHE:
    return _PEAK_CACHE[key]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  _PEAK_CACHE[key] = 2.0 * n**3 / best
  return _PEAK_CACHE[key]


def utilisation(flops_per_step: float | None, steps_per_s: float, peak_per_device: float | None,
                num_devices: int) -> float | None:
  if not flops_per_step or not peak_per_device:
    return None
  return flops_per_step * steps_per_s / (peak_per_device * num_devices)


def create_writer(model_dir, *, process_index: int = 0, tensorboard: bool = True):
  """The metric writer: TensorBoard summaries under MODEL_DIR/tb on process 0, the log
  elsewhere or without `tensorboard`."""
  if not tensorboard or process_index > 0:
    return LogWriter()
  return TensorBoardWriter(epath.Path(model_dir) / "tb")


class LogWriter:
  """clu's metric-writer interface (write_scalars, write_images, write_hparams, flush,
  close), writing to the log only."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    log.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))

  def write_images(self, step: int, images: dict) -> None:
    log.info("[%d] images: %s", step, {k: np.shape(v) for k, v in images.items()})

  def write_hparams(self, hparams: dict) -> None:
    log.info("hparams: %s", hparams)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter(LogWriter):
  """The same interface, writing a TensorBoard event file (not the log: the console line
  shows the scalars) with tensorboard's record format and protos. clu's writers go through
  `tf.summary`, and tensorboard's EventFileWriter through `tf.io.gfile`: importing
  TensorFlow cost every training run 4-5 s of start-up. Each write is one appended
  record, flushed."""

  def __init__(self, logdir):
    from tensorboard.summary.writer.record_writer import RecordWriter
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self._records = RecordWriter((logdir / name).open("wb"))
    self._add(None, file_version="brain.Event:2")

  def _add(self, summary, step: int = 0, **event) -> None:
    from tensorboard.compat.proto import event_pb2
    self._records.write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary,
                                        **event).SerializeToString())
    self._records.flush()

  def write_scalars(self, step: int, scalars: dict) -> None:
    from tensorboard.compat.proto import summary_pb2
    self._add(summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]),
              step)

  def write_images(self, step: int, images: dict) -> None:
    """images: name -> [N, H, W, C] (or [H, W, C]) uint8, or floats in [0, 1]."""
    from tensorboard.compat.proto import summary_pb2
    values = []
    for name, batch in images.items():
      batch = np.asarray(batch)
      batch = batch[None] if batch.ndim == 3 else batch
      if batch.dtype != np.uint8:
        batch = np.round(np.clip(batch, 0.0, 1.0) * 255).astype(np.uint8)
      for i, image in enumerate(batch):
        values.append(summary_pb2.Summary.Value(
            tag=name if len(batch) == 1 else f"{name}/{i}",
            image=summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1],
                                            colorspace=image.shape[-1],
                                            encoded_image_string=images_lib.png_bytes(image))))
    self._add(summary_pb2.Summary(value=values), step)

  def write_hparams(self, hparams: dict) -> None:
    from tensorboard.plugins.hparams import summary_v2
    self._add(summary_v2.hparams_pb({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                     for k, v in hparams.items()}))

  def close(self) -> None:
    self._records.close()


def console_line(step: int, total: int, scalars: dict) -> str:
  parts = [f"step {step}/{total}"]
  for name, fmt in (("loss", "{:.4f}"), ("accuracy", "{:.1%}"), ("grad_norm", "{:.3f}"),
                    ("learning_rate", "{:.2e}"),
                    ("steps_per_s", "{:.2f}"), ("examples_per_s", "{:.1f}"), ("mfu", "{:.2%}"),
                    ("hfu", "{:.2%}"), ("val_loss", "{:.4f}"), ("val_loss_ema", "{:.4f}"),
                    ("decode_failures", "{:.0f}"), ("eval/fid", "{:.2f}"),
                    ("eval/clip_score", "{:.2f}")):
    if name in scalars and scalars[name] is not None:
      parts.append(f"{name} " + fmt.format(scalars[name]))
  return "  ".join(parts)
