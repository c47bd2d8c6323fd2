"""Does an im2col matmul beat XLA:CPU's own weight gradient of a 3x3 convolution?

  taskset -c 0 python benchmarks/conv_weight_grad.py [--batch=16] [--iters=200]

On the CPU most of the quickstart's train step is convolutions and their backward pass
(docs/benchmarks.md). This times forward + backward (input and weight gradients) of one
'SAME' 3x3 NHWC convolution at the U-Net's per-device shapes two ways: jax.grad of
`lax.conv_general_dilated` (XLA's lowering), and a custom VJP that keeps XLA's forward and
input gradient but computes the weight gradient as one matmul of the input's patches
(`lax.conv_general_dilated_patches`) with the output gradient, sum over pixels of
patch^T grad. Both give the same gradients (the relative error is printed); only the time
differs. Each figure is the median of 5 timings of iters/5 calls.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DIMENSIONS = ("NHWC", "HWIO", "NHWC")
SHAPES = ((16, 32, 32), (8, 64, 64), (4, 64, 64), (16, 64, 64), (8, 128, 128))  # (px, in, out)


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMENSIONS)


@jax.custom_vjp
def conv_patch_grad(x, w):
  return conv(x, w)


def _forward(x, w):
  return conv(x, w), (x, w)


def _backward(residuals, g):
  x, w = residuals
  kh, kw, cin, cout = w.shape
  _, input_vjp = jax.vjp(lambda x: conv(x, w), x)
  dx, = input_vjp(g)
  patches = lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), "SAME",
                                             dimension_numbers=DIMENSIONS)
  dw = jnp.einsum("bhwp,bhwo->po", patches, g)       # patch features: (cin, kh, kw)
  return dx, dw.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)


conv_patch_grad.defvjp(_forward, _backward)


def median_ms(fn, *args, iters: int) -> float:
  """fn: a jitted function; the first call (compiling, if not done yet) is not timed."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(iters // 5):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / (iters // 5))
  return float(np.median(times)) * 1e3


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=16, help="examples per device")
  p.add_argument("--iters", type=int, default=200)
  args = p.parse_args(argv)
  print(f"{jax.devices()[0].platform}, batch {args.batch}: milliseconds per call")
  print("shape (px, in -> out) | forward | fwd+bwd, XLA | fwd+bwd, patch matmul | ratio | "
        "rel. error")
  for size, cin, cout in SHAPES:
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.batch, size, size, cin))
    w = 0.1 * jax.random.normal(kw, (3, 3, cin, cout))
    g = jax.random.normal(kg, (args.batch, size, size, cout))
    grads = {name: jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * g), (0, 1)))
             for name, f in (("xla", conv), ("patches", conv_patch_grad))}
    ref, alt = (grads[n](x, w) for n in ("xla", "patches"))
    err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(ref, alt))
    fwd = median_ms(jax.jit(conv), x, w, iters=args.iters)
    xla = median_ms(grads["xla"], x, w, iters=args.iters)
    patches = median_ms(grads["patches"], x, w, iters=args.iters)
    print(f"{size} px, {cin} -> {cout} | {fwd:.2f} | {xla:.2f} | {patches:.2f} | "
          f"{patches / xla:.2f}x | {err:.1e}", flush=True)


if __name__ == "__main__":
  main()
