"""The shapes grammar and renderer (issue 4): the fixed grammar tests and ShapesBench use."""

import collections
import itertools

import numpy as np
import pytest

from imagen_jax.data import shapes
from imagen_jax.errors import UserError

N_SCENES = 3000


@pytest.fixture(scope="module")
def train_scenes():
  return [shapes.sample_scene(7, i) for i in range(N_SCENES)]


@pytest.fixture(scope="module")
def held_out_scenes():
  return [shapes.sample_scene(7, i, "held_out") for i in range(500)]


def test_palette_and_vocabulary_are_the_fixed_grammar():
  assert shapes.COLORS == {
      "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 215, 30),
      "green": (30, 165, 60), "blue": (30, 70, 225), "purple": (140, 50, 190)}
  assert shapes.SHAPES == ("circle", "square", "triangle")
  assert set(shapes.RELATIONS) == {"to the left of", "to the right of", "above", "below"}


def test_caption_sets_partition_the_grammar():
  train, held = shapes.all_captions("train"), shapes.all_captions("held_out")
  assert len(train) == len(set(train)) == 18 + 1008
  assert len(held) == len(set(held)) == 72
  assert not set(train) & set(held)
  # 18 objects x 4 relations x 15 partners of another colour = 1080 two-object captions.
  assert len(train) + len(held) == 18 + 18 * 4 * 15
  assert all(shapes.is_held_out(c) for c in held)
  assert not any(shapes.is_held_out(c) for c in train)
  # Held out: 5-10% of the two-object captions.
  assert 0.05 <= len(held) / 1080 <= 0.10


def test_every_caption_parses_and_round_trips():
  for caption in shapes.all_captions("train") + shapes.all_captions("held_out"):
    parsed = shapes.parse_caption(caption)
    assert shapes.format_caption(parsed) == caption
    assert caption.startswith("a ")
  assert shapes.parse_caption("a orange circle") == ((("orange", "circle"),), None)
  assert shapes.parse_caption("  A Red  square above a blue circle ") == (
      (("red", "square"), ("blue", "circle")), "above")


@pytest.mark.parametrize("caption", [
    "an orange circle",                      # the article is always "a"
    "a pink circle",                         # not in the palette
    "a red hexagon",
    "a red circle above a red square",       # two objects need different colours
    "a red circle on top of a blue square",  # not a relation of the grammar
    "a red circle above",
    "",
])
def test_captions_outside_the_grammar_are_user_errors(caption):
  with pytest.raises(UserError, match="not in the shapes grammar"):
    shapes.parse_caption(caption)


def test_training_split_keeps_every_word_and_every_object():
  train = [shapes.parse_caption(c) for c in shapes.all_captions("train")]
  singles = {p.objects[0] for p in train if p.relation is None}
  assert singles == {(c, s) for c in shapes.COLORS for s in shapes.SHAPES}
  assert {p.relation for p in train} - {None} == set(shapes.RELATIONS)
  partners = collections.defaultdict(set)
  for p in train:
    if p.relation is not None:
      a, b = p.objects
      partners[a].add(b)
      partners[b].add(a)
  # Every object meets 14 of its 15 possible partners in training; the 15th is held out.
  assert all(len(partners[o]) == 14 for o in singles)
  held_objects = [o for pair in shapes.HELD_OUT for o in pair]
  assert sorted(held_objects) == sorted(singles)  # each object in exactly one pair


def test_sampling_is_deterministic_from_seed_and_index():
  a = shapes.sample_scene(3, 11)
  assert a == shapes.sample_scene(3, 11)
  np.testing.assert_array_equal(shapes.render(a, 32), shapes.render(shapes.sample_scene(3, 11), 32))
  others = {shapes.sample_scene(3, i).caption for i in range(20)}
  assert len(others) > 15
  assert shapes.sample_scene(4, 11) != a


def test_one_and_two_object_mix(train_scenes):
  one = sum(s.relation is None for s in train_scenes) / len(train_scenes)
  # Binomial std at n=3000 is 0.009: 0.4 +- 0.035 is about 4 sigma.
  assert abs(one - 0.4) < 0.035
  counts = collections.Counter(s.caption for s in train_scenes)
  assert len(counts) > 800  # covers the caption set, not a handful


def test_held_out_never_sampled_in_train(train_scenes, held_out_scenes):
  assert not any(shapes.is_held_out(s.caption) for s in train_scenes)
  assert all(shapes.is_held_out(s.caption) for s in held_out_scenes)
  assert len({s.caption for s in held_out_scenes}) == 72


