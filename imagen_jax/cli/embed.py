"""imagen-embed: encode every caption of a dataset with T5 into the embedding cache.

  imagen-embed --gin_file=runs/embed.gin --gin.DATASET="'shapes'" \
      --gin.CACHE_DIR="'runs/cache'" --gin.text_encoder.t5_path="'ckpt/t5-v1_1-xxl'"
  imagen-embed --gin_file=runs/embed.gin --gin.CACHE_DIR="'runs/cache'" \
      --gin.text_encoder.t5_path="'ckpt/t5'" --captions=captions.txt
  imagen-embed --gin_file=runs/cache/config.gin --verify     # check every shard's sha256

Captions come from the data source named by the gin macro `DATASET` (see
`imagen_jax.data.sources.get_source`), or from `--captions=FILE`, one caption per line.
Only captions the cache lacks are encoded, so a second run adds nothing and an interrupted
run resumes. The operative config is written to CACHE_DIR/config.gin.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import gin
import jax
from etils import epath

from imagen_jax.cli import gin_utils
from imagen_jax.errors import UserError
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import encode


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


@gin.configurable("embed")
def run_embed(dataset: str | None = None, cache_dir: str | None = None,
              shard_size: int = cache_lib.DEFAULT_SHARD_SIZE, *,
              captions_file: str | None = None, verify: bool = False,
              progress: bool = True) -> dict:
  """Embeds the captions of `dataset` (or `captions_file`) into the cache at `cache_dir`."""
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
  if jax.process_count() > 1:
    raise UserError("imagen-embed runs as one process (it writes the cache alone); run it "
                    "on one host, without jax.distributed, using that host's devices")
  encoder = encode.text_encoder()
  cache_path = epath.Path(cache_dir)
  cache_path.mkdir(parents=True, exist_ok=True)
  gin_utils.write_operative_config(cache_path)  # records the encoder before any work
  logging.info("embedding %s with %r on %d device(s), batch %d", source_name,
               encoder.encoder, encoder.mesh.size, encoder.batch_size)
  stats = cache_lib.build_cache(cache_path, captions, encoder, shard_size=shard_size,
                                progress=progress)
  rate = stats["new"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
  total = len(cache_lib.EmbeddingCache.open(cache_path))
  print(f"{stats['new']} new captions embedded ({stats['existing']} already cached, "
        f"{stats['captions'] - stats['unique']} duplicates) into {stats['shards']} shard(s) "
        f"in {stats['seconds']:.1f}s ({rate:.1f} captions/s); {cache_dir} holds {total} "
        "captions")
  if stats["truncated"]:
    logging.warning("%d caption(s) were longer than %d tokens and were truncated",
                    stats["truncated"], encoder.max_length)
  return stats


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="imagen-embed", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--captions", default=None,
                      help="a text file with one caption per line (instead of DATASET)")
  parser.add_argument("--verify", action="store_true",
                      help="check the sha256 of every shard of CACHE_DIR, then exit")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = gin_utils.parse_args(parser, argv)
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
