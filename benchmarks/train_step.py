"""Train-step benchmark: compile time, steps/s, examples/s and MFU for a training config.

  python benchmarks/train_step.py --gin_file=experiments/tiny_base.gin [--steps=30] \
      [--warmup=5] [--text_length=16] [--gin.BATCH_SIZE=32] [--gin.train.num_devices=1]

It runs `imagen_jax.train.loop.train` (the real jitted step, shardings and donation) on
synthetic batches of the config's shapes (random images, or crops of `train.crop_size`;
random text embeddings), so the figure is the step's speed without the input pipeline.
MODEL_DIR is a temporary directory and no checkpoint is written until the end. MFU uses
`train.peak_flops_per_device` when set, else a measured matmul peak (on a shared CPU the
measured peak, and so MFU, is rough).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import ml_dtypes
import numpy as np


class SyntheticPipeline:
  """Random batches of the right shapes; batch k is a function of k."""

  def __init__(self, batch_size, image_size, lowres_size, text_length, text_dim):
    self.b, self.s, self.lo, self.l, self.d = (batch_size, image_size, lowres_size,
                                               text_length, text_dim)

  def host_batch(self, step):
    rng = np.random.default_rng(step)
    out = {"image": rng.integers(0, 256, (self.b, self.s, self.s, 3), dtype=np.uint8),
           "text_emb": rng.standard_normal((self.b, self.l, self.d), np.float32).astype(
               ml_dtypes.bfloat16),
           "text_mask": np.arange(self.l)[None, :] < rng.integers(1, self.l + 1, (self.b, 1)),
           "index": np.arange(step * self.b, (step + 1) * self.b)}
    if self.lo:
      out["lowres"] = rng.integers(0, 256, (self.b, self.lo, self.lo, 3), dtype=np.uint8)
    return out


def main(argv=None) -> int:
  from imagen_jax.cli import gin_utils
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--steps", type=int, default=30, help="timed steps")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compiling")
  parser.add_argument("--text_length", type=int, default=128, help="text tokens L")
  args = gin_utils.parse_args(parser, argv)

  import gin
  import jax
  import imagen_jax.nn  # noqa: F401
  from imagen_jax.train import loop
  from imagen_jax import config
  gin_utils.apply_gin_args(args, finalize=False)
  with tempfile.TemporaryDirectory() as tmp:
    with gin.unlock_config():
      gin.bind_parameter("train.model_dir", tmp)
      gin.bind_parameter("train.dataset", None)
      gin.bind_parameter("train.train_steps", args.warmup + args.steps)
      gin.bind_parameter("train.log_every", args.warmup if args.warmup else args.steps)
      gin.bind_parameter("train.checkpoint_every", 10**9)
      gin.bind_parameter("train.val_every", 0)
      gin.bind_parameter("train.sample_every", 0)
      gin.bind_parameter("train.tensorboard", False)
      gin.bind_parameter("train.progress", False)
    batch_size = int(gin.query_parameter("BATCH_SIZE/macro.value"))
    from imagen_jax.nn import abstract_model
    model = abstract_model()
    # An SR stage trained on crops (train.crop_size) gets crops of its shape, as the real
    # pipeline feeds it: the image and the matching crop of the low-resolution input.
    size, lowres = int(model.image_size), getattr(model, "lowres_size", None)
    crop = config.binding("train.crop_size")
    if crop:
      size, lowres = crop, lowres and int(lowres) * crop // size
    pipeline = SyntheticPipeline(batch_size, size, lowres, args.text_length,
                                 int(model.text_dim))
    out = loop.train(pipeline=pipeline)
  timed = out["history"][-1]
  num_params = imagen_jax.nn.param_count(out["state"].params)
  print(f"config: {' '.join(args.gin_file)} {' '.join(args.gin_bindings)}")
  print(f"devices: {out['num_devices']} x {jax.devices()[0].device_kind}; "
        f"params: {num_params / 1e6:.2f}M; global batch: {batch_size}")
  print(f"compile: {out['compile_s']:.1f} s")
  print(f"steps/s: {timed['steps_per_s']:.2f}   examples/s: {timed['examples_per_s']:.1f}")
  flops = out["model_flops"]
  if flops:
    print(f"model FLOPs/step: {flops:.3g}   peak FLOP/s per device: {out['peak_flops']:.3g}")
    print(f"MFU: {timed.get('mfu', float('nan')):.2%}"
          + (f"   HFU: {timed['hfu']:.2%}" if timed.get("hfu") is not None else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
