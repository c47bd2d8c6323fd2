"""The COCO caption draw and the guidance sweep's loop, table and plot."""

import json

import numpy as np
import pytest

from imagen_jax.errors import UserError
from imagen_jax.eval import coco, sweep
from imagen_jax.sample import output


def _annotations(tmp_path, n=50, shuffle_seed=0):
  rows = [{"id": 1000 + i, "image_id": i // 5, "caption": f"  a photo\nnumber {i} "}
          for i in range(n)]
  np.random.default_rng(shuffle_seed).shuffle(rows)
  images = [{"id": j, "file_name": f"COCO_val2014_{j:012d}.jpg"} for j in range(n // 5)]
  path = tmp_path / f"captions_{shuffle_seed}.json"
  path.write_text(json.dumps({"images": images, "annotations": rows}))
  return path


def test_draw_is_a_pure_function_of_file_num_and_seed(tmp_path):
  a = coco.read_captions(_annotations(tmp_path, shuffle_seed=0))
  b = coco.read_captions(_annotations(tmp_path, shuffle_seed=1))  # same rows, other order
  drawn = coco.draw_captions(a, 20, seed=3)
  assert drawn == coco.draw_captions(b, 20, seed=3)
  assert drawn != coco.draw_captions(a, 20, seed=4)
  assert len({row.annotation_id for row in drawn}) == 20  # without replacement
  assert all(row.caption.startswith("a photo number") for row in drawn)  # whitespace folded
  assert drawn[0].file_name == f"COCO_val2014_{drawn[0].image_id:012d}.jpg"


def test_written_prompts_read_back_in_order(tmp_path):
  drawn = coco.draw_captions(coco.read_captions(_annotations(tmp_path)), 7, seed=0)
  coco.write_prompts(tmp_path / "coco.txt", drawn)
  assert output.read_prompts(tmp_path / "coco.txt") == [row.caption for row in drawn]
  meta = json.loads((tmp_path / "coco.txt.json").read_text())
  assert [m["annotation_id"] for m in meta] == [row.annotation_id for row in drawn]


def test_bad_annotation_files(tmp_path):
  with pytest.raises(UserError, match="missing"):
    coco.read_captions(tmp_path / "nope.json")
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"annotations": []}))
  with pytest.raises(UserError, match="not a COCO captions file"):
    coco.read_captions(bad)
  captions = coco.read_captions(_annotations(tmp_path, n=10))
  with pytest.raises(UserError, match="--num=11"):
    coco.draw_captions(captions, 11)


def test_sweep_resumes_and_reports(tmp_path):
  calls = []

  def sample(w, directory):
    calls.append(w)
    directory.mkdir(parents=True, exist_ok=True)

  def evaluate(directory):
    w = float(directory.name[1:])
    return 30.0 / (1 + w), 20.0 + w  # a made-up Pareto front

  points = sweep.run_sweep([1.0, 3.0, 7.5], sample, evaluate, tmp_path)
  assert calls == [1.0, 3.0, 7.5]
  again = sweep.run_sweep([1.0, 3.0, 7.5], sample, evaluate, tmp_path)
  assert calls == [1.0, 3.0, 7.5] and again == points  # all three read back
  sweep.write_report(points, tmp_path)
  assert "| 7.5 | 3.53 | 27.50 |" in (tmp_path / "sweep.md").read_text()
  image = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "fid_vs_clip.png"))
  red = (image[..., 0] > 150) & (image[..., 1] < 80) & (image[..., 2] < 80)
  ys, xs = np.nonzero(red)
  # The highest-FID point (w=1) is drawn left of and above the lowest (w=7.5).
  assert xs.min() < 150 and xs.max() > 450 and red.sum() > 3 * 30
  assert ys[xs < xs.min() + 10].mean() < ys[xs > xs.max() - 10].mean() - 200


def test_parse_weights():
  assert sweep.parse_weights("1,3, 5.5") == [1.0, 3.0, 5.5]
  for bad in ("", "1,x", "-1", "2,2"):
    with pytest.raises(UserError, match="--guidance"):
      sweep.parse_weights(bad)
