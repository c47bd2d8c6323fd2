"""Input pipeline throughput (examples/s) on this machine.

  .venv/bin/python benchmarks/input_pipeline.py                 # all cases
  .venv/bin/python benchmarks/input_pipeline.py --cases=shapes_base64 --steps=50

Cases:
  shapes_base64   shapes rendered at 64 px, base stage
  shapes_sr16_64  shapes rendered at 64 px, 16->64 SR on 32 px crops (8 px lowres crops)
  folder_jpeg64   a folder of 256x256 JPEGs + .txt captions, resized/centre-cropped to 64

Every case joins text embeddings from a real `EmbeddingCache` (built in a temp dir by a
stand-in encoder that writes hash-derived bfloat16 vectors, so no T5 is needed; the read
path is the one training uses). Each case is measured with 1 and `--workers` decode
threads, without a consumer (the pipeline alone, `host_batch` in a loop) and with a
simulated training step of `--step_ms` (a sleep, which like a device step releases the
GIL) with and without the background prefetch of `iter_batches`.

`--grain` instead compares our `Pipeline` with grain (the JAX ecosystem's loader) side by
side on the same ArrayRecord shards of real JPEG photographs (scikit-image's sample
photos, repeated to `--records` records in 4 shards), decoded and resized to 64 and 256
px by the same function in both. Ours: `Pipeline("records:...")`, decode threads, one
process. grain: `MapDataset.source(ArrayRecordDataSource).map(...).batch(...)`, in this
process with `ReadOptions(num_threads)`, and with worker processes (`mp_prefetch`). The
image path only (no text cache): the two differ in how they run the per-example work.

  .venv/bin/python benchmarks/input_pipeline.py --grain --records=2048 --steps=12
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import sources
from imagen_jax.text import cache as cache_lib

CASES = ("shapes_base64", "shapes_sr16_64", "folder_jpeg64")


class HashEncoder:
  """Stand-in for TextEncoder: deterministic pseudo-embeddings, one per caption."""

  batch_size = 256

  def __init__(self, d_model: int, max_length: int):
    self.d_model, self.max_length = d_model, max_length
    self.identity = {"name": "benchmark-hash", "d_model": d_model, "max_length": max_length,
                     "vocab_sha256": "0" * 64, "weights_sha256": "0" * 64}

  def encode_with_info(self, captions):
    emb = np.zeros((len(captions), self.max_length, self.d_model), np.float32)
    mask = np.zeros((len(captions), self.max_length), bool)
    for row, caption in enumerate(captions):
      seed = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "little")
      length = min(self.max_length, len(caption.split()) + 1)  # words + EOS
      emb[row, :length] = np.random.default_rng(seed).standard_normal((length, self.d_model))
      mask[row, :length] = True
    return emb, mask, []


def make_folder(root: str, count: int, side: int = 256) -> None:
  """`count` smooth random JPEGs (side x side) with captions, like small photos."""
  rng = np.random.default_rng(0)
  for k in range(count):
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
    image.save(os.path.join(root, f"img{k:05d}.jpg"), quality=90)
    with open(os.path.join(root, f"img{k:05d}.txt"), "w") as f:
      f.write(f"photo number {k}")


def measure_alone(pipe: pipeline_lib.Pipeline, steps: int) -> tuple[float, float]:
  """(examples/s, CPU ms per example) of host_batch alone, after 2 warm-up batches.

  CPU time (all threads of this process) depends little on other load on the machine,
  unlike wall time on a shared box.
  """
  for step in range(2):
    pipe.host_batch(step)
  start, cpu = time.perf_counter(), time.process_time()
  for step in range(2, 2 + steps):
    pipe.host_batch(step)
  examples = steps * pipe.local_batch_size
  return (examples / (time.perf_counter() - start),
          1000 * (time.process_time() - cpu) / examples)


def measure(pipe: pipeline_lib.Pipeline, steps: int, step_ms: float, prefetch: int
            ) -> float:
  """examples/s behind a consumer of step_ms per batch, after 2 warm-up batches."""
  stream = pipe.iter_batches(0, prefetch=prefetch)
  for _ in range(2):
    next(stream)
  start = time.perf_counter()
  for _ in range(steps):
    next(stream)
    time.sleep(step_ms / 1000)  # the consumer's "train step"
  stream.close()
  return steps * pipe.local_batch_size / (time.perf_counter() - start)


def photo_records(root: str, count: int, num_shards: int = 4) -> str:
  """ArrayRecord shards of scikit-image's colour sample photos as JPEG (quality 90, at
  their own sizes, 300-1000 px a side), repeated to `count` records; returns the glob."""
  import io
  import pathlib
  import skimage
  folder = pathlib.Path(skimage.__file__).parent / "data"
  photos = []
  for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg")):
    image = Image.open(path)
    if image.mode not in ("RGB", "RGBA") or min(image.size) < 256:
      continue  # grey scans, masks and icons are not photographs
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    photos.append((buffer.getvalue(), f"a photo: {path.stem.replace('_', ' ')}"))
  examples = ({"image": photos[k % len(photos)][0], "caption": photos[k % len(photos)][1]}
              for k in range(count))
  sources.write_records(os.path.join(root, "photos.array_record"), examples, num_shards)
  print(f"{count} records of {len(photos)} JPEG photos "
        f"({sum(len(p[0]) for p in photos) // len(photos) // 1024} KB on average) in "
        f"{num_shards} shards")
  return os.path.join(root, "photos-*.array_record")


class DecodeResize:
  """grain's per-record work: the same parse, decode and resize our records: source and
  Pipeline do (a picklable callable, for grain's worker processes)."""

  def __init__(self, size: int):
    self.size = size

  def __call__(self, record: bytes) -> np.ndarray:
    from imagen_jax.data import preprocess
    data, _ = sources.parse_example(record, "benchmark")
    return preprocess.resize_center_crop(sources.decode_image(data, "benchmark"), self.size)


def grain_batches(pattern: str, size: int, batch_size: int, threads: int, processes: int):
  """An iterator of [batch, size, size, 3] uint8 batches from grain."""
  import glob
  import grain
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's worker processes read its absl flags
    flags.FLAGS.mark_as_parsed()
  source = grain.sources.ArrayRecordDataSource(sorted(glob.glob(pattern)))
  dataset = (grain.MapDataset.source(source).shuffle(seed=0).repeat()
             .map(DecodeResize(size)).batch(batch_size, drop_remainder=True))
  iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                       prefetch_buffer_size=2 * batch_size))
  if processes:
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes))
  return iter(iterable)


