"""ShapesBench (issue 8): the checker on ground-truth renders, negatives, and the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from imagen_jax.cli import eval as eval_cli
from imagen_jax.data import shapes
from imagen_jax.errors import UserError
from imagen_jax.eval import shapesbench

FLIP = {"to the left of": "to the right of", "to the right of": "to the left of",
        "above": "below", "below": "above"}
N_SCENES = 200  # per resolution: 160 from the training split, 40 held out


def _scenes(n, seed):
  return [shapes.sample_scene(seed, i, "held_out" if i % 5 == 0 else "train")
          for i in range(n)]


def _accuracy(results):
  out = {}
  for key in ("color", "shape", "relation", "overall"):
    values = [r[key] for r in results if r[key] is not None]
    out[key] = sum(values) / len(values)
  return out


@pytest.fixture(scope="module")
def renders_16():
  return [(shapes.render(s, 16), s) for s in _scenes(N_SCENES, seed=11)]


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_ground_truth_renders_score_at_least_98_percent(resolution, renders_16):
  if resolution == 16:
    cases = renders_16
  else:
    cases = [(shapes.render(s, resolution), s) for s in _scenes(N_SCENES, seed=resolution)]
  results = [shapesbench.check_image(image, s.caption) for image, s in cases]
  accuracy = _accuracy(results)
  assert all(v >= 0.98 for v in accuracy.values()), accuracy
  assert all(r["relation"] is None for r, (_, s) in zip(results, cases) if s.relation is None)


def test_blurred_noisy_renders_still_score_high():
  # A mild stand-in for blurry diffusion samples: Gaussian blur 0.5 px and noise sigma 8.
  from scipy import ndimage
  rng = np.random.default_rng(0)
  results = []
  for scene in _scenes(60, seed=5):
    x = ndimage.gaussian_filter(shapes.render(scene, 16).astype(float), (0.5, 0.5, 0))
    x = np.clip(np.rint(x + rng.normal(0, 8, x.shape)), 0, 255).astype(np.uint8)
    results.append(shapesbench.check_image(x, scene.caption))
  accuracy = _accuracy(results)
  assert all(v >= 0.95 for v in accuracy.values()), accuracy


def test_flipped_relation_fails(renders_16):
  results = []
  for image, scene in renders_16:
    if scene.relation is not None:
      parsed = shapes.parse_caption(scene.caption)
      flipped = shapes.format_caption(parsed._replace(relation=FLIP[scene.relation]))
      results.append(shapesbench.check_image(image, flipped))
  assert len(results) > 60
  assert sum(r["relation"] for r in results) / len(results) <= 0.02
  # Diagnosed as the roles swapped, not as a wrong axis or a missing object.
  assert sum(r["relation_outcome"] == "reversed" for r in results) / len(results) >= 0.98
  assert sum(r["overall"] for r in results) / len(results) <= 0.02
  # Colours and shapes are still right: only the relation is wrong.
  assert sum(r["color"] and r["shape"] for r in results) / len(results) >= 0.98


@pytest.mark.parametrize("resolution", [16, 64])
def test_pure_noise_scores_near_zero(resolution):
  rng = np.random.default_rng(resolution)
  results = [shapesbench.check_image(rng.integers(0, 256, (resolution, resolution, 3),
                                                  dtype=np.uint8), s.caption)
             for s in _scenes(40, seed=3)]
  for key in ("color", "shape", "relation", "overall"):
    assert sum(bool(r[key]) for r in results) / len(results) <= 0.05, key
  outcomes = [r["relation_outcome"] for r in results if r["relation_outcome"] is not None]
  assert len(outcomes) > 10 and outcomes.count("not_found") / len(outcomes) >= 0.9


def test_wrong_or_swapped_colours_fail(renders_16):
  wrong, swapped = [], []
  for image, scene in renders_16[:60]:
    parsed = shapes.parse_caption(scene.caption)
    absent = next(c for c in shapes.COLORS if c not in {c for c, _ in parsed.objects})
    objects = ((absent, parsed.objects[0][1]),) + parsed.objects[1:]
    wrong.append(shapesbench.check_image(image, shapes.format_caption(
        parsed._replace(objects=objects)))["color"])
    if parsed.relation is not None:  # colours exchanged between the two objects
      (c1, s1), (c2, s2) = parsed.objects
      swapped.append(shapesbench.check_image(image, shapes.format_caption(
          parsed._replace(objects=((c2, s1), (c1, s2)))))["overall"])
  assert not any(wrong)
  assert len(swapped) > 20 and not any(swapped)


@pytest.mark.parametrize("true_shape,caption", [("circle", "a red square"),
                                                ("square", "a blue triangle"),
                                                ("triangle", "a green circle")])
def test_wrong_shape_fails(true_shape, caption):
  color = caption.split()[1]
  scene = shapes.Scene(f"a {color} {true_shape}",
                       (shapes.SceneObject(color, true_shape, 0.45, 0.55, 0.4),), None)
  for resolution in (16, 64):
    image = shapes.render(scene, resolution)
    assert shapesbench.check_image(image, scene.caption)["shape"]
    result = shapesbench.check_image(image, caption)
    assert result["color"] and not result["shape"] and not result["overall"]


def test_white_image_and_extra_colour():
  white = np.full((16, 16, 3), 255, np.uint8)
  result = shapesbench.check_image(white, "a red circle above a blue square")
  assert not result["color"] and not result["shape"] and result["relation"] is False
  # A third, unnamed object as large as the named one breaks colour dominance.
  scene = shapes.Scene("a red square", (
      shapes.SceneObject("red", "square", 0.25, 0.5, 0.4),
      shapes.SceneObject("green", "square", 0.75, 0.5, 0.4)), None)
  assert not shapesbench.check_image(shapes.render(scene, 32), "a red square")["color"]


def test_check_image_bad_input():
  with pytest.raises(UserError, match="not in the shapes grammar"):
    shapesbench.check_image(np.zeros((16, 16, 3), np.uint8), "a cat")
  with pytest.raises(UserError, match="square RGB"):
    shapesbench.check_image(np.zeros((16, 8, 3), np.uint8), "a red circle")
  with pytest.raises(UserError, match="uint8"):
    shapesbench.check_image(np.zeros((16, 16, 3), np.float32), "a red circle")


def _write_samples(directory):
  """A tiny imagen-sample layout: two stages, train and held-out prompts, one stray prompt."""
  prompts = ["a red circle above a blue square",      # train
             "a red circle to the left of a green square",  # held out
             "a orange triangle",                     # train
             "a photo of a cat"]                      # outside the grammar
  rows = []
  for stage, resolution in ((0, 16), (1, 64)):
    (directory / f"stage{stage}").mkdir(parents=True)
    for i, prompt in enumerate(prompts):
      if i == 3:
        image = np.full((resolution, resolution, 3), 128, np.uint8)
      elif i == 0 and stage == 0:  # a wrong sample: the relation is flipped
        image = shapes.render_caption("a red circle below a blue square", resolution, 0, i)
      else:
        image = shapes.render_caption(prompt, resolution, seed=0, index=i)
      name = f"stage{stage}/{i:05d}_0.png"
      Image.fromarray(image).save(directory / name)
      rows.append({"prompt": prompt, "prompt_index": i, "seed": 0, "sample": 0,
                   "stage": stage, "file": name, "sampler": {"method": "ddim"}})
  (directory / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_dir_groups_by_stage_and_split(tmp_path):
  _write_samples(tmp_path)
  results = shapesbench.evaluate_dir(tmp_path, progress=False)
  assert results["n_scored"] == 6 and results["n_skipped"] == 2
  assert results["skipped_prompts"] == ["a photo of a cat"]
  base, sr = results["stages"]["0"], results["stages"]["1"]
  assert base["train"]["n"] == 2 and base["held_out"]["n"] == 1
  assert base["train"]["relation"] == 0.0 and base["train"]["n_relation"] == 1
  assert base["train"]["relation_outcomes"] == {"ok": 0, "reversed": 1,
                                                "wrong_axis_or_close": 0, "not_found": 0}
  assert sr["train"]["relation_outcomes"]["ok"] == 1
  assert base["train"]["color"] == 1.0 and base["train"]["overall"] == 0.5
  assert sr["train"]["overall"] == 1.0 and sr["held_out"]["overall"] == 1.0
  assert sr["resolution"] == [64]
  written = json.loads((tmp_path / "shapesbench.json").read_text())
  assert written["stages"] == json.loads(json.dumps(results["stages"]))
  table = shapesbench.format_table(results)
  assert "stage 0" in table and "stage 1" in table and "held_out" in table
  assert "skipped 2" in table
  assert "train relations: 0 ok, 1 reversed, 0 wrong axis or too close" in table


def test_cli_end_to_end(tmp_path, capsys):
  _write_samples(tmp_path)
  (tmp_path / "shapesbench.json").unlink(missing_ok=True)
  assert eval_cli.main(["shapesbench", f"--samples={tmp_path}", "--no_progress"]) == 0
  out = capsys.readouterr().out
  assert "ShapesBench, stage 0 (16px)" in out and "train" in out
  assert (tmp_path / "shapesbench.json").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
  assert eval_cli.main(["shapesbench", f"--samples={tmp_path / 'nope'}"]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert eval_cli.main(["shapesbench", f"--samples={tmp_path}"]) == 2
  assert "index.jsonl" in capsys.readouterr().err
  (tmp_path / "index.jsonl").write_text("\n")
  assert eval_cli.main(["shapesbench", f"--samples={tmp_path}"]) == 2
  assert "empty" in capsys.readouterr().err
  (tmp_path / "index.jsonl").write_text(json.dumps(
      {"prompt": "a red circle", "stage": 0, "file": "missing.png"}) + "\n")
  assert eval_cli.main(["shapesbench", f"--samples={tmp_path}"]) == 2
  assert "cannot read image" in capsys.readouterr().err
  (tmp_path / "bad.png").write_bytes(b"not a png")
  (tmp_path / "index.jsonl").write_text(json.dumps(
      {"prompt": "a red circle", "stage": 0, "file": "bad.png"}) + "\n")
  assert eval_cli.main(["shapesbench", f"--samples={tmp_path}"]) == 2
  assert "cannot read image" in capsys.readouterr().err
