"""img2dataset-style data end to end, on the real photographs scikit-image ships.

webdataset tar shards and a parquet file with bad members (truncated JPEG, text named .jpg,
no caption, no image, too small, a duplicate) -> the `webdataset:` / `parquet:` sources ->
`imagen-data convert` (exactly the good samples, skip counts printed and saved, resumable,
the same with 2 processes) -> `records:` -> `imagen-train`; `seqio:` sources; decode
failures replaced deterministically in the pipeline."""

import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import skimage
from etils import epath
from PIL import Image

import test_train_lib as lib
from imagen_jax.cli import data as data_cli
from imagen_jax.data import convert as convert_lib
from imagen_jax.data import pipeline as pipeline_lib
from imagen_jax.data import seqio_source
from imagen_jax.data import sources
from imagen_jax.data import webdataset
from imagen_jax.errors import UserError
from imagen_jax.text import cache as cache_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
PHOTO_DIR = pathlib.Path(skimage.__file__).parent / "data"
MAX_SIDE = 96  # photos are shrunk (aspect kept) so that the tests stay fast
MIN_SIZE = 32
EXTENSIONS = ["jpg", "jpg", "png", "jpeg", "webp"]  # img2dataset's and others' names


def _photos():
  """(name, RGB PIL image) of every photograph shipped with scikit-image, shrunk."""
  out, seen = [], set()
  for path in sorted(PHOTO_DIR.iterdir()):
    if path.suffix.lower() not in (".png", ".jpg"):
      continue
    image = Image.open(path).convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    # Thin strips would fall under --min_size; chessboard_GRAY and _RGB are the same pixels.
    if min(image.size) >= MIN_SIZE and image.tobytes() not in seen:
      seen.add(image.tobytes())
      out.append((path.stem, image))
  return out


def _encode(image, ext):
  fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


class Shards:
  """The tar shards, their good samples {key: (bytes, caption)} and the bad keys."""

  def __init__(self, root):
    self.root, self.good, self.bad = root, {}, {}
    photos = _photos()
    self.num_photos = len(photos)
    per_shard = [[] for _ in range(3)]
    for i, (name, image) in enumerate(photos):
      key, ext = f"{i:05d}", EXTENSIONS[i % len(EXTENSIONS)]
      caption = f"a photo of {name.replace('_', ' ')} number {i}"
      data = _encode(image, ext)
      text_ext = "caption" if i == 3 else "txt"
      per_shard[i % 3].append([(f"{key}.{ext}", data), (f"{key}.{text_ext}", caption.encode()),
                               (f"{key}.json", json.dumps({"key": key}).encode())])
      self.good[key] = (data, caption)
    jpeg = self.good["00000"][0]
    small = _encode(photos[1][1].resize((MIN_SIZE - 8, MIN_SIZE - 12)), "jpg")
    bad = {"truncated": ("undecodable", [("bad_truncated.jpg", jpeg[:len(jpeg) // 2]),
                                         ("bad_truncated.txt", b"a truncated photo")]),
           "text": ("undecodable", [("bad_text.jpg", b"this is not a JPEG at all"),
                                    ("bad_text.txt", b"a text file named jpg")]),
           "nocaption": ("no_caption", [("bad_nocaption.jpg", jpeg),
                                        ("bad_nocaption.json", b"{}")]),
           "noimage": ("no_image", [("bad_noimage.txt", b"a caption without image")]),
           "small": ("too_small", [("bad_small.jpg", small),
                                   ("bad_small.txt", b"a tiny photo")]),
           "duplicate": ("duplicate", [("bad_duplicate.jpg", jpeg),
                                       ("bad_duplicate.txt", b"the same photo again")])}
    for k, (reason, members) in enumerate(bad.values()):
      # The duplicate comes after its original (shard 0, first) in the same shard.
      per_shard[0 if reason == "duplicate" else k % 3].append(members)
      self.bad.setdefault(reason, 0)
      self.bad[reason] += 1
    self.paths = []
    for s, samples in enumerate(per_shard):
      path = root / f"{s:05d}.tar"
      with tarfile.open(path, "w") as tar:
        for members in samples:
          for name, data in members:
            _add(tar, name, data)
      self.paths.append(path)
    self.spec = f"webdataset:{root}/{{00000..00002}}.tar"

  def good_captions(self):
    return sorted(c for _, c in self.good.values())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return Shards(tmp_path_factory.mktemp("wds"))


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory, shards):
  import pyarrow as pa
  import pyarrow.parquet as pq
  keys = sorted(shards.good)[:8]
  rows = {"key": keys + ["nullimage", "emptycaption"],
          "caption": [shards.good[k][1] for k in keys] + ["no image here", "  "],
          "jpg": [shards.good[k][0] for k in keys] + [None, shards.good[keys[0]][0]]}
  sizes = [Image.open(io.BytesIO(d)).size if d else (0, 0) for d in rows["jpg"]]
  rows["width"], rows["height"] = [s[0] for s in sizes], [s[1] for s in sizes]
  path = tmp_path_factory.mktemp("parquet") / "00000.parquet"
  pq.write_table(pa.table(rows), path, row_group_size=4)
  return path, keys


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shards):
  out = tmp_path_factory.mktemp("converted") / "records"
  code, text = _cli(["convert", f"--input={shards.spec}", f"--output={out}",
                     f"--min_size={MIN_SIZE}"])
  assert code == 0, text
  return out, text


