"""imagen-embed: encode every caption of a dataset with T5 into the embedding cache.

  imagen-embed --gin_file=runs/embed.gin --gin.DATASET="'shapes'" \
      --gin.CACHE_DIR="'runs/cache'" --gin.text_encoder.t5_path="'ckpt/t5-v1_1-xxl'"
  imagen-embed --gin_file=runs/embed.gin --gin.CACHE_DIR="'runs/cache'" \
      --gin.text_encoder.t5_path="'ckpt/t5'" --captions=captions.txt
  imagen-embed --gin_file=runs/cache/config.gin --verify     # check every shard's sha256

Captions come from the data source named by the gin macro `DATASET` (see
`imagen_jax.data.sources.get_source`), or from `--captions=FILE`, one caption per line.
Only captions the cache lacks are encoded, so a second run adds nothing and an interrupted
run resumes. The operative config is written to CACHE_DIR/config.gin, the run's counts and
captions/s per device to CACHE_DIR/embed_summary.json.

On several hosts every process runs the same command (launch/tpu_pod.sh, slurm.sbatch,
gke_jobset.py, or launch/multiprocess_cpu.sh N on one machine): each embeds its share of
the unique captions on its own devices and writes its own shards; the cache is the same
for any process count, and each process resumes its share.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import gin
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from imagen_jax import files
from imagen_jax.cli import gin_utils
from imagen_jax.errors import UserError
from imagen_jax.parallel import hosts
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import encode

SUMMARY_FILE = "embed_summary.json"


def read_caption_file(path: str | os.PathLike) -> list[str]:
  """Non-empty lines of a UTF-8 text file; UserError if missing or without captions."""
  path = epath.Path(path)
  if not path.exists():
    raise UserError(f"caption file {os.fspath(path)!r} does not exist")
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise UserError(f"caption file {os.fspath(path)!r} is not UTF-8 text: {e}") from e
  captions = [line for line in lines if line.strip()]
  if not captions:
    raise UserError(f"caption file {os.fspath(path)!r} is empty; write one caption per "
                    "line")
  return captions


def dataset_captions(spec: str) -> list[str]:
  try:
    from imagen_jax.data import sources
  except ImportError as e:  # pragma: no cover (the data package ships with this one)
    raise UserError(f"data sources are unavailable ({e}); pass --captions=FILE") from e
  captions = list(sources.get_source(spec).captions())
  if not captions:
    raise UserError(f"dataset {spec!r} has no captions")
  return captions


# How long a finished process waits for the slowest one before the manifest merge: the
# shares are equal in expectation, but a resumed process may have more left to do.
_FINISH_BARRIER_TIMEOUT_S = 7 * 24 * 3600


def _encoder_on_local_devices():
  """The configured encoder on this process's devices only. Embedding is embarrassingly
  parallel: no process waits for another's batches (no lockstep, no padded shares) and
  T5-XXL fits one host's accelerators (9.2 GB in bfloat16), so a global mesh would only
  add cross-host traffic; `text_encoder.mesh` still shards it over the local devices."""
  return encode.text_encoder(devices=jax.local_devices())


def _summary(stats: dict, process_count: int) -> dict:
  """Totals over the processes' stats (from each process, in process order). The run
  takes as long as its slowest process, start to merged cache (`wall_seconds`)."""
  per_process = _gather_stats(stats)
  new = sum(p["new"] for p in per_process)
  devices = sum(p["devices"] for p in per_process)
  seconds = max(p["wall_seconds"] for p in per_process)
  rate = new / seconds if seconds > 0 else 0.0
  return {"processes": process_count, "devices": devices, "captions": stats["captions"],
          "unique": sum(p["unique"] for p in per_process),
          "existing": sum(p["existing"] for p in per_process), "new": new,
          "shards": sum(p["shards"] for p in per_process),
          "truncated": sum(p["truncated"] for p in per_process),
          "seconds": round(seconds, 3), "captions_per_s": round(rate, 2),
          "captions_per_s_per_device": round(rate / devices, 3),
          "per_process": per_process}


def _gather_stats(stats: dict) -> list[dict]:
  fields = ("unique", "existing", "new", "shards", "truncated", "seconds", "wall_seconds")
  mine = np.asarray([*(float(stats[f]) for f in fields), jax.local_device_count()])
  rows = mine[None] if jax.process_count() == 1 else np.asarray(
      multihost_utils.process_allgather(mine))
  out = []
  for row in rows:
    entry = {f: (round(float(v), 3) if f.endswith("seconds") else int(v))
             for f, v in zip(fields, row)}
    entry["devices"] = int(row[-1])
    rate = entry["new"] / entry["seconds"] if entry["seconds"] > 0 else 0.0
    entry["captions_per_s_per_device"] = round(rate / entry["devices"], 3)
    out.append(entry)
  return out


@gin.configurable("embed")
def run_embed(dataset: str | None = None, cache_dir: str | None = None,
              shard_size: int = cache_lib.DEFAULT_SHARD_SIZE, *,
              captions_file: str | None = None, verify: bool = False,
              progress: bool = True) -> dict:
  """Embeds the captions of `dataset` (or `captions_file`) into the cache at `cache_dir`.

  With several processes each embeds its share of the unique captions on its own devices
  (`cache.build_cache`); the cache is the same for any process count. Returns the run's
  summary (also written to CACHE_DIR/embed_summary.json by process 0).
  """
  if cache_dir is None:
    raise UserError("no cache directory: set CACHE_DIR, e.g. --gin.CACHE_DIR=\"'runs/cache'\"")
  if verify:
    cache = cache_lib.EmbeddingCache.open(cache_dir)
    cache.verify()
    print(f"{cache_dir}: {len(cache)} captions in {len(cache.manifest['shards'])} shards, "
          "all checksums match")
    return {"captions": 0, "new": 0, "verified": len(cache)}
  if captions_file is not None:
    captions, source_name = read_caption_file(captions_file), captions_file
  elif dataset is not None:
    captions, source_name = dataset_captions(dataset), f"dataset {dataset!r}"
  else:
    raise UserError("no captions: set DATASET (--gin.DATASET=\"'shapes'\") or pass "
                    "--captions=FILE")
  encoder = _encoder_on_local_devices()
  cache_path = epath.Path(cache_dir)
  cache_path.mkdir(parents=True, exist_ok=True)
  main = jax.process_index() == 0
  if main:
    gin_utils.write_operative_config(cache_path)  # records the encoder before any work
  logging.info("embedding %s with %r on %d device(s) of process %d/%d, batch %d",
               source_name, encoder.encoder, encoder.mesh.size, jax.process_index(),
               jax.process_count(), encoder.batch_size)
  start = time.perf_counter()
  stats = cache_lib.build_cache(
      cache_path, captions, encoder, shard_size=shard_size, progress=progress,
      process_index=jax.process_index(), process_count=jax.process_count(),
      barrier=lambda name: hosts.sync_global_devices(name, _FINISH_BARRIER_TIMEOUT_S))
  stats["wall_seconds"] = time.perf_counter() - start
  summary = _summary(stats, jax.process_count())
  if stats["truncated"]:
    logging.warning("%d caption(s) were longer than %d tokens and were truncated",
                    stats["truncated"], encoder.max_length)
  if not main:
    return summary
  files.write_atomic(cache_path / SUMMARY_FILE, json.dumps(summary, indent=1).encode())
  total = len(cache_lib.EmbeddingCache.open(cache_path))
  print(f"{summary['new']} new captions embedded ({summary['existing']} already cached, "
        f"{summary['captions'] - summary['unique']} duplicates) into {summary['shards']} "
        f"shard(s) in {summary['seconds']:.1f}s on {summary['processes']} process(es), "
        f"{summary['devices']} device(s): {summary['captions_per_s']:.1f} captions/s, "
        f"{summary['captions_per_s_per_device']:.2f} per device; {cache_dir} holds "
        f"{total} captions", flush=True)
  return summary


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="imagen-embed", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--captions", default=None,
                      help="a text file with one caption per line (instead of DATASET)")
  parser.add_argument("--verify", action="store_true",
                      help="check the sha256 of every shard of CACHE_DIR, then exit")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  hosts.add_distributed_flags(parser)
  args = gin_utils.parse_args(parser, argv)
  hosts.initialize(args)  # before any JAX computation
  gin.clear_config()  # a fresh config per call, so main() can run twice in one process
  gin_utils.apply_gin_args(args)
  run_embed(captions_file=args.captions, verify=args.verify,
            progress=not args.no_progress)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  return gin_utils.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
