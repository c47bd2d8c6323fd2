r"""Sampling speed: the sampler's overhead around the model, and cascade images/s.

  .venv/bin/python benchmarks/sample.py                         # random tiny models
  .venv/bin/python benchmarks/sample.py --ddpm_steps=100        # quicker on a CPU
  .venv/bin/python benchmarks/sample.py --gin_file=runs/sample.gin \
      --gin.BASE_DIR="'runs/quickstart/base'" --gin.SR_DIR="'runs/quickstart/sr'" \
      --gin.T5_PATH="'runs/quickstart/t5'"                      # trained checkpoints

For each stage it prints:
- forward: one denoising forward pass of the model, at the batch the sampler feeds it
  (2 x batch with classifier-free guidance: conditional and unconditional halves);
- step: the sampler's time per step, (one compiled `StageSampler` call with
  `--fast_steps` dpmpp_2m steps) / steps; it includes guidance, thresholding, the update,
  and (amortised over the steps) the initial noise and the uint8 conversion;
- ratio = step / forward: the sampler's overhead around the model (1.0 = none).
Then images/s of the whole cascade with ddpm at `--ddpm_steps` (default 1000) and with
dpmpp_2m at `--fast_steps` (default 25), one batch per stage, compilation excluded (the
first call compiles, the second is timed).

Without --gin_file, the stages are random models built from --base_gin / --sr_gin
(default the tiny configs) with a stand-in text encoder (hash-derived embeddings): the
speed is that of the architecture, whatever the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.cli import gin_utils
from imagen_jax.sample import cascade as cascade_lib


class HashEncoder:
  """Stand-in for TextEncoder: deterministic pseudo-embeddings, one per prompt."""

  def __init__(self, d_model: int, max_length: int):
    self.d_model, self.max_length = d_model, max_length
    self.identity = {"name": "benchmark-hash", "d_model": d_model, "max_length": max_length,
                     "vocab_sha256": "0" * 64, "weights_sha256": "0" * 64}

  def encode_with_info(self, prompts):
    emb = np.zeros((len(prompts), self.max_length, self.d_model), np.float32)
    mask = np.zeros((len(prompts), self.max_length), bool)
    for row, prompt in enumerate(prompts):
      seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
      length = min(self.max_length, len(prompt.split()) + 1)
      emb[row, :length] = np.random.default_rng(seed).standard_normal((length, self.d_model))
      mask[row, :length] = True
    return emb, mask, []


def random_params(abstract_params, seed: int):
  """Random parameters drawn in numpy (no compilation): kernels ~ N(0, 1/fan_in)."""
  rng = np.random.RandomState(seed)

  def draw(path, x):
    name, shape = str(getattr(path[-1], "key", path[-1])), tuple(x.shape)
    if name == "scale":
      return np.ones(shape, np.float32)
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    std = 1.0 / np.sqrt(fan_in) if name == "kernel" else 0.02
    return (std * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_params)


def random_stage(model_gin: str, stage: cascade_lib.Stage, identity: dict,
                 seed: int) -> cascade_lib.LoadedStage:
  """A stage with a random model of the given gin config."""
  from imagen_jax import nn
  from imagen_jax.train import checkpoint, state as state_lib
  gin.clear_config()
  gin_utils.parse_gin([model_gin], [f"TEXT_DIM = {identity['d_model']}"], finalize=False)
  create = lambda: nn.create_model(rngs=nnx.Rngs(params=seed, dropout=seed))
  with state_lib.no_eager_sharding():
    abstract = nnx.eval_shape(create)
  graphdef, abstract_params, _ = state_lib.split_model(abstract)
  params = random_params(abstract_params, seed)
  model = state_lib.merge_model(graphdef, params, checkpoint.model_rest_state(create))
  gin.clear_config()
  info = checkpoint.ModelInfo(
      model_class=type(model).__name__, image_size=model.image_size,
      lowres_size=model.lowres_size, text_dim=model.text_dim, lowres_resize="bicubic",
      encoder=identity)
  return cascade_lib.LoadedStage(stage, model, info)


def timed(fn, repeats: int) -> float:
  """Fastest of `repeats` runs of fn() (already compiled), blocking on its result; the
  minimum is the least disturbed by other work on a shared machine."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def forward_seconds(cascade, k: int, repeats: int) -> float:
  """One model call at the batch the sampler gives it (doubled by guidance)."""
  from imagen_jax.parallel import mesh as mesh_lib
  stage = cascade.stages[k]
  b = cascade.stage_batch_size(k) * (1 if stage.config.guidance_scale == 1 else 2)
  graphdef, state = nnx.split(stage.model)
  mesh = cascade.mesh
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  size, dim, length = stage.image_size, stage.model.text_dim, cascade.text.max_length
  put = lambda x: jax.device_put(x, mesh_lib.batch_sharding(mesh, x.ndim))
  rng = np.random.RandomState(0)
  args = [put(rng.standard_normal((b, size, size, 3)).astype(np.float32)),
          put(np.full((b,), 1.0, np.float32)),
          put(rng.standard_normal((b, length, dim)).astype(np.float32)),
          put(np.ones((b, length), bool))]
  if stage.is_sr:
    args += [put(rng.standard_normal((b, size, size, 3)).astype(np.float32)),
             put(np.full((b,), 5.0, np.float32))]

  @jax.jit
  def forward(state, x, log_snr, emb, mask, lowres=None, lowres_log_snr=None):
    model = nnx.merge(graphdef, state)
    return model(x, log_snr, emb, mask, lowres=lowres, lowres_log_snr=lowres_log_snr)

  with jax.set_mesh(mesh):
    jax.block_until_ready(forward(state, *args))  # compile
    return timed(lambda: forward(state, *args), repeats)


