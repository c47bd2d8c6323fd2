"""TextEncoder (sharded, fixed-shape batches) and the embedding cache (build, resume,
lookup, and the errors for bad input)."""

import dataclasses
import hashlib
import json
import pathlib
import shutil

import numpy as np
import pytest

from imagen_jax.errors import UserError
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import encode, t5

CAPTIONS = [f"{c} {s}" for c in ("red", "blue", "green", "orange")
            for s in ("circle", "square", "triangle")]  # 12 distinct
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def encoder(tiny_t5_dir):
  return encode.TextEncoder.load(tiny_t5_dir, max_length=MAX_LENGTH, batch_size=8)


@pytest.fixture(scope="module")
def reference(encoder):
  """Each caption's float32 embedding at its real tokens, encoded in one call."""
  emb, mask = encoder.encode(CAPTIONS + [CAPTIONS[0].upper()])
  return {c: e[m] for c, e, m in zip(CAPTIONS + [CAPTIONS[0].upper()], emb, mask)}


class Wrapped:
  """A TextEncoder with a changed identity, or one that is interrupted after n batches."""

  def __init__(self, inner, identity=None, interrupt_after=None):
    self.inner, self.batch_size = inner, inner.batch_size
    self.identity = dict(inner.identity, **(identity or {}))
    self.calls, self.interrupt_after = 0, interrupt_after

  def encode_with_info(self, captions):
    if self.interrupt_after is not None and self.calls >= self.interrupt_after:
      raise KeyboardInterrupt  # what a killed run looks like to the writer
    self.calls += 1
    return self.inner.encode_with_info(captions)


def _bytes_of(directory):
  return {p.name: p.read_bytes() for p in pathlib.Path(directory).iterdir()
          if p.name.startswith("shard-") and not p.name.endswith(".tmp")}


def test_text_encoder_batches_compile_once_and_match_t5(encoder, tiny_t5_config, seqio_spm):
  captions = CAPTIONS[:11]  # two batches of 8, the last one padded
  emb, mask = encoder.encode(captions)
  assert emb.shape == (11, MAX_LENGTH, tiny_t5_config.d_model) and emb.dtype == np.float32
  assert encoder._encode._cache_size() == 1  # no recompilation between batches
  tokens = encoder.tokenize(captions)
  np.testing.assert_array_equal(mask, tokens.mask)
  direct = np.asarray(encoder.encoder(tokens.ids, tokens.mask))
  np.testing.assert_allclose(emb[mask], direct[tokens.mask], rtol=1e-5, atol=1e-5)
  assert (emb[~mask] == 0).all()
  identity = encoder.identity
  assert identity["d_model"] == 32 and identity["max_length"] == MAX_LENGTH
  assert identity["vocab_sha256"] == hashlib.sha256(seqio_spm.read_bytes()).hexdigest()
  assert identity["weights_sha256"] == encoder.encoder.weights_sha256
  # The batch is rounded up to split evenly over the 8 data-parallel devices.
  odd = encode.TextEncoder(encoder.encoder, encoder.vocabulary, vocab_sha256="x",
                           batch_size=5)
  assert odd.batch_size == 8


def test_caption_key_trims_whitespace_only():
  assert cache_lib.caption_key(" a Red circle\n") == hashlib.sha256(
      b"a Red circle").hexdigest()
  assert cache_lib.caption_key("a Red circle") != cache_lib.caption_key("a red circle")
  with pytest.raises(UserError, match="string"):
    cache_lib.caption_key(b"bytes")


def test_record_round_trip_is_exact():
  emb = np.random.default_rng(0).standard_normal((5, 7)).astype(cache_lib.BFLOAT16)
  key = cache_lib.caption_key("ünïcode caption")
  record = cache_lib.encode_record(key, "ünïcode caption", emb)
  got_key, caption, got = cache_lib.decode_record(record, "test")
  assert (got_key, caption) == (key, "ünïcode caption")
  assert got.dtype == cache_lib.BFLOAT16 and (got == emb).all()
  with pytest.raises(UserError, match="corrupt"):
    cache_lib.decode_record(record[:-2], "test")