def ours_batches(pattern: str, size: int, batch_size: int, threads: int):
  pipe = pipeline_lib.Pipeline(f"records:{pattern}", None, image_size=size,
                               global_batch_size=batch_size, seed=0, max_length=None,
                               num_workers=threads)
  step = 0
  while True:
    yield pipe.host_batch(step)["image"]
    step += 1


def _cpu_seconds() -> float:
  """CPU time of this process and its live children (grain's worker processes), from
  /proc: on a shared machine it moves much less than wall time."""
  tick = os.sysconf("SC_CLK_TCK")
  total = time.process_time()
  me = str(os.getpid())
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # the process ended meanwhile
      continue
    if fields[1] == me:  # ppid
      total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
  return total


def examples_per_s(batches, steps: int, batch_size: int) -> tuple[float, float]:
  """(wall-clock examples/s, CPU ms per example) over `steps` batches, after 3 warm-up
  batches (worker start-up)."""
  for _ in range(3):
    next(batches)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(steps):
    batch = next(batches)
    assert batch.shape[0] == batch_size
  examples = steps * batch_size
  return (examples / (time.perf_counter() - start),
          1000 * (_cpu_seconds() - cpu) / examples)


def compare_grain(args) -> int:
  configs = []  # (loader, workers, what a worker is, make)
  for workers in (1, 2):
    configs.append(("ours", workers, "thread", lambda p, s, w=workers: ours_batches(
        p, s, args.batch_size, w)))
    configs.append(("grain", workers, "thread", lambda p, s, w=workers: grain_batches(
        p, s, args.batch_size, w, 0)))
    configs.append(("grain", workers, "process", lambda p, s, w=workers: grain_batches(
        p, s, args.batch_size, 1, w)))
  print(f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} batch={args.batch_size} "
        f"steps={args.steps} rounds={args.rounds} (best round of each; the CPU is "
        "shared, so CPU ms per example, this process and its workers, is the stable "
        "figure)")
  with tempfile.TemporaryDirectory() as tmp:
    pattern = photo_records(tmp, args.records)
    print(f"{'size':>4} {'loader':6} {'workers':>7} {'worker':8} {'examples/s':>10} "
          f"{'per worker':>10} {'CPU ms/ex':>9} {'ex/s per core':>13}")
    for size in (64, 256):
      best = {}
      for _ in range(args.rounds):  # rounds interleave the configs: load drifts evenly
        for loader, workers, kind, make in configs:
          batches = make(pattern, size)
          rate, cpu_ms = examples_per_s(batches, args.steps, args.batch_size)
          close = getattr(batches, "close", None)
          if close:
            close()
          key = (loader, workers, kind)
          old_rate, old_cpu = best.get(key, (0.0, float("inf")))
          best[key] = (max(old_rate, rate), min(old_cpu, cpu_ms))
      for (loader, workers, kind), (rate, cpu_ms) in best.items():
        print(f"{size:4d} {loader:6} {workers:7d} {kind:8} {rate:10.0f} "
              f"{rate / workers:10.0f} {cpu_ms:9.2f} {1000 / cpu_ms:13.0f}", flush=True)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--workers", type=int, default=4)
  parser.add_argument("--step_ms", type=float, default=100.0)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--max_length", type=int, default=64)
  parser.add_argument("--folder_images", type=int, default=512)
  parser.add_argument("--grain", action="store_true",
                      help="compare with grain on ArrayRecord shards of JPEG photos")
  parser.add_argument("--records", type=int, default=2048)
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args(argv)
  if args.grain:
    return compare_grain(args)
  print(f"cpus={os.cpu_count()} batch={args.batch_size} steps={args.steps} "
        f"d_model={args.d_model} max_length={args.max_length}")
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "folder")
    os.makedirs(folder)
    make_folder(folder, args.folder_images)
    encoder = HashEncoder(args.d_model, args.max_length)
    cache_dir = os.path.join(tmp, "cache")
    captions = list(sources.get_source("shapes").captions())
    captions += list(sources.get_source(f"folder:{folder}").captions())
    cache_lib.build_cache(cache_dir, captions, encoder, progress=False)
    cache = cache_lib.EmbeddingCache.open(cache_dir)
    specs = {
        "shapes_base64": ("shapes", dict(image_size=64)),
        "shapes_sr16_64": ("shapes", dict(image_size=64, lowres_size=16, crop_size=32)),
        "folder_jpeg64": (f"folder:{folder}", dict(image_size=64)),
    }
    print(f"{'case':16} {'workers':>7} {'alone':>8} {'cpu ms/ex':>9} "
          f"{'step+no prefetch':>17} {'step+prefetch':>14}   (examples/s; step = "
          f"{args.step_ms:g} ms sleep, ceiling {1000 * args.batch_size / args.step_ms:.0f})")
    for case in args.cases.split(","):
      if case not in specs:
        print(f"unknown case {case!r}; choose from {CASES}", file=sys.stderr)
        return 2
      spec, sizes = specs[case]
      for workers in sorted({1, args.workers}):
        pipe = pipeline_lib.Pipeline(spec, cache, global_batch_size=args.batch_size, seed=0,
                                     max_length=args.max_length, num_workers=workers,
                                     **sizes)
        alone, cpu_ms = measure_alone(pipe, args.steps)
        no_prefetch = measure(pipe, args.steps, args.step_ms, 0)
        prefetched = measure(pipe, args.steps, args.step_ms, 2)
        pipe.close()
        print(f"{case:16} {workers:7d} {alone:8.0f} {cpu_ms:9.3f} {no_prefetch:17.0f} "
              f"{prefetched:14.0f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
