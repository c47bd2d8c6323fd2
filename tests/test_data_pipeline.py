"""The index-addressable, host-sharded Pipeline (issue 4, "What must show": data part)."""

import ml_dtypes
import numpy as np
import pytest

from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import preprocess, sources
from imagen_jax.errors import UserError

D = 4  # text width of the fake cache


class DictCache:
  """A dict-backed stand-in with EmbeddingCache's read interface (docs/CONTRACTS.md)."""

  def __init__(self, captions):
    self._table = {}
    for k, caption in enumerate(sorted(set(captions))):
      length = 1 + k % 5
      self._table[caption.strip()] = np.full((length, D), k + 1, ml_dtypes.bfloat16)

  def get_batch(self, captions, max_length):
    emb = np.zeros((len(captions), max_length, D), ml_dtypes.bfloat16)
    mask = np.zeros((len(captions), max_length), bool)
    for row, caption in enumerate(captions):
      if caption.strip() not in self._table:
        raise UserError(f"caption {caption!r} is not in the cache; run imagen-embed")
      value = self._table[caption.strip()][:max_length]
      emb[row, :len(value)], mask[row, :len(value)] = value, True
    return emb, mask


def _tiny_source(n=23):
  """n images [20,28,3] whose pixels encode their index; captions 'picture k'."""
  images = [np.random.default_rng(k).integers(0, 256, (20, 28, 3), dtype=np.uint8)
            for k in range(n)]
  return sources.ArraySource(images, [f"picture {k}" for k in range(n)])


@pytest.fixture(scope="module")
def shapes_cache():
  from imagen_jax.data import shapes
  return DictCache(shapes.all_captions("train"))


def _sr(cache, **kwargs):
  args = dict(image_size=32, lowres_size=8, crop_size=16, global_batch_size=8, seed=3,
              max_length=6)
  args.update(kwargs)
  return pipeline_lib.Pipeline(sources.ShapesSource(length=1000), cache, **args)


def test_base_and_sr_batch_shapes_and_dtypes(shapes_cache):
  base = pipeline_lib.Pipeline("shapes", shapes_cache, image_size=16, global_batch_size=4,
                               seed=0, max_length=6)
  batch = base.host_batch(0)
  assert set(batch) == {"image", "index", "text_emb", "text_mask"}
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
  assert batch["text_emb"].shape == (4, 6, D) and batch["text_emb"].dtype == ml_dtypes.bfloat16
  assert batch["text_mask"].shape == (4, 6) and batch["text_mask"].dtype == bool
  assert batch["index"].dtype == np.int64
  np.testing.assert_array_equal(batch["index"], np.arange(4))
  assert batch["image"].std() > 0  # rendered scenes, not blanks
  sr = _sr(shapes_cache).host_batch(2)
  assert set(sr) == {"image", "lowres", "index", "text_emb", "text_mask"}
  assert sr["image"].shape == (8, 16, 16, 3) and sr["lowres"].shape == (8, 4, 4, 3)
  assert sr["lowres"].dtype == np.uint8
  np.testing.assert_array_equal(sr["index"], np.arange(16, 24))


def test_text_joined_by_caption(shapes_cache):
  pipe = _sr(shapes_cache)
  batch = pipe.host_batch(1)
  for row, index in enumerate(batch["index"]):
    caption = pipe.example(int(index))["caption"]
    emb, mask = shapes_cache.get_batch([caption], 6)
    np.testing.assert_array_equal(batch["text_emb"][row], emb[0])
    np.testing.assert_array_equal(batch["text_mask"][row], mask[0])


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_slices_are_disjoint_and_form_the_global_batch(shapes_cache, hosts):
  one = _sr(shapes_cache).host_batch(5)
  slices = [_sr(shapes_cache, process_index=p, process_count=hosts).host_batch(5)
            for p in range(hosts)]
  indices = [set(s["index"].tolist()) for s in slices]
  assert all(len(s["index"]) == 8 // hosts for s in slices)
  assert sum(len(s) for s in indices) == len(set().union(*indices))  # disjoint
  for key in one:
    np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), one[key])


