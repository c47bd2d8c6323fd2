"""The InceptionV3 of FID, in Flax NNX: pool3 features (2048-d) of images in [0, 1].

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium") is defined on the pool3 features of the TensorFlow Inception
graph of 2015-12-05. This is that network as pytorch-fid 0.3.0 ports it
(`pytorch_fid.inception.fid_inception_v3`): torchvision's InceptionV3 with the FID blocks,
whose 3x3 average pools do not count the padding (TensorFlow's pooling) and whose last
block (Mixed_7c) pools its fourth branch with a max instead of an average.

  model = load_inception("pt_inception-2015-12-05-6726825d.pth")
  features = model(images)       # images float [B, H, W, 3] in [0, 1] -> [B, 2048]

The input is resized to 299x299 as `F.interpolate(mode='bilinear', align_corners=False)`
does (no antialiasing, in both directions), then scaled to [-1, 1]. Each convolution's
BatchNorm (eps 0.001) is folded into the convolution's kernel and bias at load time.

`width` scales every channel count (1.0 is FID's network); tests use a narrow network
with the same structure, so that they run in seconds.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax import weights as weights_lib
from imagen_jax.errors import UserError
from imagen_jax.nn.layers import CONV_AXES, partitioned

INPUT_SIZE = 299
FEATURE_DIM = 2048
BATCH_NORM_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(x) -> tuple[int, int]:
  return (x, x) if isinstance(x, int) else tuple(x)


class BasicConv(nnx.Module):
  """Conv (no bias) + BatchNorm + ReLU of torchvision, with the BatchNorm folded into a
  kernel and a bias."""

  def __init__(self, in_ch: int, out_ch: int, kernel, stride: int = 1, padding=0, *,
               rngs: nnx.Rngs):
    pad_h, pad_w = _pair(padding)
    self.conv = nnx.Conv(
        in_ch, out_ch, _pair(kernel), strides=stride,
        padding=((pad_h, pad_h), (pad_w, pad_w)), precision=_HIGHEST,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), CONV_AXES),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("conv_out",)), rngs=rngs)
    self.out_channels = out_ch

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.conv(x))


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3, stride 1, padding 1, averaging only the pixels inside the image."""
  window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
  return total / count


def _max_pool_3x3(x: jax.Array, stride: int, padding: int) -> jax.Array:
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, stride, stride, 1), pad)


class InceptionA(nnx.Module):
  """Mixed_5b..5d (FIDInceptionA)."""

  def __init__(self, in_ch: int, pool_features: int, ch, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(in_ch, ch(64), 1, rngs=rngs)
    self.branch5x5_1 = BasicConv(in_ch, ch(48), 1, rngs=rngs)
    self.branch5x5_2 = BasicConv(ch(48), ch(64), 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_ch, ch(64), 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(ch(64), ch(96), 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(ch(96), ch(96), 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv(in_ch, ch(pool_features), 1, rngs=rngs)
    self.out_channels = ch(64) + ch(64) + ch(96) + ch(pool_features)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    pool = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, pool], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a: the grid reduction 35 -> 17."""

  def __init__(self, in_ch: int, ch, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv(in_ch, ch(384), 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_ch, ch(64), 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(ch(64), ch(96), 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(ch(96), ch(96), 3, stride=2, rngs=rngs)
    self.out_channels = ch(384) + ch(96) + in_ch

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e (FIDInceptionC): factorised 7x7 convolutions."""

  def __init__(self, in_ch: int, channels_7x7: int, ch, *, rngs: nnx.Rngs):
    c7 = ch(channels_7x7)
    self.branch1x1 = BasicConv(in_ch, ch(192), 1, rngs=rngs)
    self.branch7x7_1 = BasicConv(in_ch, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv(c7, ch(192), (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv(in_ch, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv(c7, ch(192), (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv(in_ch, ch(192), 1, rngs=rngs)
    self.out_channels = 4 * ch(192)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5):
      d = conv(d)
    pool = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b7, d, pool], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a: the grid reduction 17 -> 8."""

  def __init__(self, in_ch: int, ch, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv(in_ch, ch(192), 1, rngs=rngs)
    self.branch3x3_2 = BasicConv(ch(192), ch(320), 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv(in_ch, ch(192), 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv(ch(192), ch(192), (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv(ch(192), ch(192), (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv(ch(192), ch(192), 3, stride=2, rngs=rngs)
    self.out_channels = ch(320) + ch(192) + in_ch

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                 self.branch7x7x3_4):
      b7 = conv(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""

  def __init__(self, in_ch: int, ch, *, max_pool: bool, rngs: nnx.Rngs):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv(in_ch, ch(320), 1, rngs=rngs)
    self.branch3x3_1 = BasicConv(in_ch, ch(384), 1, rngs=rngs)
    self.branch3x3_2a = BasicConv(ch(384), ch(384), (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv(ch(384), ch(384), (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_ch, ch(448), 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(ch(448), ch(384), 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv(ch(384), ch(384), (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv(ch(384), ch(384), (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv(in_ch, ch(192), 1, rngs=rngs)
    self.out_channels = ch(320) + 4 * ch(384) + ch(192)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    # FID's Mixed_7c max-pools here (a quirk of the TF graph that FID fixed forever).
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3_exclude_pad(x)
    return jnp.concatenate(
        [self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
         self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)],
        axis=-1)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of torch's bilinear resize with align_corners=False, no antialias.

  As ATen's `area_pixel_compute_source_index`: source = (i + 0.5) * in/out - 0.5, clamped
  at 0, interpolated between floor(source) and the next pixel (clamped at the edge).
  """
  source = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = source - low
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return matrix.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """[B, H, W, C] -> [B, size, size, C], as `F.interpolate(mode='bilinear')` does."""
  rows = jnp.asarray(bilinear_matrix(x.shape[1], size))
  cols = jnp.asarray(bilinear_matrix(x.shape[2], size))
  x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=_HIGHEST)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=_HIGHEST)


class InceptionV3(nnx.Module):
  """FID's InceptionV3 up to pool3. Attribute names follow torchvision's, so the path of
  every convolution is its key in pytorch-fid's state dict."""

  def __init__(self, *, width: float = 1.0, rngs: nnx.Rngs):
    def ch(c: int) -> int:
      return max(1, int(round(c * width)))

    self.width = width
    self.Conv2d_1a_3x3 = BasicConv(3, ch(32), 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv(ch(32), ch(32), 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv(ch(32), ch(64), 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv(ch(64), ch(80), 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv(ch(80), ch(192), 3, rngs=rngs)
    self.Mixed_5b = InceptionA(ch(192), 32, ch, rngs=rngs)
    self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, ch, rngs=rngs)
    self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, ch, rngs=rngs)
    self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, ch, rngs=rngs)
    self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, ch, rngs=rngs)
    self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, ch, rngs=rngs)
    self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, ch, rngs=rngs)
    self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, ch, rngs=rngs)
    self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, ch, rngs=rngs)
    self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, ch, max_pool=False, rngs=rngs)
    self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, ch, max_pool=True, rngs=rngs)
    self.feature_dim = self.Mixed_7c.out_channels

  def __call__(self, images: jax.Array) -> jax.Array:
    """images float [B, H, W, 3] in [0, 1] -> pool3 features float32 [B, feature_dim]."""
    x = resize_bilinear(images.astype(jnp.float32))
    x = 2.0 * x - 1.0
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3(x, 2, 0)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool_3x3(x, 2, 0)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                  self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))