def test_build_lookup_and_duplicates(encoder, reference, tmp_path):
  captions = CAPTIONS + ["  " + CAPTIONS[0] + "\t", CAPTIONS[1], CAPTIONS[0].upper()]
  stats = cache_lib.build_cache(tmp_path, captions, encoder, shard_size=5, progress=False)
  unique = len(CAPTIONS) + 1  # the upper-case caption is a different caption
  assert (stats["captions"], stats["unique"], stats["new"], stats["shards"]) == (
      15, unique, unique, 3)
  cache = cache_lib.EmbeddingCache.open(tmp_path)
  assert len(cache) == unique == cache.manifest["num_captions"]
  assert [s["count"] for s in cache.manifest["shards"]] == [5, 5, 3]
  assert cache.manifest["encoder"] == encoder.identity
  assert cache.manifest["d_model"] == 32 and cache.manifest["max_length"] == MAX_LENGTH
  cache.check_compatible(encoder.identity)
  for caption, expected in reference.items():
    got = cache.lookup(caption)
    assert got.dtype == cache_lib.BFLOAT16 and got.shape == expected.shape
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=1e-2, atol=1e-2)
  assert (cache.lookup(" " + CAPTIONS[0]) == cache.lookup(CAPTIONS[0])).all()
  assert not np.allclose(cache.lookup(CAPTIONS[0].upper()).astype(np.float32)[:1],
                         cache.lookup(CAPTIONS[0]).astype(np.float32)[:1])
  emb, mask = cache.get_batch([CAPTIONS[2], CAPTIONS[7]], 40)
  assert emb.shape == (2, 40, 32) and emb.dtype == cache_lib.BFLOAT16
  for row, caption in enumerate([CAPTIONS[2], CAPTIONS[7]]):
    n = len(reference[caption])
    assert mask[row].tolist() == [True] * n + [False] * (40 - n)
    assert (emb[row, :n] == cache.lookup(caption)).all() and (emb[row, n:] == 0).all()
  # A second build adds nothing and rewrites no shard.
  before = _bytes_of(tmp_path)
  again = cache_lib.build_cache(tmp_path, captions, encoder, shard_size=5, progress=False)
  assert again["new"] == 0 and again["existing"] == unique and again["shards"] == 0
  assert _bytes_of(tmp_path) == before


def test_interrupted_build_resumes_without_rewriting(encoder, reference, tmp_path):
  # 12 captions, shards of 4 (one batch each): killed while encoding the third shard.
  killed = Wrapped(encoder, interrupt_after=2)
  with pytest.raises(KeyboardInterrupt):
    cache_lib.build_cache(tmp_path, CAPTIONS, killed, shard_size=4, progress=False)
  manifest = cache_lib.read_manifest(tmp_path)
  assert [s["file"] for s in manifest["shards"]] == ["shard-00000.array_record",
                                                      "shard-00001.array_record"]
  assert len(cache_lib.EmbeddingCache.open(tmp_path)) == 8
  written = _bytes_of(tmp_path)
  stats = cache_lib.build_cache(tmp_path, CAPTIONS, encoder, shard_size=4, progress=False)
  assert (stats["existing"], stats["new"], stats["shards"]) == (8, 4, 1)
  after = _bytes_of(tmp_path)
  assert all(after[name] == data for name, data in written.items())
  cache = cache_lib.EmbeddingCache.open(tmp_path)
  assert len(cache) == 12
  for caption in CAPTIONS:
    np.testing.assert_allclose(cache.lookup(caption).astype(np.float32), reference[caption],
                               rtol=1e-2, atol=1e-2)
  # Killed between renaming a shard and listing it: the unlisted files are left alone and
  # their captions go to a new shard.
  manifest = cache_lib.read_manifest(tmp_path)
  dropped = manifest["shards"].pop()
  manifest["num_captions"] -= dropped["count"]
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  stats = cache_lib.build_cache(tmp_path, CAPTIONS, encoder, shard_size=4, progress=False)
  assert stats["new"] == dropped["count"]
  assert _bytes_of(tmp_path)[dropped["file"]] == after[dropped["file"]]
  manifest = cache_lib.read_manifest(tmp_path)
  assert manifest["shards"][-1]["file"] == "shard-00003.array_record"
  assert len(cache_lib.EmbeddingCache.open(tmp_path)) == 12
  # An orphan .keys file (killed between the two renames) is not overwritten either.
  dropped = manifest["shards"].pop()
  manifest["num_captions"] -= dropped["count"]
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  (tmp_path / "shard-00004.keys").write_bytes(b"orphan")
  cache_lib.build_cache(tmp_path, CAPTIONS, encoder, shard_size=4, progress=False)
  assert (tmp_path / "shard-00004.keys").read_bytes() == b"orphan"
  assert cache_lib.read_manifest(tmp_path)["shards"][-1]["file"] == "shard-00005.array_record"
  assert len(cache_lib.EmbeddingCache.open(tmp_path)) == 12


