"""benchmarks/conv_algorithms.py's alternatives compute XLA's convolution and its gradients,
so the timings it prints (docs/benchmarks.md) compare the same function."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "conv_algorithms.py"
_SPEC = importlib.util.spec_from_file_location("conv_algorithms", _PATH)
conv_algorithms = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(conv_algorithms)


@pytest.mark.parametrize("name", ["patches", "winograd2", "winograd4"])
def test_each_variant_is_xlas_convolution_forward_and_backward(name):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 8, 4, 3))           # height != width: a swapped axis shows
  w = jax.random.normal(kw, (3, 3, 3, 5))
  g = jax.random.normal(kg, (2, 8, 4, 5))
  variant, reference = conv_algorithms.VARIANTS[name], conv_algorithms.conv

  def value_and_grads(f):
    return jax.jit(lambda x, w: (f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w) * g),
                                                   (0, 1))(x, w)))

  (got_y, got_grads), (want_y, want_grads) = (value_and_grads(f)(x, w)
                                              for f in (variant, reference))
  np.testing.assert_allclose(got_y, want_y, rtol=1e-4, atol=1e-4)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
