"""imagen-plan: parameters, FLOPs and memory per device of a training run, planned abstractly.

  imagen-plan --gin_file=experiments/imagen_base64.gin --mesh=data:8,fsdp:4,tensor:2 [--json]

It simulates exactly the devices the mesh names (CPU devices through XLA_FLAGS, set before
jax starts), builds the model with `nnx.eval_shape` and lowers the train step with abstract
inputs, so nothing is allocated. The batch size, resolution and optimizer come from the gin
config (add a run or experiment file with another --gin_file); --batch overrides the global
batch. See `imagen_jax.train.plan` for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence

from imagen_jax.cli import gin_utils
from imagen_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="imagen-plan", description=__doc__.split("\n\n")[0])
  gin_utils.add_gin_flags(p)
  p.add_argument("--mesh", default="data:1",
                 help="mesh axes and sizes, e.g. data:8,fsdp:4,tensor:2 (default data:1)")
  p.add_argument("--batch", type=int, default=None,
                 help="global batch size (default: the gin BATCH_SIZE macro, else one "
                 "example per data-parallel shard)")
  p.add_argument("--json", action="store_true", help="print one JSON object on one line")
  p.add_argument("--no_compile", action="store_true",
                 help="skip compiling the step: no temporaries in the memory figure, but "
                 "much faster for big models")
  return p


def _simulate_devices(count: int) -> None:
  """Makes jax see `count` CPU devices; must run before jax initialises its backend."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():  # XLA_FLAGS is read once, at backend start
    import jax  # pylint: disable=import-outside-toplevel
    if jax.device_count() < count:
      raise UserError(f"this process already started jax with {jax.device_count()} devices "
                      f"but the mesh needs {count}; run imagen-plan as its own command")
    return
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's SPMD warnings flood the output


def _main(argv: Sequence[str] | None = None) -> int:
  args = gin_utils.parse_args(_parser(), argv)
  from imagen_jax.parallel.mesh import parse_mesh_spec  # pylint: disable=import-outside-toplevel
  from imagen_jax.train import plan as plan_lib  # pylint: disable=import-outside-toplevel
  shape = parse_mesh_spec(args.mesh)
  count = plan_lib.devices_for(shape)
  _simulate_devices(count)
  import jax  # pylint: disable=import-outside-toplevel
  from imagen_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  # Nothing is trained, so an experiment file's run macros (MODEL_DIR, DATASET, ...) may
  # stay unset: the config is not finalized.
  gin_utils.apply_gin_args(args, finalize=False)
  mesh = mesh_lib.make_mesh(shape, devices=jax.devices()[:count])
  result = plan_lib.plan_training(mesh, **plan_lib.gin_settings(args.batch),
                                  compile_step=not args.no_compile)
  if args.json:
    print(json.dumps(result, sort_keys=True))
  else:
    print(plan_lib.format_plan(result))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return gin_utils.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
