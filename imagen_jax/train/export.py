"""Export a checkpoint's EMA (or raw) parameters to safetensors, with the model's gin config.

  python -m imagen_jax.train.export MODEL_DIR OUT_DIR [--step N] [--raw]

writes OUT_DIR/model.safetensors (one float32 tensor per parameter, named by its path in
the module tree joined with '/', e.g. `down_blocks/0/res/conv1/kernel`), OUT_DIR/model.gin
(rebuilds the module: `create_model(rngs=...)` after parsing it) and OUT_DIR/model.json
(MODEL_DIR's description plus the exported step and which parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from etils import epath
from flax import nnx

from imagen_jax import files
from imagen_jax.errors import UserError
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train import state as state_lib


def flatten_params(params) -> dict[str, np.ndarray]:
  """Nested dict of arrays -> {'a/b/c': numpy array}."""
  return {"/".join(path): np.asarray(jax.device_get(leaf))
          for path, leaf in state_lib.tree_paths(params).items()}


def export(model_dir, out_dir, *, step: int | None = None, use_ema: bool = True) -> dict:
  """Writes the safetensors file, model.gin and model.json; returns the model.json record."""
  import safetensors.numpy
  model, info = ckpt_lib.load_for_inference(model_dir, step=step, use_ema=use_ema)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors = flatten_params(params)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  record = info.to_json()
  record["exported"] = {"step": info.step, "params": "ema" if use_ema else "raw",
                        "from": os.fspath(model_dir)}
  # safetensors writes local files only; build the bytes and write them through epath.
  data = safetensors.numpy.save(tensors, metadata={"format": "imagen-jax",
                                                   "step": str(info.step),
                                                   "params": "ema" if use_ema else "raw"})
  files.write_atomic(out / "model.safetensors", data)
  files.write_atomic(out / "model.gin", info.model_gin)
  files.write_atomic(out / "model.json", json.dumps(record, indent=2, sort_keys=True))
  return record


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m imagen_jax.train.export",
      description="Export a checkpoint's EMA parameters to safetensors with its gin config.")
  parser.add_argument("model_dir", help="a MODEL_DIR written by imagen-train")
  parser.add_argument("out_dir", help="where to write model.safetensors, model.gin, model.json")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
  parser.add_argument("--raw", action="store_true", help="export the raw (non-EMA) parameters")
  args = parser.parse_args(argv)
  try:
    record = export(args.model_dir, args.out_dir, step=args.step, use_ema=not args.raw)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"exported step {record['exported']['step']} ({record['exported']['params']}) to "
        f"{args.out_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