def _cli(argv):
  """Runs imagen-data in this process; (exit code, stdout + stderr)."""
  out, err = io.StringIO(), io.StringIO()
  mp = pytest.MonkeyPatch()
  mp.setattr(sys, "stdout", out)
  mp.setattr(sys, "stderr", err)
  try:
    code = data_cli.main([*argv, "--no_progress"] if argv[0] == "convert" else argv)
  finally:
    mp.undo()
  return code, out.getvalue() + err.getvalue()


def _records(folder):
  src = sources.get_source(f"records:{folder}/*.array_record")
  return [src.encoded(i) for i in range(len(src))]


# ---------------------------------------------------------------------------------------
# Sources


def test_brace_patterns(shards):
  assert sources.expand_braces("a{08..10}b{x,y}") == [
      "a08bx", "a08by", "a09bx", "a09by", "a10bx", "a10by"]
  assert sources.expand_braces("{1..3}") == ["1", "2", "3"]
  found = sources.expand_pattern(f"{shards.root}/{{00000..00001}}.tar")
  assert [p.name for p in found] == ["00000.tar", "00001.tar"]
  found = sources.expand_pattern(f"{shards.root}/0000[0-2].tar")
  assert [p.name for p in found] == ["00000.tar", "00001.tar", "00002.tar"]
  with pytest.raises(UserError, match="runs backwards"):
    sources.expand_braces("{5..2}")


def test_webdataset_source_index_and_examples(shards, monkeypatch):
  src = sources.get_source(shards.spec)
  # Indexing drops only samples without an image or caption; decoding comes later.
  assert src.skipped == {"no_image": 1, "no_caption": 1}
  assert len(src) == len(shards.good) + 4
  for path in shards.paths:
    assert (path.parent / (path.name + ".idx.json")).exists()
  for i in range(len(src)):
    key = src.key(i)
    if key in shards.good:
      data, caption = shards.good[key]
      assert src.encoded(i) == (data, caption)
  first = src.key(0)
  np.testing.assert_array_equal(
      src[0]["image"], np.asarray(Image.open(io.BytesIO(shards.good[first][0])).convert("RGB")))
  assert sorted(c for c in src.captions() if c.startswith("a photo of")) == \
      shards.good_captions()
  # A second open reads the sidecars: nothing is re-indexed.
  monkeypatch.setattr(webdataset, "build_index", lambda shard: pytest.fail("re-indexed"))
  again = sources.get_source(shards.spec)
  assert [again.key(i) for i in range(len(again))] == [src.key(i) for i in range(len(src))]


