"""imagen_jax.parallel: the device mesh and the logical-axis sharding rules."""

from imagen_jax.parallel.mesh import (BATCH_AXES, MESH_AXES, batch_sharding, batch_spec,
                                      data_parallel_size, make_mesh, parse_mesh_spec,
                                      resolve_mesh_shape)
from imagen_jax.parallel.rules import (LOGICAL_AXIS_RULES, constrain, fit_spec_to_shape,
                                       logical_to_mesh, state_shardings,
                                       variable_logical_axes)