@pytest.fixture(scope="module")
def small_cache(encoder, tmp_path_factory):
  path = tmp_path_factory.mktemp("small")
  cache_lib.build_cache(path, CAPTIONS[:6], encoder, shard_size=3, progress=False)
  return path


def test_encoder_mismatch_is_refused_and_nothing_changes(encoder, small_cache):
  before = _bytes_of(small_cache)
  manifest = (small_cache / "manifest.json").read_bytes()
  with pytest.raises(UserError, match="d_model=32.*d_model=64"):
    cache_lib.build_cache(small_cache, CAPTIONS, Wrapped(encoder, {"d_model": 64}),
                          progress=False)
  with pytest.raises(UserError, match="differs.*weights_sha256"):
    cache_lib.build_cache(small_cache, CAPTIONS, Wrapped(encoder, {"weights_sha256": "0"}),
                          progress=False)
  cache = cache_lib.EmbeddingCache.open(small_cache)
  with pytest.raises(UserError, match="vocab_sha256"):
    cache.check_compatible(dict(encoder.identity, vocab_sha256="0"))
  assert _bytes_of(small_cache) == before
  assert (small_cache / "manifest.json").read_bytes() == manifest


def test_missing_caption_names_it_and_the_command(small_cache):
  cache = cache_lib.EmbeddingCache.open(small_cache)
  assert CAPTIONS[0] in cache and "a purple hexagon" not in cache
  with pytest.raises(UserError, match="'a purple hexagon'.*imagen-embed .*--captions"):
    cache.lookup("a purple hexagon")
  with pytest.raises(UserError, match="1 caption.*'a purple hexagon'"):
    cache.get_batch([CAPTIONS[0], "a purple hexagon"], MAX_LENGTH)
  with pytest.raises(UserError, match="max_length"):
    cache.get_batch([CAPTIONS[0]], 2)


