"""Sources: folder, jsonl, records (ArrayRecord and TFRecord), tfds, shapes; spec errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import sources
from imagen_jax.errors import UserError


def _image(value, size=(12, 10)):
  """A distinct, non-constant uint8 image [H,W,3] per value."""
  h, w = size
  rng = np.random.default_rng(value)
  return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _write(path, image, fmt="PNG"):
  Image.fromarray(image).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / "imgs"
  (root / "sub").mkdir(parents=True)
  # Names chosen so that sorted order differs from creation order.
  for name, value in [("b.png", 1), ("a.png", 0), ("sub/c.webp", 2)]:
    _write(root / name, _image(value), "WEBP" if name.endswith("webp") else "PNG")
    (root / name).with_suffix(".txt").write_text(f"  caption {value}\n")
  (root / "notes.md").write_text("not an image")
  return root


def test_folder_source_sorted_with_captions(folder):
  src = sources.get_source(f"folder:{folder}")
  assert len(src) == 3
  assert list(src.captions()) == ["caption 0", "caption 1", "caption 2"]
  for i in range(2):  # PNG is lossless: the exact pixels come back
    example = src[i]
    assert example["caption"] == f"caption {i}"
    np.testing.assert_array_equal(example["image"], _image(i))
  assert src[2]["image"].shape == (12, 10, 3) and src[2]["image"].dtype == np.uint8
  with pytest.raises(IndexError):
    src[3]


def test_folder_errors(tmp_path, folder):
  with pytest.raises(UserError, match="does not exist"):
    sources.get_source(f"folder:{tmp_path / 'nope'}")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(UserError, match="no examples"):
    sources.get_source(f"folder:{empty}")
  _write(folder / "d.jpg", _image(3), "JPEG")
  with pytest.raises(UserError, match=r"d\.jpg has no caption file .*d\.txt"):
    sources.get_source(f"folder:{folder}")


def test_jsonl_source_relative_and_absolute(tmp_path):
  (tmp_path / "data" / "img").mkdir(parents=True)
  _write(tmp_path / "data" / "img" / "x.png", _image(5))
  _write(tmp_path / "y.png", _image(6))
  rows = [{"image": "img/x.png", "caption": "a x"},
          {"image": os.fspath(tmp_path / "y.png"), "caption": "a y "}]
  path = tmp_path / "data" / "list.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  src = sources.get_source(f"jsonl:{path}")
  assert len(src) == 2 and list(src.captions()) == ["a x", "a y"]
  np.testing.assert_array_equal(src[0]["image"], _image(5))
  np.testing.assert_array_equal(src[1]["image"], _image(6))
  path.write_text('{"image": "img/x.png"}\n')
  with pytest.raises(UserError, match="line 1"):
    sources.get_source(f"jsonl:{path}")
  path.write_text('{"image": "img/missing.png", "caption": "c"}\n')
  with pytest.raises(UserError, match="missing"):
    sources.get_source(f"jsonl:{path}")[0]


@pytest.mark.parametrize("suffix", ["array_record", "tfrecord"])
def test_records_roundtrip(tmp_path, suffix):
  examples = [{"image": _image(k, (6 + k, 8)), "caption": f"caption {k}"} for k in range(7)]
  paths = sources.write_records(tmp_path / f"train.{suffix}", examples, num_shards=3)
  assert [os.path.basename(p) for p in paths] == [
      f"train-0000{k}-of-00003.{suffix}" for k in range(3)]
  src = sources.get_source(f"records:{tmp_path}/train-*.{suffix}")
  assert len(src) == 7
  # Example k went to shard k % 3; shards are read in order: shard-major order.
  order = [0, 3, 6, 1, 4, 2, 5]
  assert list(src.captions()) == [f"caption {k}" for k in order]
  for i in (0, 4, 6):  # random access, out of order
    k = order[i]
    np.testing.assert_array_equal(src[i]["image"], examples[k]["image"])
    assert src[i]["caption"] == f"caption {k}"
  with pytest.raises(UserError, match="no record files match"):
    sources.get_source(f"records:{tmp_path}/other-*.{suffix}")


def test_records_bad_name(tmp_path):
  with pytest.raises(UserError, match="array_record' or 'tfrecord"):
    sources.write_records(tmp_path / "train.bin", [], num_shards=1)


def test_tfds_source_from_a_tiny_local_builder(tmp_path):
  """A custom GeneratorBasedBuilder prepared as ArrayRecord in tmp; nothing downloaded."""
  tfds = pytest.importorskip("tensorflow_datasets")

  # skip_registration: the source must find it from its files in data_dir, as it would a
  # dataset built by another program.
  class ImagenJaxTestCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "picture": tfds.features.Image(shape=(None, None, 3)),
          "meta": {"text": tfds.features.Text()}}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for k in range(4):
        yield k, {"picture": _image(k, (5, 7)), "meta": {"text": f"tfds caption {k}"}}

  data_dir = tmp_path / "tfds"
  ImagenJaxTestCaptions(data_dir=os.fspath(data_dir),
                        file_format="array_record").download_and_prepare()
  src = sources.get_source(f"tfds:imagen_jax_test_captions:train?image=picture"
                           f"&text=meta/text&data_dir={data_dir}")
  assert len(src) == 4
  captions = sorted(src.captions())
  assert captions == [f"tfds caption {k}" for k in range(4)]
  for i in range(4):
    example = src[i]
    k = int(example["caption"].split()[-1])
    np.testing.assert_array_equal(example["image"], _image(k, (5, 7)))
  with pytest.raises(UserError, match="no feature 'img'"):
    sources.get_source(f"tfds:imagen_jax_test_captions:train?image=img&text=meta/text"
                       f"&data_dir={data_dir}")


def test_parse_tfds_spec():
  assert sources.parse_tfds_spec("coco_captions/2017:1.1.0:train[:10%]?text=captions/text") \
      == {"name": "coco_captions/2017:1.1.0", "split": "train[:10%]", "image_key": "image",
          "text_key": "captions/text", "data_dir": None}
  assert sources.parse_tfds_spec("mnist")["split"] == "train"
  with pytest.raises(UserError, match="unknown option"):
    sources.parse_tfds_spec("mnist:train?img=x")


@pytest.mark.parametrize("spec", ["", "pictures:/tmp", "folder:", "shapes:test", "records"])
def test_bad_spec_names_the_valid_forms(spec):
  with pytest.raises(UserError, match=r"valid forms: shapes, shapes:held_out, folder:PATH"):
    sources.get_source(spec)


def test_shapes_source_renders_at_the_requested_resolution():
  from imagen_jax.data import shapes
  src = sources.get_source("shapes", resolution=24, shapes_length=100)
  assert len(src) == 100
  scene = shapes.sample_scene(0, 7, "train")
  example = src[7]
  assert example["caption"] == scene.caption
  np.testing.assert_array_equal(example["image"], shapes.render(scene, 24))
  assert src.at_resolution(40)[7]["image"].shape == (40, 40, 3)
  assert list(src.captions()) == shapes.all_captions("train")
  held_out = sources.get_source("shapes:held_out")
  assert set(held_out.captions()) == set(shapes.all_captions("held_out"))
  assert shapes.is_held_out(held_out[3]["caption"])


def test_tf_example_codec_matches_tensorflow():
  """Our wire-format codec against TensorFlow's own tf.train.Example, both directions."""
  from tensorflow.core.example import example_pb2
  from imagen_jax.data import tf_example
  image, caption = bytes(range(256)) * 3, "ünïcode caption"
  ours = sources.serialize_example(image, caption)
  parsed = example_pb2.Example.FromString(ours)
  assert parsed.features.feature["image"].bytes_list.value == [image]
  assert parsed.features.feature["caption"].bytes_list.value == [caption.encode()]
  theirs = example_pb2.Example()
  theirs.features.feature["caption"].bytes_list.value.extend([b"first", b"second"])
  theirs.features.feature["image"].bytes_list.value.append(image)
  theirs.features.feature["label"].int64_list.value.extend([3, -1, 2**40])  # skipped
  theirs.features.feature["score"].float_list.value.append(0.5)
  record = theirs.SerializeToString()
  assert sources.parse_example(record, "t") == (image, "first")
  decoded = tf_example.decode(record)
  assert decoded["caption"] == [b"first", b"second"] and decoded["label"] == []
  assert tf_example.decode(b"") == {}
  for broken in (record[:-3], b"\x0a\xff\xff\xff\xff\x0f", b"\x0b"):
    with pytest.raises(UserError, match="not a tf.train.Example"):
      sources.parse_example(broken, "shard 0")
