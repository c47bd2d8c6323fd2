"""The index-addressable, host-sharded input pipeline that training reads.

The global stream is a sequence of examples; example i is a pure function of (seed, i):

- epoch e = i // N and position j = i % N (N = len(source)); the source index is
  `perm_e(j)`, where perm_e is a pseudo-random permutation of [0, N) keyed by (seed, e);
- per-example randomness (SR crop position, optional flip) comes from
  `np.random.default_rng([seed, i, _PURPOSE])`.

The global batch at step k is examples [k*B, (k+1)*B). Host p of P loads rows
[p*B/P, (p+1)*B/P) of it and nothing else, so the global batch is the same whatever the
number of hosts (DESIGN.md §7), the stream repeats forever, and the whole iterator state is
the step: a trainer that stores the step in its checkpoint restores the stream exactly.

Why a Feistel permutation, not `rng.permutation(N)`: it costs O(1) memory and O(1) time per
index, whatever N (a LAION-scale N = 2e9 would need 16 GB per materialised epoch
permutation on every host), and every host computes any epoch's order without
coordination. `FeistelPermutation` is a 6-round balanced Feistel network on 2h bits (the
smallest even width with 2^2h >= N), whose round function is the SplitMix64 finaliser of
(round key XOR half-block); "cycle walking" (re-applying it while the value is >= N) turns
the bijection of [0, 2^2h) into a bijection of [0, N), in fewer than 4 applications on
average (Black & Rogaway 2002, "Ciphers with arbitrary finite domains"). It is a bijection
by construction, so each epoch visits every example exactly once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from imagen_jax.data import preprocess
from imagen_jax.data import sources as sources_lib
from imagen_jax.errors import UserError

log = logging.getLogger(__name__)

_FEISTEL_ROUNDS = 6
_PURPOSE_EXAMPLE = 1  # tags the per-example rng stream (crop, flip)
_PURPOSE_REPLACE = 2  # tags the draws of replacements for undecodable images
MAX_REPLACEMENTS = 32
_WARN_FIRST_FAILURES = 10  # then only `decode_failures` counts them
# What a corrupt image raises: a bad header (ImageDecodeError), a truncated body (OSError),
# PIL's parser errors (SyntaxError), a decompression bomb.
DECODE_ERRORS = (sources_lib.ImageDecodeError, OSError, SyntaxError,
                 Image.DecompressionBombError)


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser (Steele et al. 2014): a bijective avalanche on uint64 arrays."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


class FeistelPermutation:
  """A keyed pseudo-random bijection of [0, n), one per epoch; see the module docstring."""

  def __init__(self, n: int, seed: int):
    if n <= 0:
      raise UserError(f"cannot permute an empty dataset (n={n})")
    self.n, self.seed = int(n), int(seed)
    bits = max(2, int(self.n - 1).bit_length())
    self.half_bits = (bits + 1) // 2
    self._mask = np.uint64((1 << self.half_bits) - 1)

  def _keys(self, epoch: int) -> np.ndarray:
    return np.random.SeedSequence([self.seed, int(epoch)]).generate_state(
        _FEISTEL_ROUNDS, dtype=np.uint64)

  def _encrypt(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
    h = np.uint64(self.half_bits)
    left, right = x >> h, x & self._mask
    for key in keys:
      left, right = right, left ^ (_mix64(right ^ key) & self._mask)
    return (left << h) | right

  def __call__(self, epoch: int, positions) -> np.ndarray:
    """Source indices of `positions` (ints in [0, n)) in epoch `epoch`; int64 array."""
    x = np.asarray(positions, dtype=np.uint64).copy()
    if x.size and int(x.max()) >= self.n:
      raise IndexError(f"position {int(x.max())} out of range [0, {self.n})")
    keys = self._keys(epoch)
    x = self._encrypt(x, keys)
    outside = x >= self.n
    while outside.any():  # cycle walking
      x[outside] = self._encrypt(x[outside], keys)
      outside = x >= self.n
    return x.astype(np.int64)


def example_rng(seed: int, index: int) -> np.random.Generator:
  """The random stream of global example `index` (crop position, flip)."""
  return np.random.default_rng([int(seed), int(index), _PURPOSE_EXAMPLE])


class Pipeline:
  """Batches of (image, [lowres], text_emb, text_mask, index) for one host; see module doc.

  Args:
    source: a source object (`imagen_jax.data.sources`) or a `DATASET` spec string. A source
      with `at_resolution` (shapes) renders directly at `image_size`.
    cache: an embedding cache with `get_batch(captions, max_length)`
      (`imagen_jax.text.cache.EmbeddingCache.open(path)`), or None for image-only batches.
    image_size: the stage's output side S (for SR stages the high-resolution side).
    lowres_size: the conditioning side s of an SR stage (None for the base stage).
    crop_size: SR training on random crop_size crops of the S image, with the matching
      crop_size*s/S window of the low-resolution image (None: the whole image).
    global_batch_size: B, examples per step over all hosts; divisible by process_count.
    seed: orders the stream and draws per-example randomness.
    max_length: text length L of `text_emb` / `text_mask` (None: the cache's).
    process_index, process_count: this host's slice of every global batch.
    random_flip: mirror half of the images and swap "left"/"right" in their captions (the
      cache must then hold the swapped captions too). Off by default.
    num_workers: threads that decode/render/resize a batch (ordered map: deterministic).
    label_fn: None, or caption -> int class label (-1: none), added to each batch as
      `label` int32 [B] (a noise-aware classifier's training data, e.g.
      `shapes.object_label`).
  """

  def __init__(self, source, cache, *, image_size: int, lowres_size: int | None = None,
               crop_size: int | None = None, global_batch_size: int, seed: int,
               max_length: int | None, process_index: int = 0, process_count: int = 1,
               random_flip: bool = False, num_workers: int | None = None,
               label_fn=None):
    preprocess.check_sr_sizes(image_size, lowres_size, crop_size)
    if global_batch_size <= 0:
      raise UserError(f"global_batch_size={global_batch_size} must be positive")
    if process_count <= 0 or not 0 <= process_index < process_count:
      raise UserError(f"process_index={process_index} must be in [0, process_count="
                      f"{process_count})")
    if global_batch_size % process_count:
      raise UserError(f"global_batch_size={global_batch_size} is not divisible by "
                      f"process_count={process_count}; every host loads an equal slice, "
                      f"so use a multiple of {process_count}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise UserError(f"seed={seed!r} must be a non-negative integer")
    if max_length is None and cache is not None:
      max_length = int(cache.manifest["max_length"])
    if max_length is not None and max_length <= 0:
      raise UserError(f"max_length={max_length} must be positive")
    if isinstance(source, str):
      source = sources_lib.get_source(source, resolution=image_size)
    elif hasattr(source, "at_resolution"):
      source = source.at_resolution(image_size)
    if len(source) == 0:
      raise UserError("the dataset is empty; check the DATASET spec and its files")
    self.source, self.cache = source, cache
    self.image_size, self.lowres_size, self.crop_size = image_size, lowres_size, crop_size
    self.global_batch_size, self.seed, self.max_length = global_batch_size, int(seed), max_length
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = global_batch_size // process_count
    self.random_flip = random_flip
    self.label_fn = label_fn
    self.num_workers = num_workers or min(8, os.cpu_count() or 1)
    self.permutation = FeistelPermutation(len(source), self.seed)
    self._executor = None
    self._failures_lock = threading.Lock()
    self.decode_failures = 0  # images replaced so far (prefetched batches included)

  # ---------------------------------------------------------------- the global stream

  def source_indices(self, stream_indices) -> np.ndarray:
    """Source index of each global stream index (epoch-wise permutation)."""
    stream_indices = np.asarray(stream_indices, dtype=np.int64)
    n = len(self.source)
    epochs, positions = np.divmod(stream_indices, n)
    out = np.empty_like(stream_indices)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      out[where] = self.permutation(int(epoch), positions[where])
    return out

  def example(self, index: int, source_index: int | None = None) -> dict[str, Any]:
    """Global example `index`: image (and lowres) uint8, caption str, index int.

    Equal on every host and in every run with the same seed. An image that fails to decode
    is replaced by the source example `replacement(index, attempt)` (a pure function of
    the seed, `index` and the attempt) and counted in `decode_failures`.
    """
    if source_index is None:
      source_index = int(self.source_indices([index])[0])
    for attempt in range(MAX_REPLACEMENTS + 1):
      try:
        raw = (self.source.raw(source_index) if hasattr(self.source, "raw")
               else self.source[source_index])
        return self.preprocess(raw["image"], raw["caption"], index)
      except DECODE_ERRORS as e:
        with self._failures_lock:
          self.decode_failures += 1
          failures = self.decode_failures
        if failures <= _WARN_FIRST_FAILURES:
          log.warning("example %d: source image %d does not decode (%s); replaced%s", index,
                      source_index, e, "" if failures < _WARN_FIRST_FAILURES else
                      " (further failures are only counted)")
        source_index = self.replacement(index, attempt)
    raise UserError(f"example {index}: {MAX_REPLACEMENTS + 1} source images in a row do not "
                    "decode; the dataset is mostly unreadable, check its files")

  def replacement(self, index: int, attempt: int) -> int:
    """The source index that stands in for example `index` after failed attempt `attempt`."""
    rng = np.random.default_rng([self.seed, int(index), _PURPOSE_REPLACE, int(attempt)])
    return int(rng.integers(len(self.source)))

  def preprocess(self, image, caption: str, index: int) -> dict[str, Any]:
    """Resize/centre-crop to the stage, make lowres, crop and flip with example `index`'s rng."""
    rng = example_rng(self.seed, index)
    image = preprocess.resize_center_crop(image, self.image_size)
    out = {"caption": caption, "index": int(index)}
    if self.lowres_size is not None:
      lowres = preprocess.downsample(image, self.lowres_size)
      if self.crop_size is not None:
        image, lowres = preprocess.sr_crop(image, lowres, self.crop_size, rng)
      out["lowres"] = lowres
    if self.random_flip and rng.random() < 0.5:
      image = preprocess.hflip(image)
      if "lowres" in out:
        out["lowres"] = preprocess.hflip(out["lowres"])
      out["caption"] = preprocess.swap_left_right(caption)
    out["image"] = image
    return out

  # ---------------------------------------------------------------- batches

  def host_indices(self, step: int) -> np.ndarray:
    """Global stream indices of this host's rows of the global batch at `step`."""
    if step < 0:
      raise UserError(f"step={step} must be non-negative")
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return np.arange(start, start + self.local_batch_size, dtype=np.int64)

  def host_batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's slice of the global batch at `step` (keys in docs/CONTRACTS.md)."""
    indices = self.host_indices(step)
    source_indices = self.source_indices(indices)
    if self._executor is None:
      self._executor = concurrent.futures.ThreadPoolExecutor(
          self.num_workers, thread_name_prefix="imagen-data")
    # map() returns results in input order, whichever thread finishes first.
    examples = list(self._executor.map(self.example, indices.tolist(),
                                       source_indices.tolist()))
    batch = {"image": np.stack([e["image"] for e in examples]),
             "index": indices}
    if self.lowres_size is not None:
      batch["lowres"] = np.stack([e["lowres"] for e in examples])
    if self.cache is not None:
      emb, mask = self.cache.get_batch([e["caption"] for e in examples], self.max_length)
      batch["text_emb"], batch["text_mask"] = emb, np.asarray(mask, dtype=bool)
    if self.label_fn is not None:
      batch["label"] = np.array([self.label_fn(e["caption"]) for e in examples], np.int32)
    return batch

  def iter_batches(self, start_step: int = 0, prefetch: int = 2
                   ) -> Iterator[dict[str, np.ndarray]]:
    """host_batch(start_step), host_batch(start_step + 1), ... forever.

    A background thread prepares up to `prefetch` batches ahead; closing the generator
    (or dropping it) stops the thread. Errors in the thread surface here.
    """
    if prefetch <= 0:
      step = start_step
      while True:
        yield self.host_batch(step)
        step += 1
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
      step = start_step
      while not stop.is_set():
        try:
          item = (self.host_batch(step), None)
        except BaseException as e:  # handed to the consumer, which re-raises it
          item = (None, e)
        while not stop.is_set():
          try:
            ready.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if item[1] is not None:
          return
        step += 1

    thread = threading.Thread(target=produce, name="imagen-data-prefetch", daemon=True)
    thread.start()
    try:
      while True:
        batch, error = ready.get()
        if error is not None:
          raise error
        yield batch
    finally:
      stop.set()
      thread.join(timeout=10)

  def close(self) -> None:
    if self._executor is not None:
      self._executor.shutdown(wait=True)
      self._executor = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
