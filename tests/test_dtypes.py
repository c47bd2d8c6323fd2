"""imagen_jax.dtypes.as_dtype: the one parser of compute dtype settings."""

import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.dtypes import as_dtype
from imagen_jax.errors import UserError


def test_names_and_dtypes_of_the_two_compute_dtypes():
  assert as_dtype("bfloat16") == jnp.bfloat16 and as_dtype(jnp.float32) == jnp.float32
  assert as_dtype(np.dtype("float32")) == jnp.float32


@pytest.mark.parametrize("bad,message", [("float42", "unknown text encoder dtype 'float42'"),
                                         ("float16", "text encoder dtype 'float16' is not "
                                          "supported")])
def test_anything_else_is_a_user_error_naming_the_setting(bad, message):
  with pytest.raises(UserError, match=message):
    as_dtype(bad, "text encoder dtype")
