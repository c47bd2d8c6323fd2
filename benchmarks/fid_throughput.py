"""FID feature throughput (images/s through InceptionV3 at 299x299) and FID-30K's time.

  python benchmarks/fid_throughput.py [--weights=pt_inception.pth] [--size=256] \
      [--batch_size=50] [--batches=4]

Random uint8 images of --size go through `imagen_jax.eval.fid.FeatureExtractor` exactly as
`imagen-eval fid` runs them (resize to 299, all local devices); the first batch compiles
and is not timed. Without --weights the network has random weights: the time does not
depend on them. Prints images/s and the projected time of the features of 30,000 samples
(the reference statistics are computed once and cached as .npz).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx

from imagen_jax.eval import fid, inception


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--weights", default="", help="pytorch-fid's .pth (default: random)")
  p.add_argument("--size", type=int, default=256, help="side of the input images")
  p.add_argument("--batch_size", type=int, default=50)
  p.add_argument("--batches", type=int, default=4, help="timed batches")
  p.add_argument("--n", type=int, default=30_000, help="images of the projection")
  args = p.parse_args()
  if args.weights:
    model = inception.load_inception(args.weights)
  else:
    model = inception.InceptionV3(rngs=nnx.Rngs(0))
  extractor = fid.FeatureExtractor(model, batch_size=args.batch_size)
  rng = np.random.default_rng(0)
  images = list(rng.integers(0, 256, (extractor.batch_size * (args.batches + 1), args.size,
                                      args.size, 3), dtype=np.uint8))
  start = time.perf_counter()
  extractor(images[:extractor.batch_size], progress=False)
  compile_s = time.perf_counter() - start
  start, cpu_start = time.perf_counter(), time.process_time()
  extractor(images[extractor.batch_size:], progress=False)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  n_timed = extractor.batch_size * args.batches
  rate = n_timed / seconds
  devices = jax.devices()
  print(f"{len(devices)} x {devices[0].device_kind}: {rate:.2f} images/s at "
        f"{args.size}x{args.size} (batch {extractor.batch_size}; first batch with "
        f"compilation {compile_s:.1f} s); {cpu_seconds / n_timed:.2f} CPU-s per image "
        f"over {os.cpu_count()} cores (a loaded machine lowers images/s, not CPU-s)")
  idle_minutes = args.n * cpu_seconds / n_timed / os.cpu_count() / 60
  print(f"FID-{args.n // 1000}K on this host: {args.n / rate / 60:.1f} min for the "
        f"samples' features at this rate; {idle_minutes:.1f} min with every core free (+ as long once for the reference statistics)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
