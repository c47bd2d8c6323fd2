"""Does another algorithm beat XLA:CPU's own 3x3 convolution and its gradients?

  taskset -c 0 python benchmarks/conv_algorithms.py [--batch=16] [--iters=200] [--loop]

On the CPU most of the quickstart's train step is convolutions and their backward pass
(docs/benchmarks.md). This times forward + backward (input and weight gradients) of one
'SAME' 3x3 NHWC convolution at the U-Net's per-device shapes four ways:
- `xla`: jax.grad of `lax.conv_general_dilated` (XLA's lowering);
- `patches`: a custom VJP that keeps XLA's forward and input gradient but computes the
  weight gradient as one matmul of the input's patches (`lax.conv_general_dilated_patches`)
  with the output gradient, sum over pixels of patch^T grad;
- `winograd2`, `winograd4`: Winograd's minimal filtering F(2x2, 3x3) and F(4x4, 3x3)
  (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"), written as
  batched matmuls between transformed input tiles and transformed filters, differentiated
  by jax.grad. They need 2.25x and 4x fewer multiplications than the direct convolution;
  the tile transforms are elementwise sums of strided slices.
`--loop` times instead XLA's forward + backward of two batches, one after the other and
as the two iterations of a `lax.scan` (as `make_train_step` accumulates micro-batches):
XLA:CPU compiles a convolution's gradients inside a loop body to a generic kernel.
All give the same gradients (each variant's largest relative error against `xla`, over
both gradients, is printed); only the time differs. Each figure is the median of 5
timings of iters/5 calls.
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

# Winograd's transforms (Lavin & Gray 2016, section 4): Y = A^T [(G g G^T) * (B^T d B)] A
# for a 3x3 filter g and an (m+2)x(m+2) input tile d, giving an m x m output tile.
WINOGRAD = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),            # B^T
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]),                   # G
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),                                       # A^T
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]])),
}


def _combine(matrix, parts):
  """matrix @ parts for a constant matrix, as elementwise sums that skip its zeros."""
  return [sum(float(c) * p for c, p in zip(row, parts) if c) for row in matrix]


def winograd_conv(x, w, m: int):
  """The 'SAME' 3x3 convolution of x [B, H, W, C] (H, W divisible by m) by Winograd."""
  bt, g, at = WINOGRAD[m]
  batch, height, width, cin = x.shape
  tiles_h, tiles_w, size = height // m, width // m, m + 2
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Tile (i, j) reads padded rows i*m .. i*m+m+1 and the same columns: row offset r of every
  # tile is one strided slice.
  rows = _combine(bt, [lax.slice_in_dim(xp, r, r + m * (tiles_h - 1) + 1, m, axis=1)
                       for r in range(size)])
  v = jnp.stack([jnp.stack(_combine(bt, [lax.slice_in_dim(row, c, c + m * (tiles_w - 1) + 1,
                                                          m, axis=2)
                                         for c in range(size)]))
                 for row in rows])                            # [size, size, B, th, tw, cin]
  v = v.reshape(size, size, -1, cin)
  u = jnp.einsum("xi,ijco,yj->xyco", g.astype(np.float32), w, g.astype(np.float32))
  prod = jnp.einsum("xync,xyco->xyno", v, u)                   # one matmul per tile element
  cols = [_combine(at, [prod[i, j] for i in range(size)]) for j in range(size)]
  out = jnp.stack([jnp.stack(_combine(at, [cols[j][p] for j in range(size)]))
                   for p in range(m)])                          # [m, m, B*th*tw, cout]
  out = out.reshape(m, m, batch, tiles_h, tiles_w, -1).transpose(2, 3, 0, 4, 1, 5)
  return out.reshape(batch, height, width, -1)


VARIANTS = {"xla": conv, "patches": conv_patch_grad,
            "winograd2": lambda x, w: winograd_conv(x, w, 2),
            "winograd4": lambda x, w: winograd_conv(x, w, 4)}


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


def loop_table(batch: int, iters: int):
  print(f"{jax.devices()[0].platform}, batch {batch}: milliseconds per call of XLA's forward "
        "+ backward of two batches")
  print("shape (px, in -> out) | one after the other | in a lax.scan | ratio")
  for size, cin, cout in SHAPES:
    kx, kw = jax.random.split(jax.random.key(0))
    xs = jax.random.normal(kx, (2, batch, size, size, cin))
    w = 0.1 * jax.random.normal(kw, (3, 3, cin, cout))
    grad = jax.grad(lambda w, x: jnp.sum(jnp.tanh(conv(x, w))), (0, 1))

    def unrolled(w, xs):
      (gw0, gx0), (gw1, gx1) = grad(w, xs[0]), grad(w, xs[1])
      return gw0 + gw1, jnp.stack([gx0, gx1])

    def scanned(w, xs):
      def body(acc, x):
        gw, gx = grad(w, x)
        return acc + gw, gx
      return jax.lax.scan(body, jnp.zeros_like(w), xs)

    one, two = (median_ms(jax.jit(f), w, xs, iters=iters) for f in (unrolled, scanned))
    print(f"{size} px, {cin} -> {cout} | {one:.2f} | {two:.2f} | {two / one:.1f}x", flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=16, help="examples per device")
  p.add_argument("--iters", type=int, default=200)
  p.add_argument("--loop", action="store_true",
                 help="XLA's convolution gradients in a lax.scan against outside one")
  args = p.parse_args(argv)
  if args.loop:
    return loop_table(args.batch, args.iters)
  print(f"{jax.devices()[0].platform}, batch {args.batch}: milliseconds per call of forward + "
        "backward (forward alone in brackets), each variant's time over XLA's, and its error")
  print("shape (px, in -> out) | " + " | ".join(VARIANTS))
  for size, cin, cout in SHAPES:
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.batch, size, size, cin))
    w = 0.1 * jax.random.normal(kw, (3, 3, cin, cout))
    g = jax.random.normal(kg, (args.batch, size, size, cout))
    cells = []
    for name, f in VARIANTS.items():
      grad = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * g), (0, 1)))
      grads = grad(x, w)
      total = median_ms(grad, x, w, iters=args.iters)
      forward = median_ms(jax.jit(f), x, w, iters=args.iters)
      if name == "xla":
        reference, xla_ms = grads, total
        cells.append(f"{total:.2f} ({forward:.2f})")
        continue
      err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                for a, b in zip(reference, grads))
      cells.append(f"{total:.2f} ({forward:.2f}) {total / xla_ms:.2f}x, error {err:.0e}")
    print(f"{size} px, {cin} -> {cout} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
  main()
