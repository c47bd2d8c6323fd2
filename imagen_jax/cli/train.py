"""imagen-train: trains one stage of the cascade (base or super-resolution).

  imagen-train --gin_file=experiments/imagen_base64.gin \
      --gin.MODEL_DIR="'gs://bucket/base'" --gin.DATASET="'records:gs://bucket/data/*'" \
      --gin.CACHE_DIR="'gs://bucket/t5_cache'"

Required gin macros: MODEL_DIR, TRAIN_STEPS, DATASET, BATCH_SIZE (global). Rerunning the
same command resumes from MODEL_DIR's last checkpoint. A thin layer over
`imagen_jax.train.loop.train`; see docs/train.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from imagen_jax.cli import gin_utils

REQUIRED_MACROS = ("MODEL_DIR", "TRAIN_STEPS", "DATASET", "BATCH_SIZE")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="imagen-train", description="Train one stage of an Imagen cascade.")
  gin_utils.add_gin_flags(parser)
  from imagen_jax.parallel import hosts
  hosts.add_distributed_flags(parser)
  parser.add_argument("--log_level", default="INFO", help="Python logging level.")
  return parser


def _main(argv: Sequence[str] | None) -> int:
  args = gin_utils.parse_args(_parser(), argv)
  logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if logging.getLogger().level > logging.DEBUG:  # orbax logs every file it writes at INFO
    logging.getLogger("absl").setLevel(logging.WARNING)
  # Before any JAX computation: joins the other hosts when there are any.
  from imagen_jax.parallel import hosts
  hosts.initialize(args)
  # Registers every configurable an experiment file may bind.
  import imagen_jax.nn  # noqa: F401
  import imagen_jax.eval.in_training  # noqa: F401  (TrainingEval, for train.eval_every)
  from imagen_jax.train import loop
  import gin
  gin.clear_config()  # main() may run more than once in a process (tests, notebooks)
  gin_utils.apply_gin_args(args)
  gin_utils.require_macros(*REQUIRED_MACROS)
  result = loop.train()
  metrics = result["metrics"]
  loss = metrics.get("loss")
  print(f"imagen-train: {result['status']} at step {result['step']}"
        + (f", loss {loss:.4f}" if loss is not None else ""), file=sys.stderr)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return gin_utils.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