def step_seconds(cascade, k: int, steps: int, repeats: int) -> float:
  """The compiled sampling loop of stage k with `steps` dpmpp_2m steps, per step."""
  stage = cascade.stages[k]
  config = dataclasses.replace(stage.config, sampler="dpmpp_2m", num_steps=steps, eta=0.0)
  loaded = cascade_lib.LoadedStage(config, stage.model, stage.info)
  b = cascade.stage_batch_size(k)
  sampler = cascade_lib.StageSampler(loaded, k, cascade.mesh, b)
  emb, mask = cascade.text([f"prompt {i}" for i in range(b)])
  seeds = np.arange(b, dtype=np.uint32)
  lowres = None
  if stage.is_sr:
    lowres = np.random.RandomState(0).randint(0, 256, (b, stage.lowres_size,
                                                      stage.lowres_size, 3)).astype(np.uint8)
  jax.block_until_ready(sampler(seeds, emb, mask, lowres))  # compile
  return timed(lambda: sampler(seeds, emb, mask, lowres), repeats) / steps


def cascade_images_per_second(cascade, method: str, steps: int) -> float:
  stages = [cascade_lib.LoadedStage(dataclasses.replace(s.config, sampler=method,
                                                        num_steps=steps, eta=0.0),
                                    s.model, s.info) for s in cascade.stages]
  timed_cascade = cascade_lib.Cascade(stages, cascade.text, batch_size=cascade.batch_size,
                                      mesh=cascade.mesh)
  prompts = [f"prompt {i}" for i in range(timed_cascade.stage_batch_size(0))]
  timed_cascade(prompts, seed=0)          # compiles every stage
  t0 = time.perf_counter()
  timed_cascade(prompts, seed=1)
  return len(prompts) / (time.perf_counter() - t0)


def build_cascade(args) -> cascade_lib.Cascade:
  if args.gin_file:
    return cascade_lib.Cascade.from_config(args.gin_file, args.gin_bindings,
                                           batch_size=args.batch_size)
  encoder = HashEncoder(args.text_dim, args.max_length)
  identity = encoder.identity
  stages = [random_stage(args.base_gin, cascade_lib.Stage(
      model_dir="random:base", guidance_scale=args.guidance_scale, thresholding="static"),
      identity, seed=0)]
  if args.sr_gin:
    stages.append(random_stage(args.sr_gin, cascade_lib.Stage(
        model_dir="random:sr", guidance_scale=args.guidance_scale, thresholding="static"),
        identity, seed=1))
  return cascade_lib.Cascade(stages, cascade_lib.PromptEncoder(encoder),
                             batch_size=args.batch_size)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--base_gin", default="models/tiny_base.gin")
  parser.add_argument("--sr_gin", default="models/tiny_sr.gin",
                      help="'' for the base stage alone")
  parser.add_argument("--text_dim", type=int, default=64, help="random models' text width")
  parser.add_argument("--max_length", type=int, default=32, help="random models' tokens")
  parser.add_argument("--guidance_scale", type=float, default=3.0)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--fast_steps", type=int, default=25)
  parser.add_argument("--ddpm_steps", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=3)
  args = gin_utils.parse_args(parser, argv)
  import imagen_jax.nn  # noqa: F401  (registers the model configurables)

  cascade = build_cascade(args)
  devices = cascade.mesh.devices.size
  print(f"{devices} x {jax.devices()[0].platform}, jax {jax.__version__}; "
        f"{'checkpoints' if args.gin_file else 'random models'}; batch "
        f"{cascade.stage_batch_size(0)}")
  for k, stage in enumerate(cascade.stages):
    fwd = forward_seconds(cascade, k, args.repeats)
    step = step_seconds(cascade, k, args.fast_steps, args.repeats)
    guided = "2x" if stage.config.guidance_scale != 1 else "1x"
    print(f"stage {k} ({stage.lowres_size or '-'} -> {stage.image_size} px): forward "
          f"({guided} batch) {fwd * 1e3:.2f} ms; dpmpp_2m step {step * 1e3:.2f} ms; "
          f"ratio {step / fwd:.3f}", flush=True)
  for method, steps in (("dpmpp_2m", args.fast_steps), ("ddpm", args.ddpm_steps)):
    rate = cascade_images_per_second(cascade, method, steps)
    print(f"cascade {method} x {steps} steps: {rate:.3g} images/s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(gin_utils.run(main))