def test_webdataset_index_goes_to_the_cache_when_the_folder_is_read_only(
    shards, tmp_path, monkeypatch):
  copy = tmp_path / "ro"
  copy.mkdir()
  (copy / "00000.tar").write_bytes(shards.paths[0].read_bytes())
  monkeypatch.setenv(sources.CACHE_ENV, os.fspath(tmp_path / "cache"))
  write = webdataset.write_atomic

  def refuse_next_to_shard(path, data):
    if path.parent == copy:
      raise PermissionError(f"read-only: {path}")
    write(path, data)
  monkeypatch.setattr(webdataset, "write_atomic", refuse_next_to_shard)
  src = webdataset.WebDatasetSource(os.fspath(copy / "00000.tar"))
  cached = list((tmp_path / "cache" / "tar_index").iterdir())
  assert len(cached) == 1 and cached[0].name.endswith("-00000.tar.idx.json")
  assert not list(copy.glob("*.idx.json"))
  monkeypatch.setattr(webdataset, "build_index", lambda shard: pytest.fail("re-indexed"))
  assert len(webdataset.WebDatasetSource(os.fspath(copy / "00000.tar"))) == len(src)


def test_stale_tar_index_is_rebuilt(shards, tmp_path, monkeypatch):
  monkeypatch.setenv(sources.CACHE_ENV, os.fspath(tmp_path / "cache"))
  path = tmp_path / "00000.tar"
  path.write_bytes(shards.paths[1].read_bytes())
  before = len(webdataset.WebDatasetSource(os.fspath(path)))
  with tarfile.open(path, "a") as tar:  # the shard grows: its index no longer matches
    _add(tar, "extra.jpg", shards.good["00000"][0])
    _add(tar, "extra.txt", b"one more photo")
  src = webdataset.WebDatasetSource(os.fspath(path))
  assert len(src) == before + 1 and src.key(len(src) - 1) == "extra"
  # The new index replaced the stale sidecar (not a write to the cache instead).
  sidecar = webdataset.index_paths(epath.Path(path))[0]
  assert webdataset._read_index(sidecar, webdataset.fingerprint(epath.Path(path)))
  assert not (tmp_path / "cache").exists() and not list(tmp_path.glob(".*tmp*"))


def test_parquet_source(parquet_file, shards):
  path, keys = parquet_file
  src = sources.get_source(f"parquet:{path.parent}/*.parquet")
  assert src.skipped == {"no_image": 1, "no_caption": 1}
  assert [src.key(i) for i in range(len(src))] == keys
  assert list(src.captions()) == [shards.good[k][1] for k in keys]
  for i in (0, 5, 7):  # across row groups, out of order
    assert src.encoded(i) == shards.good[keys[i]]
  assert src[6]["image"].shape[2] == 3


def test_pipeline_replaces_undecodable_images_deterministically(shards):
  src = sources.get_source(shards.spec)
  bad = {i for i in range(len(src)) if src.key(i) in ("bad_truncated", "bad_text")}
  assert len(bad) == 2

  def run():
    pipe = pipeline_lib.Pipeline(src, None, image_size=16, global_batch_size=len(src),
                                 seed=3, max_length=None, num_workers=2)
    return pipe, pipe.host_batch(0)  # one whole epoch: every example once

  pipe, batch = run()
  positions = pipe.source_indices(np.arange(len(src)))
  expected_failures = 0
  for stream_index in np.flatnonzero(np.isin(positions, list(bad))):
    attempt, current = 0, int(positions[stream_index])
    while current in bad:  # the chain of replacements each bad example goes through
      expected_failures += 1
      current = pipe.replacement(int(stream_index), attempt)
      attempt += 1
  assert pipe.decode_failures == expected_failures >= 2
  for stream_index in np.flatnonzero(np.isin(positions, list(bad))):
    replacement = pipe.replacement(int(stream_index), 0)
    if replacement not in bad:
      expected = pipe.preprocess(src.raw(replacement)["image"], "", int(stream_index))
      np.testing.assert_array_equal(batch["image"][stream_index], expected["image"])
  pipe2, batch2 = run()
  np.testing.assert_array_equal(batch["image"], batch2["image"])
  assert pipe2.decode_failures == pipe.decode_failures


