"""Sampling's files and bookkeeping, without models: prompts, start images, PNGs, the grid,
index.jsonl (resume and multi-process merge), seeds, work splitting, stage settings."""

import json

import numpy as np
import pytest

from imagen_jax.errors import UserError
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample import output


def test_read_prompts_skips_blank_lines_and_rejects_empty(tmp_path):
  f = tmp_path / "p.txt"
  f.write_text("  a red circle \n\n\ta blue square\n")
  assert output.read_prompts(f) == ["a red circle", "a blue square"]
  f.write_text("\n \n")
  with pytest.raises(UserError, match="empty"):
    output.read_prompts(f)
  with pytest.raises(UserError, match="does not exist"):
    output.read_prompts(tmp_path / "missing.txt")


def _png(path, value, size=8):
  output.write_png(path, np.full((size, size, 3), value, np.uint8))


def test_start_images_pair_with_captions_or_prompt_lines(tmp_path):
  d = tmp_path / "imgs"
  _png(d / "b.png", 20)
  _png(d / "a.png", 10)
  (d / "notes.md").write_text("not an image")
  images, prompts = output.load_start_images(d, ["first", "second"])
  assert [int(im[0, 0, 0]) for im in images] == [10, 20]   # sorted by name
  assert prompts == ["first", "second"]
  (d / "a.txt").write_text("caption of a\n")
  (d / "b.txt").write_text("caption of b")
  assert output.load_start_images(d, None)[1] == ["caption of a", "caption of b"]
  (d / "b.txt").unlink()
  assert output.load_start_images(d, ["x", "y"])[1] == ["caption of a", "y"]
  with pytest.raises(UserError, match="b.png"):
    output.load_start_images(d, None)
  with pytest.raises(UserError, match="3 prompts for 2 start images"):
    output.load_start_images(d, ["x", "y", "z"])
  single, p = output.load_start_images(d / "b.png", ["only"])
  assert len(single) == 1 and p == ["only"]
  with pytest.raises(UserError, match="no image"):
    output.load_start_images(tmp_path, ["x"])


def test_fit_image_crops_to_square_and_resizes():
  image = np.zeros((10, 20, 3), np.uint8)
  image[:, 5:15] = 255                   # the centre square is white
  out = output.fit_image(image, 4)
  assert out.shape == (4, 4, 3) and out.min() == 255
  assert output.fit_image(np.ones((6, 6, 3), np.uint8), 6) is not None
  with pytest.raises(UserError, match="uint8"):
    output.fit_image(np.zeros((4, 4, 3), np.float32), 4)


def test_write_png_round_trips_and_leaves_no_temporary(tmp_path):
  image = np.random.RandomState(0).randint(0, 256, (5, 5, 3)).astype(np.uint8)
  path = tmp_path / "stage0" / output.image_file(0, 3, 1).split("/")[1]
  output.write_png(path, image)
  np.testing.assert_array_equal(output.read_image(path), image)
  assert sorted(p.name for p in path.parent.iterdir()) == ["00003_1.png"]
  assert output.image_file(2, 12, 0) == "stage2/00012_0.png"


def test_grid_has_a_cell_per_image_and_caption_bands():
  images = [np.full((16, 16, 3), v, np.uint8) for v in (0, 100, 200)]
  images[0][0, 0] = 255                                  # one white pixel, top left
  grid = np.asarray(output.make_grid(images, ["a", "b", "a long caption " * 5]))
  cell = 128                                             # 16 px images are enlarged
  assert grid.shape[1] == 2 * (cell + 4) + 4             # 2 columns for 3 images
  assert grid.shape[0] > 2 * (cell + 4)                  # 2 rows plus text bands
  assert (grid[4:4 + 8, 4:4 + 8] == 255).all()           # nearest-neighbour: 8x8 block
  assert (grid[4 + 8:4 + cell, 4 + 8:4 + cell] == 0).all()
  assert (grid[4:4 + cell, 8 + cell:8 + 2 * cell] == 100).all()
  band = grid[4 + cell:4 + cell + 16, 4:4 + cell]
  assert band.min() < 128                                # caption text is drawn


def _row(stage, p, s):
  return {"prompt": f"p{p}", "prompt_index": p, "seed": 1, "sample": s, "stage": stage,
          "file": output.image_file(stage, p, s), "sampler": {}}


