"""Compile time of a model's parameter initialisation, and whether its values change.

  python benchmarks/init_compile.py --gin_file=experiments/quickstart_base.gin \
      [--gin.TEXT_DIM=64] [--rounds=2]

A fresh training run starts by compiling the initialisation of the gin-configured model in
one program (`train.initial_state`; `nn.init_model` does the same). It runs once, so it is
compiled with `nn.INIT_COMPILER_OPTIONS` (LLVM O1). This compiles the same program with
XLA's default options and with those, alternating, each time without the persistent
compilation cache, prints the compile times, and checks that both give the same
parameters bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
  from imagen_jax.cli import gin_utils
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
  args = gin_utils.parse_args(parser, argv)

  import jax
  import numpy as np
  from flax import nnx

  from imagen_jax import nn
  jax.config.update("jax_enable_compilation_cache", False)
  gin_utils.apply_gin_args(args, finalize=False)  # only the model is built

  def init():
    return nnx.state(nn.create_model(rngs=nnx.Rngs(0)), nnx.Param)

  variants = {"default (O2)": {}, "nn.INIT_COMPILER_OPTIONS": nn.INIT_COMPILER_OPTIONS}
  times = {name: [] for name in variants}
  values = {}
  for _ in range(args.rounds):
    for name, options in variants.items():
      start = time.perf_counter()
      # A new function object each time: jit's in-memory cache must not answer.
      compiled = jax.jit(lambda: init(), compiler_options=options).lower().compile()
      times[name].append(time.perf_counter() - start)
      values[name] = [np.asarray(x) for x in jax.tree.leaves(compiled())]
  print(f"{nn.param_count(nn.abstract_model()) / 1e6:.2f}M parameters in "
        f"{len(values['default (O2)'])} arrays")
  for name, seconds in times.items():
    print(f"{name:26s} compile s by round: " + ", ".join(f"{s:.1f}" for s in seconds))
  a, b = values.values()
  same = all(np.array_equal(x, y) for x, y in zip(a, b))
  print("same parameters bit for bit:", same)
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
