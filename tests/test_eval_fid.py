"""FID: the InceptionV3 of pytorch-fid (structure, weight loading, resize, pools), the
Fréchet distance against closed forms, image sets, and `imagen-eval fid`.

The network here is narrow (width 1/8: same structure, fewer channels) so that it runs in
seconds; benchmarks/fid_parity.py checks the full network against pytorch-fid itself.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import torch_files
from imagen_jax.cli import eval as eval_cli
from imagen_jax.errors import UserError
from imagen_jax.eval import fid, images, inception
from imagen_jax.sample import output

WIDTH = 0.125


def _random_state_dict(width: float, seed: int = 0) -> dict[str, np.ndarray]:
  """pytorch-fid's keys and shapes (at `width`) with random weights and BN statistics,
  plus the keys the network ignores (fc, num_batches_tracked)."""
  rng = np.random.default_rng(seed)
  model = nnx.eval_shape(lambda: inception.InceptionV3(width=width, rngs=nnx.Rngs(0)))
  tensors = {}
  for key, shape in inception.torch_shapes(model).items():
    if key.endswith("conv.weight"):
      value = rng.normal(size=shape) * (2.0 / np.prod(shape[1:])) ** 0.5
    elif key.endswith("running_var"):
      value = rng.uniform(0.5, 2.0, size=shape)
    elif key.endswith("bn.weight"):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:
      value = rng.normal(size=shape) * 0.2
    tensors[key] = value.astype(np.float32)
  tensors["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0, np.int64)
  tensors["fc.weight"] = np.zeros((1008, model.feature_dim), np.float32)
  return tensors


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  tensors = _random_state_dict(WIDTH)
  file = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
  file.write_bytes(torch_files.zip_bytes(torch_files.state_dict(tensors)))
  return file, tensors


@pytest.fixture(scope="module")
def extractor(weights_file):
  return fid.FeatureExtractor(inception.load_inception(weights_file[0]), batch_size=8)


def _photos(n: int, size: int, seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  base = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.2, 1.0, (n, 1, 1, 1, 3))
  noise = rng.integers(0, 60, (n, size, size, 3))
  return list(np.clip(base[:, 0] + noise, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------
# The network.


def test_full_network_matches_pytorch_fid_layout():
  model = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
  shapes = inception.torch_shapes(model)
  assert model.feature_dim == 2048
  # torchvision documents 27,161,264 parameters for InceptionV3 with its AuxLogits
  # (3,326,696) and 1000-class fc (2,049,000); what is left is the conv weights and the
  # BatchNorm scales and shifts that pool3 uses.
  learned = sum(int(np.prod(s)) for k, s in shapes.items() if "running" not in k)
  assert learned == 27_161_264 - 3_326_696 - 2_049_000
  assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
  assert not model.Mixed_7b.max_pool and model.Mixed_7c.max_pool
  for prefix, layer in inception.conv_layers(model).items():
    assert rules_names(layer.conv.kernel) == ("conv_height", "conv_width", "conv_in",
                                              "conv_out"), prefix
    assert rules_names(layer.conv.bias) == ("conv_out",), prefix


def rules_names(variable):
  from imagen_jax.parallel import rules
  return rules.variable_logical_axes(variable)


def test_loading_folds_batch_norm_into_the_convolution(weights_file):
  """The first layer against conv -> BatchNorm(eps 0.001) -> ReLU written out in numpy."""
  file, tensors = weights_file
  model = inception.load_inception(file)
  x = np.random.default_rng(1).normal(size=(1, 9, 9, 3)).astype(np.float32)
  got = np.asarray(model.Conv2d_1a_3x3(jnp.asarray(x)))
  w = tensors["Conv2d_1a_3x3.conv.weight"].astype(np.float64)  # [out, in, 3, 3]
  conv = np.zeros((1, 4, 4, w.shape[0]))
  for i in range(4):
    for j in range(4):
      patch = x[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]  # stride 2, no padding
      conv[0, i, j] = np.einsum("hwc,ochw->o", patch, w)
  bn = lambda name: tensors[f"Conv2d_1a_3x3.bn.{name}"].astype(np.float64)  # noqa: E731
  want = (conv - bn("running_mean")) / np.sqrt(bn("running_var") + 1e-3) * bn("weight")
  want = np.maximum(want + bn("bias"), 0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_wrong_weights_are_one_clear_line(tmp_path, weights_file):
  tensors = dict(weights_file[1])
  tensors["Mixed_6a.branch3x3.conv.weight"] = np.zeros((5, 5, 3, 3), np.float32)
  with pytest.raises(UserError, match="Mixed_6a.branch3x3.conv.weight.*has shape"):
    inception.inception_from_state_dict(tensors)
  with pytest.raises(UserError, match="not pytorch-fid's FID Inception"):
    inception.inception_from_state_dict({"fc.weight": np.zeros((2, 2))})


def test_resize_is_torch_bilinear_without_antialias():
  rng = np.random.default_rng(0)
  # Upsampling: as jax.image.resize's bilinear without antialiasing (half-pixel centres,
  # edges clamped), which is what torch does there.
  small = rng.normal(size=(1, 7, 5, 2)).astype(np.float32)
  np.testing.assert_allclose(
      inception.resize_bilinear(jnp.asarray(small), 19),
      jax.image.resize(small, (1, 19, 19, 2), "bilinear", antialias=False), atol=1e-5)
  # Halving: torch samples between pixel pairs, so each output is a 2x2 mean (an
  # antialiased resize would blur wider).
  big = rng.normal(size=(1, 8, 8, 1)).astype(np.float32)
  want = big.reshape(1, 4, 2, 4, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(inception.resize_bilinear(jnp.asarray(big), 4), want,
                             atol=1e-6)
  # Shrinking by 3/2: output i samples source (i + 0.5) * 1.5 - 0.5 (ATen's formula):
  # 1.75 for i = 1, 4.75 for i = 3.
  matrix = inception.bilinear_matrix(6, 4)
  np.testing.assert_allclose(matrix[1], [0, 0.25, 0.75, 0, 0, 0])
  np.testing.assert_allclose(matrix[3], [0, 0, 0, 0, 0.25, 0.75])


def test_average_pool_ignores_padding_and_max_pool_pads_with_minus_infinity():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1) - 20.0
  avg = np.asarray(inception._avg_pool_3x3_exclude_pad(x))[0, :, :, 0]
  assert avg[0, 0] == pytest.approx(np.mean([-20, -19, -16, -15]))  # 4 pixels, not 9
  assert avg[1, 1] == pytest.approx(np.mean(np.asarray(x)[0, :3, :3, 0]))
  top = np.asarray(inception._max_pool_3x3(x, 1, 1))[0, :, :, 0]
  assert top[0, 0] == -15.0  # a zero padding would give 0


# ---------------------------------------------------------------------------------------
# Features and statistics.


def test_padding_a_batch_never_changes_a_feature(extractor):
  photos = _photos(11, 24, seed=2)
  assert extractor.batch_size == 8
  alone = extractor(photos[:3], progress=False)      # 5 padded rows
  together = extractor(photos)                         # 8 + 3 (5 padded rows)
  np.testing.assert_allclose(alone, together[:3], rtol=1e-5, atol=1e-6)
  assert alone.shape == (3, extractor.feature_dim) and np.isfinite(together).all()
  assert np.abs(together[3] - together[4]).max() > 1e-4  # features depend on the image
  with pytest.raises(UserError, match="different sizes"):
    extractor(photos[:8] + _photos(1, 32, seed=3), progress=False)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want)


def test_frechet_distance_of_full_covariances():
  """Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), computed with eigh."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
  s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)

  def sqrt_psd(m):
    values, vectors = np.linalg.eigh(m)
    return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T

  root1 = sqrt_psd(s1)
  want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * np.trace(sqrt_psd(root1 @ s2 @ root1)))
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_a_set_against_itself_is_zero_and_statistics_round_trip(tmp_path):
  features = np.random.default_rng(2).normal(size=(40, 8)) * [1, 2, 3, 4, 5, 6, 7, 8]
  mu, sigma = fid.feature_statistics(features)
  np.testing.assert_allclose(sigma, np.cov(features.T))  # unbiased, as pytorch-fid
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  fid.save_statistics(tmp_path / "s.npz", mu, sigma)
  with np.load(tmp_path / "s.npz") as f:  # the file pytorch-fid reads
    np.testing.assert_array_equal(f["mu"], mu)
  mu2, sigma2 = fid.load_statistics(tmp_path / "s.npz")
  np.testing.assert_array_equal(sigma2, sigma)
  with pytest.raises(UserError, match="different dimensions"):
    fid.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
  with pytest.raises(UserError, match="at least 2 images"):
    fid.feature_statistics(features[:1])