def test_bad_inputs(encoder, small_cache, tiny_t5_config, seqio_spm, tmp_path):
  small_table = dataclasses.replace(tiny_t5_config, vocab_size=20)  # the test vocabulary has 26 ids
  t5.save_random_encoder(tmp_path / "t5", small_table, spiece_model=seqio_spm)
  with pytest.raises(UserError, match="26 ids but the T5 embedding table only 20"):
    encode.TextEncoder.load(tmp_path / "t5")
  (tmp_path / "t5" / "spiece.model").unlink()
  with pytest.raises(UserError, match="no spiece.model.*text_encoder.vocab_path"):
    encode.TextEncoder.load(tmp_path / "t5")
  with pytest.raises(UserError, match="empty"):
    cache_lib.build_cache(tmp_path / "new", [], encoder, progress=False)
  assert not (tmp_path / "new" / "manifest.json").exists()  # no half-made cache
  with pytest.raises(UserError, match="not an embedding cache"):
    cache_lib.EmbeddingCache.open(tmp_path / "nothing")
  copy = tmp_path / "version"
  shutil.copytree(small_cache, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  (copy / "manifest.json").write_text(json.dumps(dict(manifest, format_version=99)))
  with pytest.raises(UserError, match="format_version 99"):
    cache_lib.EmbeddingCache.open(copy)


@pytest.mark.parametrize("damage", ["truncate", "flip", "keys"])
def test_corrupt_shard_is_detected(small_cache, tmp_path, damage):
  copy = tmp_path / "cache"
  shutil.copytree(small_cache, copy)
  shard = copy / "shard-00001.array_record"
  data = bytearray(shard.read_bytes())
  caption = CAPTIONS[4]  # stored in the second shard
  if damage == "keys":
    keys = copy / "shard-00001.keys"
    keys.write_bytes(keys.read_bytes()[:-1] + b"\x00")
    with pytest.raises(UserError, match="shard-00001.keys is corrupt"):
      cache_lib.EmbeddingCache.open(copy)
    return
  if damage == "truncate":
    shard.write_bytes(bytes(data[:len(data) // 2]))
    match = "truncated"
  else:  # a flipped byte inside the first record's payload: same size, other content
    data[120] ^= 0xFF
    shard.write_bytes(bytes(data))
    match = "corrupt"
  with pytest.raises(UserError, match=match):
    cache_lib.EmbeddingCache.open(copy, verify=True).lookup(caption)
  with pytest.raises(UserError, match=match):
    cache_lib.EmbeddingCache.open(copy).verify()
  with pytest.raises(UserError, match=match):  # without verify: sizes, riegeli's hashes
    cache_lib.EmbeddingCache.open(copy).get_batch(CAPTIONS[3:6], MAX_LENGTH)
  assert cache_lib.EmbeddingCache.open(copy).lookup(CAPTIONS[0]).shape[1] == 32  # others ok


def test_process_shares_are_disjoint_and_cover_every_caption():
  keys = [cache_lib.caption_key(c) for c in CAPTIONS]
  for count in (1, 2, 3):
    shares = [cache_lib.process_share(k, count) for k in keys]
    assert set(shares) <= set(range(count))
    assert shares == [cache_lib.process_share(k, count) for k in keys]  # pure
  assert len(set(cache_lib.process_share(k, 2) for k in keys)) == 2  # not all on one


def test_multi_process_build_resumes_and_equals_one_process(encoder, tmp_path):
  """Process 1 of 2 killed after one shard, run again, then process 0 (which merges):
  one manifest with the keys and values of a one-process build. (The processes run one
  after the other here; the barriers are the multi-process test's business.)"""
  barriers = []
  build = lambda p, enc: cache_lib.build_cache(
      tmp_path, CAPTIONS, enc, shard_size=2, progress=False, process_index=p,
      process_count=2, barrier=barriers.append)
  mine = [c for c in CAPTIONS if cache_lib.process_share(cache_lib.caption_key(c), 2) == 1]
  assert 2 < len(mine) < len(CAPTIONS) - 2
  with pytest.raises(KeyboardInterrupt):
    build(1, Wrapped(encoder, interrupt_after=1))
  listed = json.loads((tmp_path / cache_lib.part_name(1)).read_text())["shards"]
  assert [s["file"] for s in listed] == ["shard-p00001-00000.array_record"]
  kept = (tmp_path / listed[0]["file"]).read_bytes()
  stats = build(1, encoder)
  assert (stats["unique"], stats["existing"], stats["new"]) == (len(mine), 2, len(mine) - 2)
  assert (tmp_path / listed[0]["file"]).read_bytes() == kept
  assert barriers == ["embedding_cache_written", "embedding_cache_merged"]
  assert (tmp_path / cache_lib.part_name(1)).exists()  # only process 0 merges
  stats = build(0, encoder)
  assert stats["new"] == len(CAPTIONS) - len(mine)
  assert not list(tmp_path.glob(cache_lib.PART_PREFIX + "*"))
  manifest = cache_lib.read_manifest(tmp_path)
  assert manifest["num_captions"] == len(CAPTIONS)
  cache = cache_lib.EmbeddingCache.open(tmp_path)
  single = tmp_path / "single"
  cache_lib.build_cache(single, CAPTIONS, encoder, shard_size=5, progress=False)
  assert cache.keys() == cache_lib.EmbeddingCache.open(single).keys()
  for caption in CAPTIONS:
    assert (cache.lookup(caption) ==
            cache_lib.EmbeddingCache.open(single).lookup(caption)).all()
  # A one-process rerun has nothing to do.
  assert cache_lib.build_cache(tmp_path, CAPTIONS, encoder, progress=False)["new"] == 0


def test_one_process_run_lists_a_killed_multi_process_run(encoder, tmp_path):
  with pytest.raises(KeyboardInterrupt):
    cache_lib.build_cache(tmp_path, CAPTIONS, Wrapped(encoder, interrupt_after=1),
                          shard_size=2, progress=False, process_index=1, process_count=2,
                          barrier=lambda name: None)
  stats = cache_lib.build_cache(tmp_path, CAPTIONS, encoder, shard_size=4, progress=False)
  assert (stats["existing"], stats["new"]) == (2, len(CAPTIONS) - 2)
  assert not list(tmp_path.glob(cache_lib.PART_PREFIX + "*"))
  files = [s["file"] for s in cache_lib.read_manifest(tmp_path)["shards"]]
  assert files[0] == "shard-p00001-00000.array_record" and len(files) == 4
  assert len(cache_lib.EmbeddingCache.open(tmp_path)) == len(CAPTIONS)
