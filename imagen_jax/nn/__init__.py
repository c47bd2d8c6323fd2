"""imagen_jax.nn: the Imagen U-Nets as Flax NNX modules, built from gin configs.

    create_model.model_cls = @UNet      # in a gin_configs/models/*.gin file
    UNet.model_channels = 512

    model = nn.create_model(rngs=nnx.Rngs(0))
    abstract = nn.abstract_model()      # shapes only: plans a 2B model without allocating
"""

from __future__ import annotations

from typing import Any

import gin
import jax
import numpy as np
from flax import nnx

from imagen_jax.nn.attention import AttentionBlock, AttentionPool
from imagen_jax.nn.classifier import NoisyClassifier
from imagen_jax.nn.layers import NoiseLevelEmbedding, ResBlock
from imagen_jax.nn.unet import EfficientUNet, UNet
from imagen_jax.parallel.rules import state_shardings


# Initialisation programs run once, so they need no heavy code generation. LLVM's O1
# instead of the default O2 compiles a U-Net's initialisation (a few hundred random
# initializers) in 40-70% of the time on XLA:CPU, and gives the same values bit for bit
# (tests/test_nn_configs.py; docs/benchmarks.md, "Start-up").
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def jit_init(fn, **jit_kwargs):
  """`jax.jit` for a program that runs once (parameter initialisation)."""
  return jax.jit(fn, compiler_options=INIT_COMPILER_OPTIONS, **jit_kwargs)


@gin.configurable
def create_model(*, rngs: nnx.Rngs, model_cls: Any = gin.REQUIRED) -> nnx.Module:
  """Builds the model class bound in gin (`create_model.model_cls = @UNet`)."""
  return model_cls(rngs=rngs)


def abstract_model(seed: int = 0) -> nnx.Module:
  """The gin-configured model with `jax.ShapeDtypeStruct`s for values (`nnx.eval_shape`).

  Nothing is allocated. `nnx.split(abstract_model())` gives the graph definition and the
  abstract state (whose Variables carry their logical axis names), e.g. for
  `parallel.state_shardings` or ahead-of-time lowering.
  """
  return nnx.eval_shape(lambda: create_model(rngs=nnx.Rngs(seed)))


def param_count(tree: Any) -> int:
  """Number of parameter values in a module or state (abstract or real)."""
  params = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def init_model(seed: int = 0, mesh: Any = None) -> nnx.Module:
  """The gin-configured model with real parameters, initialised in one compiled program.

  Building a model eagerly runs every initializer op by op (slow: one small XLA program
  per parameter shape); this compiles the whole initialisation once. With a `mesh`, the
  parameters are created already sharded by the logical-axis rules
  (`parallel.state_shardings`), never gathered on one device.
  """
  graphdef, abstract_state = nnx.split(abstract_model(seed))
  shardings = state_shardings(abstract_state, mesh) if mesh is not None else None
  build = jit_init(lambda: nnx.state(create_model(rngs=nnx.Rngs(seed))),
                  out_shardings=shardings)
  return nnx.merge(graphdef, build())