def _check_layout(scene):
  parsed = shapes.parse_caption(scene.caption)
  assert [(o.color, o.shape) for o in scene.objects] == list(parsed.objects)
  assert scene.relation == parsed.relation
  for o in scene.objects:  # inside the canvas
    assert o.size / 2 <= o.cx <= 1 - o.size / 2 and o.size / 2 <= o.cy <= 1 - o.size / 2
  if scene.relation is None:
    assert 0.35 <= scene.objects[0].size <= 0.55
    return
  a, b = scene.objects
  assert 0.25 <= a.size <= 0.40 and 0.25 <= b.size <= 0.40
  if scene.relation in ("to the left of", "to the right of"):
    main, cross = (lambda o: o.cx), (lambda o: o.cy)
  else:
    main, cross = (lambda o: o.cy), (lambda o: o.cx)
  low, high = (a, b) if scene.relation in ("to the left of", "above") else (b, a)
  eps = 1e-9
  assert main(low) + low.size / 2 <= 0.5 + eps  # entirely in the low half
  assert main(high) - high.size / 2 >= 0.5 - eps  # entirely in the high half
  d_main, d_cross = abs(main(a) - main(b)), abs(cross(a) - cross(b))
  assert d_cross <= shapes.MAX_CROSS_OFFSET * d_main + eps


def test_sizes_and_halves_as_specified(train_scenes, held_out_scenes):
  for scene in train_scenes + held_out_scenes:
    _check_layout(scene)


def test_objects_never_overlap_in_pixels(train_scenes):
  two = [s for s in train_scenes if s.relation is not None][:200]
  for scene in two:
    masks = []
    for o in scene.objects:
      full = np.zeros((64, 64), np.float32)
      alpha, (y0, y1, x0, x1) = shapes.coverage(o.shape, o.cx, o.cy, o.size, 64)
      full[y0:y1, x0:x1] = alpha
      masks.append(full)
    assert float((masks[0] * masks[1]).sum()) == 0.0


@pytest.mark.parametrize("shape,area", [("square", 1.0), ("circle", np.pi / 4),
                                        ("triangle", 0.5)])
def test_coverage_area_matches_the_geometry(shape, area):
  # An object of side 0.4 at 64 px: its anti-aliased area is the analytic area.
  alpha, _ = shapes.coverage(shape, 0.503, 0.487, 0.4, 64)
  assert alpha.min() >= 0 and alpha.max() <= 1
  assert alpha.sum() / 64**2 == pytest.approx(area * 0.16, rel=0.01)
  # Anti-aliased: edge pixels are partly covered.
  assert ((alpha > 0) & (alpha < 1)).any()


def test_triangle_points_up():
  alpha, _ = shapes.coverage("triangle", 0.5, 0.5, 0.5, 64)
  rows = alpha.sum(axis=1)
  assert rows[0] < rows[len(rows) // 2] < rows[-1]  # narrow at the top, wide at the base


def test_render_colours_and_background():
  scene = shapes.Scene("a blue square", (shapes.SceneObject("blue", "square", 0.5, 0.5, 0.5),),
                       None)
  image = shapes.render(scene, 32)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[16, 16], shapes.COLORS["blue"])
  np.testing.assert_array_equal(image[0, 0], (255, 255, 255))
  # Every pixel is a blend of white and blue (anti-aliasing mixes only with the background).
  white, blue = np.array([255.0] * 3), np.array(shapes.COLORS["blue"], float)
  t = ((white - image) @ (white - blue)) / ((white - blue) @ (white - blue))
  recon = white + t[..., None] * (blue - white)
  assert np.abs(recon - image).max() <= 1.0


@pytest.mark.parametrize("resolution", [8, 17, 64, 128])
def test_render_any_resolution(resolution):
  scene = shapes.sample_scene(0, 5)
  image = shapes.render(scene, resolution)
  assert image.shape == (resolution, resolution, 3)
  assert (image != 255).any()


def test_bad_arguments_are_user_errors():
  with pytest.raises(UserError, match="split"):
    shapes.sample_scene(0, 0, "test")
  with pytest.raises(UserError, match="seed"):
    shapes.sample_scene(-1, 0)
  with pytest.raises(UserError, match="index"):
    shapes.sample_scene(0, 1.5)
  with pytest.raises(UserError, match="resolution"):
    shapes.render(shapes.sample_scene(0, 0), 0)
  with pytest.raises(UserError, match="split"):
    shapes.all_captions("validation")


def test_render_caption_uses_the_given_caption():
  for caption in itertools.islice(shapes.all_captions("held_out"), 5):
    image = shapes.render_caption(caption, 16, seed=1, index=2)
    assert image.shape == (16, 16, 3)
  with pytest.raises(UserError):
    shapes.render_caption("a red cube", 16)


def test_caption_variants_and_mean_render():
  caption = "a red circle to the left of a blue square"
  assert shapes.swap_objects(caption) == "a blue square to the left of a red circle"
  assert shapes.other_axis(caption) == "a red circle above a blue square"
  assert shapes.other_axis(shapes.other_axis(caption)) == caption
  assert shapes.swap_objects("a red circle") == "a red circle"
  with pytest.raises(UserError, match="relation"):
    shapes.other_axis("a red circle")
  # The mean of renders keeps the layout: red on the left half, blue on the right half.
  mean = shapes.mean_render(caption, 16, n=16)
  assert mean.shape == (16, 16, 3) and mean.dtype == np.float32
  assert mean.min() >= -1 and mean.max() <= 1
  left, right = mean[:, :8], mean[:, 8:]
  redness = lambda x: float((x[..., 0] - x[..., 2]).mean())  # red minus blue channel
  assert redness(left) > 0.1 and redness(right) < -0.1