def test_seqio_source(tmp_path, monkeypatch):
  import seqio
  import tensorflow as tf
  monkeypatch.setenv(sources.CACHE_ENV, os.fspath(tmp_path / "cache"))
  photos = _photos()[:3]
  images = [np.asarray(p) for _, p in photos]

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(list(range(3))).map(
        lambda i: {"pixels": tf.numpy_function(lambda k: images[int(k)], [i], tf.uint8),
                   "text": tf.gather([f"seqio photo {k}" for k in range(3)], i)})
  name = "imagen_test_photos"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
                         output_features={})
  spec = f"seqio:{name}?image=pixels&text=text"
  src = sources.get_source(spec)
  assert len(src) == 3 and list(src.captions()) == [f"seqio photo {k}" for k in range(3)]
  for k in range(3):
    np.testing.assert_array_equal(src[k]["image"], images[k])
  # Two hosts sharing the cache write the folder at once: the one that renames second
  # reads the other's folder, and neither leaves a temporary folder behind.
  folder = seqio_source.materialized_dir(name, "train", "pixels", "text")
  shutil.rmtree(folder)
  real_write = sources.write_records
  def write_while_another_host_finishes(path, examples):
    real_write(path, examples)
    shutil.copytree(epath.Path(path).parent, folder)
  monkeypatch.setattr(sources, "write_records", write_while_another_host_finishes)
  src = sources.get_source(spec)
  assert list(src.captions()) == [f"seqio photo {k}" for k in range(3)]
  assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
  monkeypatch.setattr(sources, "write_records", real_write)
  seqio.TaskRegistry.remove(name)  # written once: later opens need no Task
  assert len(sources.get_source(spec)) == 3
  with pytest.raises(UserError, match="no seqio Task"):
    sources.get_source("seqio:imagen_no_such_task")


# ---------------------------------------------------------------------------------------
# imagen-data convert and stats


def test_convert_keeps_exactly_the_good_samples(converted, shards):
  out, text = converted
  manifest = json.loads((out / "manifest.json").read_text())
  expected = {"no_image": 1, "no_caption": 1, "undecodable": 2, "too_small": 1,
              "duplicate": 1, "caption_too_short": 0, "caption_too_long": 0,
              "aspect_ratio": 0}
  assert manifest["skipped"] == expected
  assert manifest["examples"] == len(shards.good) and manifest["shards"] == 3
  assert manifest["input_examples"] == len(shards.good) + sum(expected.values())
  for reason, count in expected.items():
    assert f"skipped {reason}: {count}" in text
  records = _records(out)
  assert sorted(c for _, c in records) == shards.good_captions()
  good_bytes = {c: d for d, c in shards.good.values()}
  assert all(good_bytes[c] == d for d, c in records)  # stored as given, not re-encoded
  src = sources.get_source(f"records:{out}/*.array_record")  # example i is stable
  assert [src.encoded(i) for i in (0, 7, len(src) - 1)] == [records[i] for i in
                                                            (0, 7, len(src) - 1)]


def test_convert_resize_and_filters(shards, parquet_file, tmp_path):
  path, keys = parquet_file
  code, text = _cli(["convert", f"--input=parquet:{path}", f"--output={tmp_path / 'p'}",
                     "--resize=40", "--max_aspect_ratio=1.2", "--max_caption_chars=30"])
  assert code == 0, text
  manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
  sizes = {k: Image.open(io.BytesIO(shards.good[k][0])).size for k in keys}
  long_caption = {k for k in keys if len(shards.good[k][1]) > 30}
  wide = {k for k in keys if max(sizes[k]) / min(sizes[k]) > 1.2} - long_caption
  assert manifest["skipped"]["caption_too_long"] == len(long_caption)
  assert manifest["skipped"]["aspect_ratio"] == len(wide)
  assert manifest["skipped"]["no_image"] == 1 and manifest["skipped"]["no_caption"] == 1
  records = _records(tmp_path / "p")
  assert len(records) == len(keys) - len(long_caption) - len(wide) > 0
  for data, _ in records:
    assert min(Image.open(io.BytesIO(data)).size) == 40


