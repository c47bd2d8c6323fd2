"""Preprocessing: antialiased resize, centre crop, SR crops, flips, colour modes."""

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import preprocess
from imagen_jax.errors import UserError


def test_downsampling_is_antialiased():
  # A one-pixel checkerboard has no content below Nyquist: an antialiased 4x reduction is
  # flat mid-grey; striding or nearest-neighbour would give pure black or white.
  board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
  board = np.repeat(board[..., None], 3, axis=-1)
  out = preprocess.resize_center_crop(board, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - 127.5).max() <= 3
  np.testing.assert_array_equal(preprocess.downsample(board, 16), out)


def test_center_crop_keeps_the_middle_square():
  # Landscape 40x80: red margins of 20 columns on each side, a green 40x40 centre.
  image = np.zeros((40, 80, 3), np.uint8)
  image[:] = (255, 0, 0)
  image[:, 20:60] = (0, 255, 0)
  out = preprocess.resize_center_crop(image, 10)
  np.testing.assert_array_equal(out, np.broadcast_to(np.array([0, 255, 0], np.uint8),
                                                     (10, 10, 3)))
  portrait = np.ascontiguousarray(image.transpose(1, 0, 2))
  np.testing.assert_array_equal(preprocess.resize_center_crop(portrait, 10), out)
  same = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)
  np.testing.assert_array_equal(preprocess.resize_center_crop(same, 10), same)


def test_jpeg_draft_decoding_matches_full_decoding_closely(tmp_path):
  x = np.linspace(0, 255, 256)
  image = np.stack(np.broadcast_arrays(x[None, :], x[:, None], 128 + 0 * x[None, :]),
                   -1).astype(np.uint8)
  path = tmp_path / "big.jpg"
  Image.fromarray(image).save(path, quality=95)
  fast = preprocess.resize_center_crop(Image.open(path), 32)  # DCT-domain shrink
  slow = preprocess.resize_center_crop(np.asarray(Image.open(path)), 32)
  assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2.0


def test_colour_modes_become_rgb():
  gray = np.full((4, 4), 200, np.uint8)
  np.testing.assert_array_equal(preprocess.to_rgb_uint8(gray), np.full((4, 4, 3), 200))
  rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white background
  np.testing.assert_array_equal(preprocess.to_rgb_uint8(rgba), np.full((4, 4, 3), 255))
  with pytest.raises(UserError, match="float32"):
    preprocess.to_rgb_uint8(np.zeros((4, 4, 3), np.float32))


def test_sr_crop_windows_match():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  lowres = preprocess.downsample(image, 16)
  corners = set()
  for seed in range(20):
    crop, low = preprocess.sr_crop(image, lowres, 32, np.random.default_rng(seed))
    assert crop.shape == (32, 32, 3) and low.shape == (8, 8, 3)
    ys, xs = np.nonzero([[np.array_equal(crop, image[y:y + 32, x:x + 32])
                          for x in range(0, 33, 4)] for y in range(0, 33, 4)])
    y, x = 4 * int(ys[0]), 4 * int(xs[0])
    np.testing.assert_array_equal(low, lowres[y // 4:y // 4 + 8, x // 4:x // 4 + 8])
    corners.add((y, x))
  assert len(corners) > 5


def test_check_sr_sizes():
  preprocess.check_sr_sizes(64, 16, 32)
  preprocess.check_sr_sizes(256, 64, None)
  preprocess.check_sr_sizes(100, 30, None)  # any ratio without crops
  with pytest.raises(UserError, match="integer ratio"):
    preprocess.check_sr_sizes(100, 30, 50)
  with pytest.raises(UserError, match="set lowres_size"):
    preprocess.check_sr_sizes(64, None, 32)
  with pytest.raises(UserError, match=r"crop_size=128 must be in \(0, image_size=64\]"):
    preprocess.check_sr_sizes(64, 16, 128)


def test_swap_left_right_whole_words_only():
  assert preprocess.swap_left_right("a red circle to the left of a blue square") == \
      "a red circle to the right of a blue square"
  assert preprocess.swap_left_right("right left bright leftover") == "left right bright leftover"