def test_same_seed_same_batches_other_seed_different(shapes_cache):
  a, b = _sr(shapes_cache).host_batch(4), _sr(shapes_cache).host_batch(4)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  c = _sr(shapes_cache, seed=4).host_batch(4)
  assert not np.array_equal(a["image"], c["image"])
  pipe = _sr(shapes_cache)
  assert not np.array_equal(pipe.source_indices(range(8)), _sr(shapes_cache, seed=4)
                            .source_indices(range(8)))


@pytest.mark.parametrize("n", [1, 2, 5, 23, 64, 1000])
def test_each_epoch_visits_every_example_once(n):
  pipe = pipeline_lib.Pipeline(_tiny_source(n) if n <= 64 else sources.ShapesSource(
      length=n), None, image_size=8, global_batch_size=1, seed=11, max_length=4)
  orders = [pipe.source_indices(np.arange(e * n, (e + 1) * n)) for e in range(3)]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
  if n >= 23:  # a shuffle: not the identity, and a new order each epoch
    assert not np.array_equal(orders[0], np.arange(n))
    assert not np.array_equal(orders[0], orders[1])


def test_feistel_is_a_bijection_at_scale():
  n = 262_147  # just over 2^18: a 2^20 domain, so cycle walking does most of the work
  perm = pipeline_lib.FeistelPermutation(n, seed=1)
  out = perm(7, np.arange(n))
  assert np.unique(out).size == n and out.min() == 0 and out.max() == n - 1
  # Spread: a run of consecutive positions lands all over [0, n).
  assert out[:1000].std() > 0.25 * n


def test_restart_at_step_k_equals_the_continuing_stream(shapes_cache):
  pipe = _sr(shapes_cache, global_batch_size=4)
  stream = pipe.iter_batches(0, prefetch=2)
  continuing = [next(stream) for _ in range(5)]
  stream.close()
  restarted = _sr(shapes_cache, global_batch_size=4).iter_batches(3)
  for expected in continuing[3:]:
    got = next(restarted)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  restarted.close()


def test_batches_repeat_past_the_end_of_the_data():
  src = _tiny_source(5)
  pipe = pipeline_lib.Pipeline(src, DictCache(src.captions()), image_size=8,
                               global_batch_size=4, seed=0, max_length=3)
  seen = np.concatenate([pipe.host_batch(s)["index"] for s in range(5)])  # 4 epochs
  np.testing.assert_array_equal(seen, np.arange(20))
  per_epoch = pipe.source_indices(seen).reshape(4, 5)
  for order in per_epoch:
    np.testing.assert_array_equal(np.sort(order), np.arange(5))


