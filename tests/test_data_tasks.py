"""The seqio Task agrees with the Pipeline example by example."""

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from imagen_jax.data import pipeline as pipeline_lib  # noqa: E402
from imagen_jax.data import sources, tasks  # noqa: E402
from test_data_pipeline import _HashEncoder  # noqa: E402


def test_task_examples_equal_pipeline_examples(tmp_path):
  from imagen_jax.text import cache as cache_lib
  cache_lib.build_cache(tmp_path, sources.ShapesSource().captions(), _HashEncoder(),
                        progress=False)
  cache = cache_lib.EmbeddingCache.open(tmp_path)
  kwargs = dict(image_size=32, lowres_size=8, crop_size=16, max_length=8, seed=5)
  task = tasks.register_task("imagen_jax_test_shapes_sr", "shapes", str(tmp_path),
                             source=sources.ShapesSource(length=40), **kwargs)
  assert seqio.get_mixture_or_task("imagen_jax_test_shapes_sr") is task
  ds = task.get_dataset(split="train", shuffle=False, shard_info=seqio.ShardInfo(1, 4))
  examples = list(ds.take(2).as_numpy_iterator())
  assert [int(e["index"]) for e in examples] == [1, 5]  # shard 1 of 4: positions 1, 5, ...
  pipe = pipeline_lib.Pipeline(sources.ShapesSource(length=40), cache,
                               global_batch_size=4, **{k: v for k, v in kwargs.items()})
  batch = pipe.host_batch(1)  # stream positions 4..7
  got = examples[1]
  row = 1
  assert got["image"].dtype == np.uint8 and got["image"].shape == (16, 16, 3)
  assert got["lowres"].shape == (4, 4, 3)
  for key in ("image", "lowres", "text_emb", "text_mask"):
    np.testing.assert_array_equal(got[key], batch[key][row])
  assert got["text_emb"].dtype == batch["text_emb"].dtype