def test_killed_convert_resumes_to_the_same_output(converted, shards, tmp_path):
  out = tmp_path / "resumed"
  args = ["convert", f"--input={shards.spec}", f"--output={out}", f"--min_size={MIN_SIZE}"]
  code, text = _cli(args + ["--max_shards=1"])
  assert code == 0 and "not every shard is done" in text
  assert len(list(out.glob("*.array_record"))) == 1 and not (out / "manifest.json").exists()
  (out / ".data-00001-of-00003.array_record.tmp-dead").write_bytes(b"half")  # a killed write
  code, text = _cli(args)
  assert code == 0 and "1 already done" in text, text
  assert not list(out.glob(".*tmp-*"))
  clean = converted[0]
  for name in ("data-00000-of-00003", "data-00001-of-00003", "data-00002-of-00003"):
    assert _records_of(out / f"{name}.array_record") == _records_of(clean / f"{name}.array_record")
  assert json.loads((out / "manifest.json").read_text())["skipped"] == \
      json.loads((clean / "manifest.json").read_text())["skipped"]
  code, text = _cli(args[:-1] + ["--min_size=8"])  # other options: refused, not mixed in
  assert code == 2 and "converted with other options" in text
  assert sorted(p.name for p in out.glob("*.array_record")) == sorted(
      p.name for p in clean.glob("*.array_record"))


def _records_of(path):
  src = sources.RecordsSource(os.fspath(path), allow_empty=True)
  return [src.encoded(i) for i in range(len(src))]


def test_two_process_convert_equals_one_process(converted, shards, tmp_path):
  out = tmp_path / "two"
  env = dict(os.environ, PYTHONPATH=os.fspath(REPO))
  proc = subprocess.run(
      [os.fspath(REPO / "launch" / "multiprocess_cpu.sh"), "2", "--timeout=240", "--",
       sys.executable, "-m", "imagen_jax.cli.data", "convert", f"--input={shards.spec}",
       f"--output={out}", f"--min_size={MIN_SIZE}", "--no_progress"],
      env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "process 1 of 2" in proc.stdout and "process 0 of 2" in proc.stdout
  assert sorted(_records(out)) == sorted(_records(converted[0]))
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["skipped"] == json.loads((converted[0] / "manifest.json").read_text())[
      "skipped"]


def test_manifest_written_twice_is_replaced(converted, tmp_path):
  # Every process that finishes the last shards merges the manifest, and two can do so at
  # once: the second write replaces the first instead of failing.
  out = tmp_path / "again"
  shutil.copytree(converted[0], out)
  before = json.loads((out / "manifest.json").read_text())
  for _ in range(2):
    assert convert_lib.merge_manifest(epath.Path(out), before["shards"],
                                      before["options"]) == before
  assert json.loads((out / "manifest.json").read_text()) == before
  assert not list(out.glob(".*tmp*"))


def test_bad_input_gives_one_line_and_exit_2(shards, tmp_path):
  garbage = tmp_path / "00000.tar"
  garbage.write_bytes(b"\x00\x01 not a tar archive " * 50)
  cases = [
      (["convert", "--input=webdataset:/nowhere/{0..3}.tar", f"--output={tmp_path}/a"],
       "no files match"),
      (["convert", "--input=nosuchkind:x", f"--output={tmp_path}/b"], "unknown kind"),
      (["convert", f"--input=webdataset:{garbage}", f"--output={tmp_path}/c"],
       "cannot read tar shard"),
      (["convert", f"--input={shards.spec}", f"--output={tmp_path}/d", "--min_size=100000"],
       "no example .* passed the filters"),
      (["convert", f"--input={shards.spec}", f"--output={tmp_path}/e",
        "--max_aspect_ratio=0.5"], "max_aspect_ratio=0.5 must be >= 1"),
      (["stats", "webdataset:{9..1}.tar"], "runs backwards"),
  ]
  for argv, message in cases:
    code, text = _cli(argv)
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, text)
    assert re.search(message, lines[0]), (argv, lines[0])