def test_index_writer_never_duplicates_and_repairs_a_torn_line(tmp_path):
  w = output.IndexWriter(tmp_path)
  assert w.add([_row(0, 0, 0), _row(0, 1, 0)]) == 2
  assert w.add([_row(0, 0, 0), _row(1, 0, 0)]) == 1
  text = (tmp_path / "index.jsonl").read_text()
  (tmp_path / "index.jsonl").write_text(text + '{"prompt": "torn')   # killed mid-write
  w = output.IndexWriter(tmp_path)
  assert (0, 1, 0) in w and (1, 0, 0) in w
  assert w.add([_row(1, 1, 0)]) == 1
  rows = output.read_index(tmp_path)
  assert [output.row_key(r) for r in rows] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
  assert all(json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines())


def test_multi_process_parts_merge_into_one_sorted_index(tmp_path):
  items = cascade_lib.work_items(3, 2, seed=0)
  shares = [cascade_lib.process_share(items, i, 2) for i in range(2)]
  assert sorted(shares[0] + shares[1], key=items.index) == items
  assert not set(shares[0]) & set(shares[1])
  for i, share in enumerate(shares):
    w = output.IndexWriter(tmp_path, process_index=i, process_count=2)
    w.add([_row(0, it.prompt_index, it.sample) for it in share])
  assert not (tmp_path / "index.jsonl").exists()
  assert output.merge_index(tmp_path) == 6
  assert [output.row_key(r) for r in output.read_index(tmp_path)] == [
      (0, p, s) for p in range(3) for s in range(2)]
  assert not list(tmp_path.glob("index.part-*"))
  # A later single-process rerun sees the merged rows.
  assert output.IndexWriter(tmp_path).add([_row(0, 2, 1)]) == 0


def test_image_seeds_fold_prompt_and_sample_into_the_root_seed():
  seeds = cascade_lib.image_seeds(0, [0, 0, 1, 1], [0, 1, 0, 1])
  assert len(set(seeds)) == 4
  assert cascade_lib.image_seeds(0, [1], [1]) == seeds[3:]          # independent of the rest
  assert cascade_lib.image_seeds(1, [1], [1]) != seeds[3:]
  assert [it.seed for it in cascade_lib.work_items(2, 2, 0)] == seeds
  with pytest.raises(UserError, match="seed"):
    cascade_lib.image_seeds(-1, [0], [0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="euler"), "sampler"),
    (dict(num_steps=0), "num_steps"),
    (dict(thresholding="soft"), "thresholding"),
    (dict(percentile=150.0), "percentile"),
    (dict(aug_level=1.5), "aug_level"),
    (dict(eta=0.5), "eta"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(model_dir=""), "model_dir"),
])
def test_stage_rejects_bad_settings(kwargs, match):
  with pytest.raises(UserError, match=match):
    cascade_lib.Stage(**{"model_dir": "m", **kwargs})


def test_stage_settings_record_what_applies():
  s = cascade_lib.Stage(model_dir="m", sampler="ddim", eta=0.5, thresholding="dynamic")
  assert s.record(is_sr=False) == {"method": "ddim", "num_steps": 256,
                                   "guidance_scale": 5.0, "thresholding": "dynamic",
                                   "percentile": 99.5, "eta": 0.5}
  assert s.record(is_sr=True)["aug_level"] == 0.2
  guided = cascade_lib.Stage(model_dir="m", guidance_scale_end=1.0,
                             guidance_interval=(-5.0, 2.0), guidance_rescale=0.7,
                             resample_steps=2)
  assert guided.record(is_sr=False) == {
      "method": "ddpm", "num_steps": 256, "guidance_scale": 5.0, "thresholding": "dynamic",
      "percentile": 99.5, "guidance_scale_end": 1.0, "guidance_interval": [-5.0, 2.0],
      "guidance_rescale": 0.7, "resample_steps": 2}
  for bad in (dict(guidance_interval=(2.0, 1.0)), dict(guidance_rescale=1.5),
              dict(resample_steps=2, sampler="ddim"), dict(guidance_scale_end=-1.0)):
    with pytest.raises(UserError, match="Stage."):
      cascade_lib.Stage(model_dir="m", **bad)