# ---------------------------------------------------------------------------------------
# Image sets.


def _write_folder(path, photos):
  for i, photo in enumerate(photos):
    sub = path / ("nested" if i % 2 else "")
    sub.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).save(sub / f"{i:02d}.png")
  return path


def _write_sample_dir(path, photos):
  writer = output.IndexWriter(path)
  for stage, size in ((0, 8), (1, photos[0].shape[0])):
    for i, photo in enumerate(photos):
      image = photo if stage else photo[:size, :size]
      output.write_png(path / output.image_file(stage, i, 0), image)
      writer.add([{"prompt": f"p{i}", "prompt_index": i, "sample": 0, "seed": 0,
                   "stage": stage, "file": output.image_file(stage, i, 0)}])
  return path


def test_image_sets(tmp_path):
  photos = _photos(4, 16, seed=4)
  folder, _ = images.load_image_set(_write_folder(tmp_path / "f", photos))
  assert [f.name for f in folder.files] == ["00.png", "02.png", "01.png", "03.png"]
  np.testing.assert_array_equal(folder[2], photos[1])
  sampled = _write_sample_dir(tmp_path / "s", photos)
  last, prompts = images.load_image_set(sampled)
  assert prompts == ["p0", "p1", "p2", "p3"] and last[3].shape == (16, 16, 3)
  first, _ = images.load_image_set(sampled, stage=0)
  assert first[0].shape == (8, 8, 3)
  with pytest.raises(UserError, match="has stages"):
    images.load_image_set(sampled, stage=5)
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="holds no images"):
    images.load_image_set(tmp_path / "empty")