def test_sr_lowres_is_the_downsampled_crop():
  src = _tiny_source()
  full = pipeline_lib.Pipeline(src, None, image_size=16, lowres_size=4, global_batch_size=6,
                               seed=2, max_length=3)
  cropped = pipeline_lib.Pipeline(src, None, image_size=16, lowres_size=4, crop_size=8,
                                  global_batch_size=6, seed=2, max_length=3)
  b_full, b_crop = full.host_batch(1), cropped.host_batch(1)
  source_indices = full.source_indices(b_full["index"])
  corners = set()
  for row in range(6):
    # The stage's image is the centre square, resized; lowres is it, downsampled.
    image = preprocess.resize_center_crop(src[int(source_indices[row])]["image"], 16)
    np.testing.assert_array_equal(b_full["image"][row], image)
    np.testing.assert_array_equal(b_full["lowres"][row], preprocess.downsample(image, 4))
    # A crop is an aligned window of the same image, and lowres the matching window.
    hits = [(y, x) for y in range(0, 9, 4) for x in range(0, 9, 4)
            if np.array_equal(b_crop["image"][row], image[y:y + 8, x:x + 8])]
    assert len(hits) == 1
    (y, x), = hits
    corners.add((y, x))
    np.testing.assert_array_equal(b_crop["lowres"][row],
                                  b_full["lowres"][row][y // 4:y // 4 + 2, x // 4:x // 4 + 2])
  assert len(corners) > 1  # crop positions vary across examples


def test_random_flip_mirrors_and_swaps_left_right():
  image = np.zeros((8, 8, 3), np.uint8)
  image[:, :4] = 255  # white left half
  src = sources.ArraySource([image] * 16, ["a red circle to the left of a blue square"] * 16)
  pipe = pipeline_lib.Pipeline(src, None, image_size=8, global_batch_size=16, seed=0,
                               max_length=3, random_flip=True)
  examples = [pipe.example(i) for i in range(16)]
  flipped = [e for e in examples if e["caption"].endswith("to the right of a blue square")]
  kept = [e for e in examples if e["caption"].endswith("to the left of a blue square")]
  assert flipped and kept and len(flipped) + len(kept) == 16
  for e in flipped:
    np.testing.assert_array_equal(e["image"], image[:, ::-1])
  for e in kept:
    np.testing.assert_array_equal(e["image"], image)


def test_bad_input_errors(shapes_cache):
  with pytest.raises(UserError, match="global_batch_size=6 is not divisible by "
                     "process_count=4"):
    _sr(shapes_cache, global_batch_size=6, process_count=4)
  with pytest.raises(UserError, match="process_index=2"):
    _sr(shapes_cache, process_index=2, process_count=2)
  with pytest.raises(UserError, match="empty"):
    pipeline_lib.Pipeline(sources.ArraySource([], []), None, image_size=8,
                          global_batch_size=1, seed=0, max_length=3)
  with pytest.raises(UserError, match="crop_size=10 must be a multiple"):
    _sr(shapes_cache, crop_size=10)
  with pytest.raises(UserError, match="lowres_size=32"):
    _sr(shapes_cache, lowres_size=32)
  with pytest.raises(UserError, match="seed"):
    _sr(shapes_cache, seed=-1)
  src = _tiny_source(4)
  pipe = pipeline_lib.Pipeline(src, DictCache(["picture 0"]), image_size=8,
                               global_batch_size=4, seed=0, max_length=3)
  with pytest.raises(UserError, match="imagen-embed"):
    pipe.host_batch(0)
  stream = pipe.iter_batches(0)
  with pytest.raises(UserError, match="imagen-embed"):  # raised in the prefetch thread
    next(stream)


class _HashEncoder:
  """A deterministic stand-in for TextEncoder: each caption's 'embedding' is its sha256."""

  batch_size = 256
  identity = {"name": "hash-encoder", "d_model": D, "max_length": 8,
              "vocab_sha256": "0" * 64, "weights_sha256": "1" * 64}

  def encode_with_info(self, captions):
    import hashlib
    emb = np.zeros((len(captions), 8, D), np.float32)
    mask = np.zeros((len(captions), 8), bool)
    for row, caption in enumerate(captions):
      length = 1 + len(caption.split()) % 8
      digest = np.frombuffer(hashlib.sha256(caption.encode()).digest(), np.uint8)
      emb[row, :length] = digest[:length * D].reshape(length, D) / 255.0
      mask[row, :length] = True
    return emb, mask, []


def test_pipeline_with_the_real_embedding_cache(tmp_path):
  from imagen_jax.data import shapes
  from imagen_jax.text import cache as cache_lib
  path = tmp_path / "cache"
  src = sources.get_source("shapes")
  stats = cache_lib.build_cache(path, src.captions(), _HashEncoder(), progress=False)
  assert stats["new"] == len(shapes.all_captions("train"))
  cache = cache_lib.EmbeddingCache.open(path)
  pipe = pipeline_lib.Pipeline(src, cache, image_size=32, lowres_size=8, crop_size=16,
                               global_batch_size=8, seed=0, max_length=8,
                               process_index=1, process_count=2)
  batch = next(pipe.iter_batches(7))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["lowres"].shape == (4, 4, 4, 3)
  assert batch["text_emb"].shape == (4, 8, D) and batch["text_emb"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(batch["index"], np.arange(60, 64))
  for row, index in enumerate(batch["index"]):
    caption = pipe.example(int(index))["caption"]
    expected = cache.lookup(caption)
    length = expected.shape[0]
    np.testing.assert_array_equal(batch["text_emb"][row, :length], expected)
    assert batch["text_mask"][row].sum() == length and batch["text_mask"][row, :length].all()
    assert not batch["text_emb"][row, length:].astype(np.float32).any()
  held_out = pipeline_lib.Pipeline("shapes:held_out", cache, image_size=16,
                                   global_batch_size=2, seed=0, max_length=8)
  with pytest.raises(UserError, match="imagen-embed"):
    held_out.host_batch(0)
