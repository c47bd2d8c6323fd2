"""Compute dtypes as gin configs and flags name them."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from imagen_jax.errors import UserError

COMPUTE_DTYPES = ("float32", "bfloat16")


def as_dtype(dtype: Any, what: str = "compute dtype") -> jnp.dtype:
  """A dtype or its name (gin configs write `'bfloat16'`) -> float32 or bfloat16.

  `what` names the setting in the UserError raised for anything else.
  """
  try:
    out = jnp.dtype(dtype)
  except TypeError:
    raise UserError(f"unknown {what} {dtype!r}; use one of {list(COMPUTE_DTYPES)}") from None
  if out.name not in COMPUTE_DTYPES:
    raise UserError(f"{what} {dtype!r} is not supported; use one of {list(COMPUTE_DTYPES)}")
  return out
