"""The shared file and image helpers: imagen_jax.files (atomic writes, JSON lines) and
imagen_jax.images (PNGs, grids), and sampling's index reader built on them."""

import json

import numpy as np
import pytest

from imagen_jax import files, images
from imagen_jax.errors import UserError
from imagen_jax.sample import output


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "sub" / "a.json"
  files.write_atomic(path, "first")  # creates the folder
  files.write_atomic(path, b"second")
  assert path.read_bytes() == b"second"
  assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_read_jsonl_drops_a_torn_tail_and_bad_lines(tmp_path):
  path = tmp_path / "rows.jsonl"
  assert files.read_jsonl(path) == ([], False)  # a missing file has no rows
  rows = [{"b": 1, "a": [2]}, {"c": "x"}]
  path.write_text(files.jsonl_text(rows) + "\n")
  assert files.read_jsonl(path) == (rows, False)
  assert files.jsonl_text(rows).splitlines()[0] == '{"a": [2], "b": 1}'  # keys sorted
  path.write_text(files.jsonl_text(rows) + '{"c": "cut sh')  # killed mid-write
  assert files.read_jsonl(path) == (rows, True)
  path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
  assert files.read_jsonl(path) == ([{"a": 1}, {"b": 2}], True)


def test_read_index_refuses_a_missing_or_torn_index(tmp_path):
  with pytest.raises(UserError, match="index.jsonl.*is missing"):
    output.read_index(tmp_path)
  row = {"prompt": "a red circle", "stage": 0, "file": "x.png"}
  (tmp_path / "index.jsonl").write_text(json.dumps(row) + "\n")
  assert output.read_index(tmp_path) == [row]
  (tmp_path / "index.jsonl").write_text(json.dumps(row) + "\n" + '{"prompt": ')
  with pytest.raises(UserError, match="not JSON.*rerun imagen-sample"):
    output.read_index(tmp_path)


def test_png_round_trip_from_arrays_and_pil_images(tmp_path):
  image = np.random.RandomState(0).randint(0, 256, (5, 7, 3)).astype(np.uint8)
  images.write_png(tmp_path / "a.png", image)
  np.testing.assert_array_equal(images.read_image(tmp_path / "a.png"), image)
  grid = images.make_grid([image[:, :5]], pad=0, cell_size=5)
  images.write_png(tmp_path / "b.png", grid)
  np.testing.assert_array_equal(images.read_image(tmp_path / "b.png"), image[:, :5])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_grid_without_captions_tiles_images_exactly():
  rng = np.random.RandomState(1)
  tiles = rng.randint(0, 256, (5, 4, 4, 3)).astype(np.uint8)
  grid = np.asarray(images.make_grid(tiles, columns=3, pad=0, cell_size=12))
  assert grid.shape == (2 * 12, 3 * 12, 3)
  for i, tile in enumerate(tiles):  # nearest-neighbour x3: each pixel a 3x3 block
    r, c = divmod(i, 3)
    np.testing.assert_array_equal(grid[12 * r:12 * (r + 1), 12 * c:12 * (c + 1)],
                                  tile.repeat(3, axis=0).repeat(3, axis=1))
  assert (grid[12:, 24:] == 255).all()  # the empty sixth cell stays white
  padded = np.asarray(images.make_grid(tiles[:2], pad=2, cell_size=4))
  assert padded.shape == (2 + 4 + 2, 2 + 2 * (4 + 2), 3)
  np.testing.assert_array_equal(padded[2:6, 8:12], tiles[1])
  with pytest.raises(ValueError):
    images.make_grid([])
