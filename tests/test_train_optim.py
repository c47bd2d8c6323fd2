"""Optimizer, schedule, EMA and state shardings (no model compile)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from imagen_jax.errors import UserError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.train import optim
from imagen_jax.train import state as state_lib


def test_lr_warmup_then_cosine():
  f = lambda s: float(optim.lr_schedule(s, peak_lr=1.0, warmup_steps=10, decay_steps=100,
                                        end_lr_fraction=0.1))
  assert f(0) == pytest.approx(0.1)          # (0 + 1) / 10
  assert f(4) == pytest.approx(0.5)
  assert f(9) == pytest.approx(1.0)
  assert f(10) == pytest.approx(1.0)         # cosine starts at the peak
  assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)   # halfway: cos(pi/2) = 0
  assert f(110) == pytest.approx(0.1) and f(10_000) == pytest.approx(0.1)
  # No decay: constant after warm-up.
  assert float(optim.lr_schedule(500, peak_lr=2.0, warmup_steps=10)) == pytest.approx(2.0)


def test_ema_decay_warmup_and_update():
  assert float(optim.ema_decay(0, decay=0.9999)) == pytest.approx(0.1)       # 1/10
  assert float(optim.ema_decay(90, decay=0.9999)) == pytest.approx(91 / 100)
  assert float(optim.ema_decay(10**7, decay=0.999)) == pytest.approx(0.999)
  assert float(optim.ema_decay(0, decay=0.99, warmup=False)) == pytest.approx(0.99)
  ema = optim.ema_update({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 4.0])}, 0.25)
  np.testing.assert_allclose(ema["w"], [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 4])


@pytest.mark.parametrize("name", ["adam", "adafactor", "adamw"])
def test_optimizers_descend_a_quadratic(name):
  tx, _ = optim.make_optimizer(name, learning_rate=0.1, clip_norm=1.0)
  params = {"w": jnp.full((4, 3), 2.0), "b": jnp.ones((3,))}
  loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
  start = loss(params)

  def body(_, carry):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 20, body, (p, tx.init(p))))(params)
  assert loss(params) < 0.5 * start


def test_clipping_bounds_the_update():
  tx, _ = optim.make_optimizer("adam", learning_rate=1.0, clip_norm=1e-3, eps=1e-30)
  g = {"w": jnp.array([3e3, 4e3])}
  # Adam normalises, so check the clipped gradient it sees via its first moment.
  _, state = tx.update(g, tx.init(g), g)
  mu = state[1][0].mu["w"]
  np.testing.assert_allclose(jnp.linalg.norm(mu / (1 - 0.9)), 1e-3, rtol=1e-5)


def test_unknown_optimizer_is_a_user_error():
  with pytest.raises(UserError, match="sgd"):
    optim.make_optimizer("sgd")


def test_opt_state_shardings_follow_params(devices):
  mesh = mesh_lib.make_mesh("data:2,fsdp:4", devices=devices[:8])
  params = {"dense": {"kernel": jax.ShapeDtypeStruct((256, 160), jnp.float32),
                      "bias": jax.ShapeDtypeStruct((160,), jnp.float32)}}
  psh = {"dense": {"kernel": NamedSharding(mesh, P("fsdp", None)),
                   "bias": NamedSharding(mesh, P())}}
  for name in ("adam", "adafactor"):
    tx, _ = optim.make_optimizer(name)
    shapes = jax.eval_shape(lambda p: state_lib.init_train_state(p, tx, 0), params)
    sh = state_lib.train_state_shardings(shapes, psh, mesh)
    assert sh.ema_params == psh and sh.params == psh
    specs = {"/".join(k): v.spec for k, v in state_lib.tree_paths(sh.opt_state).items()}
    shapes_by_path = {"/".join(k): v.shape
                      for k, v in state_lib.tree_paths(shapes.opt_state).items()}
    for path, spec in specs.items():
      if shapes_by_path[path] == (256, 160):
        assert spec == P("fsdp", None), path
      else:  # counts and Adafactor's factored row/column statistics: replicated
        assert spec == P(), path
    if name == "adam":
      assert sum(s == P("fsdp", None) for s in specs.values()) == 2   # mu and nu


def test_optimizer_name_is_the_one_make_optimizer_builds():
  import gin
  assert optim.optimizer_name() == optim.DEFAULT_OPTIMIZER == "adam"
  gin.bind_parameter("make_optimizer.name", "adafactor")
  assert optim.optimizer_name() == "adafactor"


def _opt_state_size(tx, shape):
  state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct(shape, jnp.float32)})
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("gin_file,name", [("experiments/imagen_base64.gin", "adafactor"),
                                           ("experiments/imagen_sr256.gin", "adam"),
                                           ("experiments/imagen_sr1024.gin", "adam")])
def test_paper_configs_train_as_imagen_appendix_f(gin_file, name):
  """Imagen (Saharia et al. 2022, appendix F): Adafactor for the 64x64 base model, Adam for
  the super-resolution models; lr 1e-4 after 10k linear warm-up steps, then constant."""
  import pathlib

  import gin
  configs = pathlib.Path(__file__).resolve().parent.parent / "gin_configs"
  gin.add_config_file_search_path(str(configs))
  gin.parse_config_files_and_bindings([str(configs / gin_file)], None, finalize_config=False)
  assert optim.optimizer_name() == name
  tx, lr = optim.make_optimizer()
  assert float(lr(0)) == pytest.approx(1e-4 / 10_000)
  assert float(lr(4_999)) == pytest.approx(0.5e-4)
  assert float(lr(10_000)) == pytest.approx(1e-4)
  assert float(lr(2_000_000)) == pytest.approx(1e-4)  # no decay
  # What was built is what was named: Adafactor keeps a factored second moment of a
  # matrix (a row and a column vector), Adam two full moments.
  size = _opt_state_size(tx, (256, 128))
  if name == "adafactor":
    assert size < 2 * (256 + 128)
  else:
    assert size >= 2 * 256 * 128
