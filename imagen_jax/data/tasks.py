"""seqio Tasks over the same sources, preprocessing and embedding cache as the Pipeline.

  from imagen_jax.data import tasks
  tasks.register_task("shapes_sr64", "shapes", cache_path="runs/cache", image_size=64,
                      lowres_size=16, crop_size=32, max_length=32)
  ds = seqio.get_mixture_or_task("shapes_sr64").get_dataset(
      split="train", shuffle=False, shard_info=seqio.ShardInfo(index, count))

The Task's source yields the stream positions i = 0..N-1 (one epoch of the Pipeline's
stream with the same seed; seqio repeats it for more epochs) and its preprocessors load,
resize/crop and join cached embeddings for each. Its example i equals `Pipeline.example(i)`
joined with the cache, so seqio users and the training pipeline see the same data.
seqio shards the positions (`ds.shard(count, index)`) before the preprocessors run, so each
host decodes only its own examples.

Training uses `Pipeline`, not this: seqio's iterator position lives in tf.data state, and
seqio shuffles with a buffer, whereas the Pipeline's position is just the step.
"""

from __future__ import annotations

import functools

import numpy as np

from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import sources as sources_lib

SPLIT = "train"


def _open_cache(cache_path: str):
  from imagen_jax.text import cache as cache_lib  # imported on use
  return cache_lib.EmbeddingCache.open(cache_path)


def make_task(name: str, dataset_spec: str, cache_path: str | None, *, image_size: int,
              lowres_size: int | None = None, crop_size: int | None = None,
              max_length: int = 128, seed: int = 0, random_flip: bool = False,
              source=None, cache=None):
  """A `seqio.Task`; `source` / `cache` objects override `dataset_spec` / `cache_path`.

  Output features: `image` uint8 [S,S,3] (S = crop_size if set), `lowres` uint8 [s,s,3]
  (SR), `text_emb` bfloat16 [max_length, D], `text_mask` bool [max_length]; every example
  also carries `index` (int64 stream position) and `caption` (string).
  """
  import seqio
  import tensorflow as tf

  if source is None:
    source = sources_lib.get_source(dataset_spec, resolution=image_size)
  # One-example "batches": reuses Pipeline.example, so the two agree by construction.
  examples = pipeline_lib.Pipeline(
      source, None, image_size=image_size, lowres_size=lowres_size, crop_size=crop_size,
      global_batch_size=1, seed=seed, max_length=max_length, random_flip=random_flip,
      num_workers=1)
  num_examples = len(examples.source)
  get_cache = (lambda: cache) if cache is not None else functools.lru_cache(None)(
      functools.partial(_open_cache, cache_path))
  out_size = crop_size or image_size
  low_size = None if lowres_size is None else (
      crop_size * lowres_size // image_size if crop_size else lowres_size)

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
    del split, shuffle_files, seed  # one split; order is the stream's (seeded) order
    return tf.data.Dataset.range(num_examples).map(lambda i: {"index": i})

  def load(index):
    example = examples.example(int(index))
    lowres = example.get("lowres", np.zeros((0, 0, 3), np.uint8))
    return example["image"], lowres, example["caption"].encode("utf-8")

  def load_images(ds):
    def fn(features):
      image, lowres, caption = tf.numpy_function(
          load, [features["index"]], [tf.uint8, tf.uint8, tf.string], stateful=False)
      features = dict(features, caption=tf.ensure_shape(caption, []),
                      image=tf.ensure_shape(image, [out_size, out_size, 3]))
      if low_size is not None:
        features["lowres"] = tf.ensure_shape(lowres, [low_size, low_size, 3])
      return features
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def join(caption):
    emb, mask = get_cache().get_batch([caption.decode("utf-8")], max_length)
    return np.asarray(emb[0]), np.asarray(mask[0], dtype=bool)

  def join_embeddings(ds):
    def fn(features):
      emb, mask = tf.numpy_function(join, [features["caption"]], [tf.bfloat16, tf.bool],
                                    stateful=False)
      return dict(features, text_emb=tf.ensure_shape(emb, [max_length, None]),
                  text_mask=tf.ensure_shape(mask, [max_length]))
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  output_features = {
      "image": seqio.ContinuousFeature(dtype=tf.uint8, rank=3),
      "text_emb": seqio.ContinuousFeature(dtype=tf.bfloat16, rank=2),
      "text_mask": seqio.ContinuousFeature(dtype=tf.bool, rank=1),
  }
  if lowres_size is not None:
    output_features["lowres"] = seqio.ContinuousFeature(dtype=tf.uint8, rank=3)
  return seqio.Task(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=[SPLIT],
                                      num_input_examples={SPLIT: num_examples}),
      output_features=output_features,
      preprocessors=[load_images, join_embeddings])


def register_task(name: str, dataset_spec: str, cache_path: str | None, image_size: int,
                  lowres_size: int | None = None, max_length: int = 128, **kwargs):
  """Builds `make_task(...)` and adds it to `seqio.TaskRegistry` (replacing a same-named one)."""
  import seqio
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  task = make_task(name, dataset_spec, cache_path, image_size=image_size,
                   lowres_size=lowres_size, max_length=max_length, **kwargs)
  seqio.TaskRegistry.add_provider(name, task)
  return task