def conv_layers(model: InceptionV3) -> dict[str, BasicConv]:
  """State-dict prefix ("Mixed_5b.branch1x1") -> convolution, for every convolution."""
  return {".".join(str(p) for p in path): module
          for path, module in nnx.iter_modules(model) if isinstance(module, BasicConv)}


def torch_shapes(model: InceptionV3) -> dict[str, tuple[int, ...]]:
  """The keys and shapes of pytorch-fid's state dict that `model` reads."""
  shapes = {}
  for prefix, layer in conv_layers(model).items():
    kh, kw, cin, cout = layer.conv.kernel.shape
    shapes[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
    for name in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.bn.{name}"] = (cout,)
  return shapes


def _fold_batch_norm(tensors: dict[str, np.ndarray], prefix: str
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(kernel [kh, kw, in, out], bias [out]) of conv + BatchNorm in inference mode."""
  get = lambda name: np.asarray(tensors[f"{prefix}.{name}"], np.float64)
  scale = get("bn.weight") / np.sqrt(get("bn.running_var") + BATCH_NORM_EPS)
  kernel = get("conv.weight").transpose(2, 3, 1, 0) * scale
  bias = get("bn.bias") - get("bn.running_mean") * scale
  return kernel.astype(np.float32), bias.astype(np.float32)


def inception_from_state_dict(tensors: dict[str, np.ndarray], source: str = "the weights"
                              ) -> InceptionV3:
  """An InceptionV3 holding pytorch-fid's state dict `tensors` (extra keys, such as fc.*
  and num_batches_tracked, are ignored). The width is read from the first convolution."""
  first = tensors.get("Conv2d_1a_3x3.conv.weight")
  if first is None:
    raise UserError(f"{source} has no 'Conv2d_1a_3x3.conv.weight': not pytorch-fid's "
                    "FID Inception state dict (pt_inception-2015-12-05-6726825d.pth)")
  width = first.shape[0] / 32
  model = nnx.eval_shape(lambda: InceptionV3(width=width, rngs=nnx.Rngs(0)))
  for key, shape in torch_shapes(model).items():
    if key not in tensors:
      raise UserError(f"{source} lacks {key!r}; not pytorch-fid's FID Inception weights")
    if tuple(tensors[key].shape) != shape:
      raise UserError(f"{source}: {key!r} has shape {tuple(tensors[key].shape)}, expected "
                      f"{shape} for FID's InceptionV3")
  for prefix, layer in conv_layers(model).items():
    kernel, bias = _fold_batch_norm(tensors, prefix)
    layer.conv.kernel.set_value(kernel)
    layer.conv.bias.set_value(bias)
  return model


def load_inception(file: str | os.PathLike) -> InceptionV3:
  """FID's InceptionV3 from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (as
  distributed: a torch zip or legacy file) or a safetensors file with the same keys.
  The weights stay on the host as numpy arrays; the caller places them."""
  return inception_from_state_dict(weights_lib.read_state_dict(file), os.fspath(file))
