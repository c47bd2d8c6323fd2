"""Fréchet Inception Distance (Heusel et al. 2017), as pytorch-fid 0.3.0 computes it.

  model = inception.load_inception("pt_inception-2015-12-05-6726825d.pth")
  stats = statistics_of("samples/", FeatureExtractor(model))    # or a .npz file
  fid = frechet_distance(*stats, *load_statistics("coco_ref.npz"))

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), on the mean and covariance of the
pool3 features of two image sets, in float64. Statistics files are pytorch-fid's `.npz`
(`mu`, `sigma`), so published reference statistics work here and ours work there.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from scipy import linalg
from tqdm import tqdm

from imagen_jax import files
from imagen_jax.errors import UserError
from imagen_jax.eval import images as images_lib
from imagen_jax.eval.inception import InceptionV3
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import rules

Statistics = tuple[np.ndarray, np.ndarray]


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """The Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2), in float64.

  As pytorch-fid's `calculate_frechet_distance` (Dougal Sutherland's stable version):
  scipy's `sqrtm` of sigma1 @ sigma2; if that is not finite, `eps` is added to both
  diagonals and it is taken again; an imaginary part is dropped when the diagonal's is
  below 1e-3, and is an error otherwise.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise UserError(f"the two statistics have different dimensions (mu {mu1.shape} vs "
                    f"{mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}); compute both "
                    "with the same network (2048-d pool3 features)")
  diff = mu1 - mu2
  covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
  if not np.isfinite(covmean).all():
    logging.warning("FID: the covariance product is singular; adding %g to the diagonals",
                    eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in the "
                       "matrix square root")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2)
               - 2 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> Statistics:
  """(mu, sigma) float64 of features [N, D]: the mean and the unbiased covariance."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise UserError(f"FID needs at least 2 images to estimate a covariance; got "
                    f"{features.shape[0] if features.ndim else 0}")
  return np.mean(features, axis=0), np.cov(features, rowvar=False)


def save_statistics(file: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes pytorch-fid's `.npz` (`mu`, `sigma`) through a temporary file and a rename."""
  buf = io.BytesIO()
  np.savez_compressed(buf, mu=mu, sigma=sigma)
  files.write_atomic(file, buf.getvalue())


def load_statistics(file: str | os.PathLike) -> Statistics:
  """(mu, sigma) from a pytorch-fid `.npz` statistics file."""
  path = epath.Path(file)
  if not path.exists():
    raise UserError(f"statistics file {os.fspath(path)} does not exist")
  try:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
      mu, sigma = f["mu"], f["sigma"]
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{os.fspath(path)} is not a FID statistics file (an .npz with mu and "
                    f"sigma): {e}") from e
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise UserError(f"{os.fspath(path)}: mu {mu.shape} and sigma {sigma.shape} do not fit "
                    "(expected [D] and [D, D])")
  return mu.astype(np.float64), sigma.astype(np.float64)


class FeatureExtractor:
  """Pool3 features of uint8 images in fixed-size batches sharded over every device.

  The last batch is padded with black images whose rows are dropped, so every batch has
  the same shape: one compiled program per image size.
  """

  def __init__(self, model: InceptionV3, batch_size: int = 50, mesh=None):
    if batch_size < 1:
      raise UserError(f"--batch_size={batch_size} must be positive")
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(None)
    ways = mesh_lib.data_parallel_size(mesh)
    self.batch_size = -(-int(batch_size) // ways) * ways  # splits evenly over devices
    self.feature_dim = model.feature_dim
    graphdef, state = nnx.split(model)
    shardings = rules.state_shardings(state, mesh)
    self._state = jax.device_put(state, shardings)
    self._batch_sharding = mesh_lib.batch_sharding(mesh, 4)

    def apply(state, images):
      # uint8 -> [0, 1] as torchvision's ToTensor does, on the device.
      return nnx.merge(graphdef, state)(images.astype(jnp.float32) / 255.0)

    self._apply = jax.jit(apply, in_shardings=(shardings, self._batch_sharding),
                          out_shardings=mesh_lib.batch_sharding(mesh, 2))

  def __call__(self, images: Sequence[np.ndarray], *, progress: bool = True,
               desc: str = "features") -> np.ndarray:
    """float32 [N, D] features of N uint8 [H, W, 3] images (all of one size)."""
    n = len(images)
    out = np.zeros((n, self.feature_dim), np.float32)
    bar = tqdm(total=n, desc=desc, unit="img",
               disable=not progress or not jax.process_index() == 0)
    first_shape = None
    for start in range(0, n, self.batch_size):
      stop = min(start + self.batch_size, n)
      batch = images_lib.stack(images[start:stop], desc)
      first_shape = first_shape or batch.shape[1:]
      if batch.shape[1:] != first_shape:
        raise UserError(f"images of {desc} have different sizes ({first_shape[:2]} and "
                        f"{batch.shape[1:3]}); resize them to one size first")
      padded = np.zeros((self.batch_size, *first_shape), np.uint8)
      padded[:stop - start] = batch
      features = self._apply(self._state, jax.device_put(padded, self._batch_sharding))
      out[start:stop] = np.asarray(features)[:stop - start]
      bar.update(stop - start)
    bar.close()
    return out


def is_statistics_file(path: str | os.PathLike) -> bool:
  return os.fspath(path).endswith(".npz")


def read_set(path: str | os.PathLike, stage: int | None = None
             ) -> Statistics | images_lib.ImageFiles:
  """The statistics in a `.npz` file, or the images of a folder or sample output (checked
  to hold at least 2); cheap, so a command can check every input before the long work."""
  if is_statistics_file(path):
    return load_statistics(path)
  images, _ = images_lib.load_image_set(path, stage)
  if len(images) < 2:
    raise UserError(f"{os.fspath(path)} holds {len(images)} image; FID needs at least 2")
  return images


def statistics_of(path: str | os.PathLike, extractor: FeatureExtractor | None, *,
                  stage: int | None = None, progress: bool = True,
                  opened: Statistics | images_lib.ImageFiles | None = None
                  ) -> tuple[Statistics, int | None]:
  """((mu, sigma), number of images) of a `.npz` file (count None) or an image set.
  `opened` is `read_set(path, stage)` when the caller already has it."""
  opened = read_set(path, stage) if opened is None else opened
  if isinstance(opened, tuple):
    return opened, None
  if extractor is None:
    raise UserError(f"{os.fspath(path)} is an image set: pass --weights=FILE (pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth) to compute its statistics")
  features = extractor(opened, progress=progress, desc=os.fspath(path))
  return feature_statistics(features), len(opened)