def test_stats(converted, shards):
  code, text = _cli(["stats", f"records:{converted[0]}/*.array_record", "--json",
                     "--no_progress"])
  assert code == 0, text
  result = json.loads(text)
  n = len(shards.good)
  assert result["examples"] == n and result["undecodable_headers"] == 0
  sides = [min(Image.open(io.BytesIO(d)).size) for d, _ in shards.good.values()]
  assert result["shortest_side"] == convert_lib.histogram(sides, convert_lib.SIZE_EDGES)
  assert sum(result["aspect_ratio"].values()) == n
  assert sum(result["caption_chars"].values()) == n
  code, text = _cli(["stats", shards.spec, "--no_progress"])
  assert code == 0 and "left out when indexing: {'no_image': 1, 'no_caption': 1}" in text
  # The text file named .jpg has no image header; the truncated JPEG's header is fine.
  assert f"{len(shards.good) + 4} examples" in text and "(1 undecodable)" in text


# ---------------------------------------------------------------------------------------
# imagen-train on the shards


@pytest.fixture(scope="module")
def caption_cache(tmp_path_factory, shards):
  path = tmp_path_factory.mktemp("cache")
  captions = list(sources.get_source(shards.spec).captions())
  cache_lib.build_cache(path, captions, lib.WordEncoder(d_model=16, max_length=12),
                        progress=False)
  return path


@pytest.mark.slow
@pytest.mark.parametrize("which", ["webdataset", "records"])
def test_train_runs_on_the_shards(which, shards, converted, caption_cache, tmp_path, capsys):
  from imagen_jax.cli import train as train_cli
  from test_train_cli import SMALL
  spec = shards.spec if which == "webdataset" else f"records:{converted[0]}/*.array_record"
  code = train_cli.main([
      "--gin_file=experiments/tiny_base.gin", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
      f"--gin.CACHE_DIR='{caption_cache}'", f"--gin.DATASET='{spec}'", *SMALL,
      "--gin.TRAIN_STEPS=2", "--gin.train.log_every=1",
      "--gin.train.checkpoint_every=2", "--gin.train.sample_every=0"])
  out = capsys.readouterr()
  assert code == 0, out.out[-2000:] + out.err[-2000:]
  assert "step 2/2" in out.out
  # The tar shards hold two undecodable images: replaced, counted in the metrics line.
  failures = re.findall(r"decode_failures ([\d.]+)", out.out)
  assert (which == "webdataset") == bool(failures) and all(float(f) > 0 for f in failures)


def test_convert_a_folder_in_chunks(shards, tmp_path):
  folder = tmp_path / "photos"
  folder.mkdir()
  keys = sorted(shards.good)[:5]
  for key in keys:
    data, caption = shards.good[key]
    ext = {b"\xff\xd8": "jpg", b"\x89P": "png", b"RI": "webp"}[data[:2]]
    (folder / f"{key}.{ext}").write_bytes(data)
    (folder / f"{key}.txt").write_text(caption)
  code, text = _cli(["convert", f"--input=folder:{folder}", f"--output={tmp_path / 'out'}",
                     "--examples_per_shard=2"])
  assert code == 0, text
  assert sorted(p.name for p in (tmp_path / "out").glob("*.array_record")) == [
      f"data-{k:05d}-of-00003.array_record" for k in range(3)]
  assert _records(tmp_path / "out") == [shards.good[k] for k in keys]  # order kept