# ---------------------------------------------------------------------------------------
# imagen-eval fid.


def test_fid_command(tmp_path, capsys, weights_file, extractor):
  samples = _write_sample_dir(tmp_path / "samples", _photos(5, 24, seed=5))
  reference = _write_folder(tmp_path / "ref", _photos(6, 24, seed=6))
  stats = tmp_path / "samples.npz"
  assert eval_cli.main(["fid", f"--samples={samples}", f"--reference={reference}",
                        f"--weights={weights_file[0]}", f"--save_stats={stats}",
                        "--batch_size=8", "--json", "--no_progress"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["n_samples"] == 5 and result["n_reference"] == 6
  # The same figure from the library, with the extractor of the fixture.
  want = fid.frechet_distance(*fid.statistics_of(samples, extractor, progress=False)[0],
                              *fid.statistics_of(reference, extractor, progress=False)[0])
  assert result["fid"] == pytest.approx(want, rel=1e-4) and result["fid"] > 0
  # Statistics against statistics need no network.
  assert eval_cli.main(["fid", f"--samples={stats}", f"--reference={stats}", "--json"]) == 0
  assert abs(json.loads(capsys.readouterr().out.splitlines()[-1])["fid"]) < 1e-6
  (tmp_path / "one").mkdir()
  Image.fromarray(_photos(1, 24, seed=7)[0]).save(tmp_path / "one" / "x.png")
  assert eval_cli.main(["fid", f"--samples={tmp_path / 'one'}", f"--reference={stats}",
                        f"--weights={weights_file[0]}"]) == 2
  assert "at least 2" in capsys.readouterr().err


def test_fid_command_bad_input_exits_2_with_one_line(tmp_path):
  (tmp_path / "imgs").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
  cmd = [sys.executable, "-m", "imagen_jax.cli.eval", "fid",
         f"--samples={tmp_path / 'imgs'}", f"--reference={tmp_path / 'ref.npz'}"]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "--weights=FILE is required" in lines[0]
