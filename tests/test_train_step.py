"""The pure train step: sharding invariance, exact gradient accumulation, Imagen's
conditioning (caption dropout, noise conditioning augmentation), per-example keys."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import test_train_lib as lib
from imagen_jax import errors
from imagen_jax.diffusion import schedules
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import rules
from imagen_jax.train import optim
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib

BATCH = 16


def _build(mesh, micro_batches=1, *, flat_grads=False, dropout=0.0):
  """A tiny train step on `mesh`, as loop.train builds it, run once.
  -> (new state, metrics, parameter shardings, the compiled step's HLO text)."""
  def create():
    return lib.TinyNet(rngs=nnx.Rngs(params=0, dropout=1), lowres_size=4, dropout=dropout)

  with state_lib.no_eager_sharding():
    model = create()
    abstract = nnx.eval_shape(create)
  graphdef, params, rest = state_lib.split_model(model)
  tx, lr = optim.make_optimizer("adam", learning_rate=1e-2)
  psh = state_lib.param_shardings_from_nnx(nnx.state(abstract, nnx.Param), mesh,
                                           rules.state_shardings)
  state = state_lib.init_train_state(params, tx, seed=3)
  ssh = state_lib.train_state_shardings(jax.eval_shape(lambda: state), psh, mesh)
  state = jax.device_put(state, ssh)
  shard = lambda ndim: mesh_lib.batch_sharding(mesh, ndim)
  fn = step_lib.make_train_step(graphdef, rest, tx, loss_cfg=step_lib.LossConfig(), lr_fn=lr,
                                micro_batches=micro_batches, batch_sharding=shard,
                                flat_grad_mesh=mesh if flat_grads else None)
  host = lib.FakePipeline(BATCH, lowres_size=4).host_batch(5)
  bsh = {k: shard(np.ndim(v)) for k, v in host.items() if k != "index"}
  batch = {k: jax.device_put(v, bsh[k]) for k, v in host.items() if k != "index"}
  jitted = jax.jit(lambda s, b: fn(s, b, step_lib.step_key(s.rng, s.step)),
                   in_shardings=(ssh, bsh), out_shardings=(ssh, NamedSharding(mesh, P())))
  with jax.set_mesh(mesh):
    compiled = jitted.lower(state, batch).compile()
    new_state, metrics = compiled(state, batch)
  return new_state, jax.device_get(metrics), psh, compiled.as_text()


@pytest.fixture(scope="module")
def eight_device_run(devices):
  return _build(mesh_lib.make_mesh("data:2,fsdp:4", devices=devices[:8]))


def test_one_device_and_eight_devices_agree(devices, eight_device_run):
  state8, m8, psh, _ = eight_device_run
  # The 8-device run really shards parameters over fsdp.
  assert any(s.spec != P() for s in jax.tree.leaves(psh))
  state1, m1, _, _ = _build(mesh_lib.make_mesh("data:1", devices=devices[:1]))
  assert np.isfinite(m8["loss"])
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert int(state8.step) == int(state1.step) == 1


def test_gradient_accumulation_is_exact(devices, eight_device_run):
  state8, m8, _, _ = eight_device_run
  state_acc, m_acc, _, hlo = _build(mesh_lib.make_mesh("data:2,fsdp:4", devices=devices[:8]),
                                 micro_batches=2)
  # On CPU the micro-batches are unrolled (step._unrolls_micro_batches): XLA:CPU runs a
  # convolution's gradients inside a loop body with a generic kernel, 14-36x slower. The
  # step's only loops are the random bit generator's, which carry no float array.
  loops = re.findall(r"= (\(.*?\)) while\(", hlo)
  assert not [shape for shape in loops if "f32[" in shape]
  np.testing.assert_allclose(m_acc["loss"], m8["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_acc["grad_norm"], m8["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(state_acc.params), jax.tree.leaves(state8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # One optimizer update and one EMA update per step, whatever the micro-batching.
  assert int(state_acc.step) == 1
  assert int(state_acc.opt_state[1][0].count) == 1


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_flat_gradient_sum_is_xlas_reduction_in_one_all_reduce(devices, micro_batches):
  """flat_grad_mesh: each device's rows in a shard_map, the gradient summed as one flat
  vector. The update is XLA's own reduction's, dropout masks included (each shard keeps
  its rows of the whole batch's mask), in one all-reduce instead of one per parameter."""
  mesh = mesh_lib.make_mesh("data:8", devices=devices[:8])
  state_f, m_f, _, hlo_f = _build(mesh, micro_batches, flat_grads=True, dropout=0.5)
  state_x, m_x, _, hlo_x = _build(mesh, micro_batches, dropout=0.5)
  np.testing.assert_allclose(m_f["loss"], m_x["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_f["grad_norm"], m_x["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_f.params), jax.tree.leaves(state_x.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  def all_reduced_arrays(hlo):  # the array types of each all-reduce
    return [re.findall(r"f32\[[\d,]*\]", m)
            for m in re.findall(r"^\s*(?:ROOT )?%\S+ = (.*?) all-reduce\(", hlo, re.M)]
  assert sum(map(len, all_reduced_arrays(hlo_x))) > 4  # XLA's: one array per parameter
  assert all_reduced_arrays(hlo_f) == [["f32[1507]", "f32[]"]]  # the gradient, the loss


def test_the_classifier_loss_in_shards_weighs_by_the_whole_batch(devices):
  """Inside the flat sum's shard_map each device holds its own rows, yet the classifier's
  per-example weights come from the whole batch's count of labelled examples: the same
  loss, aux and gradient as on the whole batch. Unlabelled rows (-1) are spread unevenly
  over the 8 devices' pairs of rows, so per-device counts would weigh them differently."""
  from imagen_jax.nn.classifier import NoisyClassifier
  with state_lib.no_eager_sharding():
    model = NoisyClassifier(rngs=nnx.Rngs(0), num_classes=4, image_size=8, model_channels=8,
                            channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                            head_dim=8, num_groups=4)
  graphdef, params, rest = state_lib.split_model(model)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, BATCH)
  labels[[0, 2, 3, 13]] = -1
  batch = {"image": rng.integers(0, 256, (BATCH, 8, 8, 3)).astype(np.uint8), "label": labels}
  keys = step_lib.example_keys(jax.random.PRNGKey(0), jnp.arange(BATCH))
  cfg = step_lib.LossConfig(task="classifier")

  def grads_fn(p, b, k):
    def total(p):
      loss, aux = step_lib.per_example_loss(graphdef, rest, p, b, k, None, cfg)
      return jnp.sum(loss), aux
    (loss_sum, aux), grads = jax.value_and_grad(total, has_aux=True)(p)
    return loss_sum, grads, aux

  mesh = mesh_lib.make_mesh("data:8", devices=devices[:8])
  whole = jax.jit(grads_fn)(params, batch, keys)
  shards = jax.jit(step_lib._summed_over_shards(grads_fn, mesh))(params, batch, keys)
  np.testing.assert_allclose(shards[0], whole[0], rtol=1e-5)
  assert {k: float(v) for k, v in shards[2].items()} == {k: float(v) for k, v in whole[2].items()}
  for a, b in zip(jax.tree.leaves(shards[1]), jax.tree.leaves(whole[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_flat_gradients_only_on_cpu_with_replicated_parameters(devices, eight_device_run):
  replicated = lambda mesh: NamedSharding(mesh, P())
  mesh8 = mesh_lib.make_mesh("data:8", devices=devices[:8])
  assert step_lib.flat_grad_mesh_for(mesh8, {"w": replicated(mesh8)}) is mesh8
  mesh1 = mesh_lib.make_mesh("data:1", devices=devices[:1])
  assert step_lib.flat_grad_mesh_for(mesh1, {"w": replicated(mesh1)}) is None
  _, _, fsdp_sharded, _ = eight_device_run
  assert step_lib.flat_grad_mesh_for(mesh_lib.make_mesh("data:2,fsdp:4", devices=devices[:8]),
                                     fsdp_sharded) is None


def _cond_batch(n, lowres=False):
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8),
           "text_emb": np.ones((n, 4, 8), np.float32), "text_mask": np.ones((n, 4), bool)}
  if lowres:
    batch["lowres"] = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
  return batch


@pytest.fixture(scope="module")
def cond_fn():
  """noise_and_conditioning under jit (one compile for the conditioning tests)."""
  cfg = step_lib.LossConfig(cond_drop_prob=0.1, aug_max=0.5)
  fn = jax.jit(lambda b, k: step_lib.noise_and_conditioning(b, k, cfg))
  return cfg, fn


def test_caption_dropout_zeroes_embedding_and_mask(cond_fn):
  cfg, fn = cond_fn
  n = 4000
  keys = step_lib.example_keys(jax.random.PRNGKey(0), jnp.arange(n))
  x0, log_snr, noise, cond = jax.device_get(fn(_cond_batch(n, lowres=True), keys))
  dropped = ~cond["text_mask"].any(1)
  assert abs(dropped.mean() - 0.1) < 0.015           # p = 0.1, 4000 draws: sd 0.005
  assert not cond["text_emb"][dropped].any()
  assert cond["text_mask"][~dropped].all() and (cond["text_emb"][~dropped] == 1).all()
  # t ~ U[0, 1]: the log-SNRs are the schedule's at uniform times (check the median).
  np.testing.assert_allclose(np.median(log_snr), schedules.cosine_log_snr(0.5), atol=0.1)
  assert x0.min() >= -1 and x0.max() <= 1 and abs(noise.std() - 1) < 0.01


def test_noise_conditioning_augmentation(cond_fn):
  cfg, fn = cond_fn
  n = 4000
  batch = _cond_batch(n, lowres=True)
  keys = step_lib.example_keys(jax.random.PRNGKey(1), jnp.arange(n))
  _, _, _, cond = jax.device_get(fn(batch, keys))
  aug = cond["lowres_log_snr"]
  lo, hi = float(schedules.cosine_log_snr(cfg.aug_max)), float(schedules.cosine_log_snr(0.0))
  assert aug.shape == (n,) and aug.min() >= lo - 1e-4 and aug.max() <= hi + 1e-4
  # The augmentation level varies per example, uniformly in t_aug: median at t = aug_max/2.
  np.testing.assert_allclose(np.median(aug), schedules.cosine_log_snr(cfg.aug_max / 2),
                             atol=0.15)
  # The low-res image went through the forward process at that level: the implied noise
  # (lowres_t - alpha x) / sigma is standard normal and independent of the image.
  clean = batch["lowres"].astype(np.float32) / 127.5 - 1
  alpha, sigma = (np.asarray(v)[:, None, None, None] for v in schedules.alpha_sigma(aug))
  eps = (cond["lowres"] - alpha * clean) / sigma
  assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1) < 0.01
  assert abs(np.corrcoef(eps.ravel(), clean.ravel())[0, 1]) < 0.01


def test_per_example_draws_depend_only_on_the_global_index(cond_fn):
  """Examples 2000..3999 drawn as rows 2000.. of one batch or rows 0.. of another (as on
  another host) get the same noise, levels, dropout and augmentation."""
  _, fn = cond_fn
  n, shift = 4000, 2000
  batch = _cond_batch(n, lowres=True)
  root = jax.random.PRNGKey(7)
  whole = jax.device_get(fn(batch, step_lib.example_keys(root, jnp.arange(n))))
  moved = {k: np.roll(v, -shift, axis=0) for k, v in batch.items()}
  part = jax.device_get(fn(moved, step_lib.example_keys(root, jnp.arange(shift, shift + n))))
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(part)):
    np.testing.assert_array_equal(a[shift:], b[:n - shift])


def test_validation_levels_are_fixed_and_finite():
  cfg = step_lib.LossConfig(val_levels=4)
  levels = np.asarray(step_lib.validation_levels(cfg))
  np.testing.assert_allclose(levels, schedules.cosine_log_snr(jnp.array([.125, .375, .625,
                                                                         .875])))
  assert np.all(np.isfinite(levels)) and np.all(np.diff(levels) < 0)


def test_dropout_masks_come_from_the_step_key():
  """With dropout on, the loss is a pure function of (params, batch, key): the same key
  gives the same loss, another key other masks (the models hold no RNG state)."""
  with state_lib.no_eager_sharding():
    model = lib.TinyNet(rngs=nnx.Rngs(0), lowres_size=4, dropout=0.5)
  graphdef, params, rest = state_lib.split_model(model)
  batch = lib.FakePipeline(BATCH, lowres_size=4).host_batch(0)
  batch = {k: v for k, v in batch.items() if k != "index"}
  keys = step_lib.example_keys(jax.random.PRNGKey(0), jnp.arange(BATCH))
  cfg = step_lib.LossConfig(cond_drop_prob=0.0)
  loss = jax.jit(lambda p, k: step_lib.per_example_loss(graphdef, rest, p, batch, keys, k,
                                                        cfg)[0].mean())
  a = loss(params, jax.random.PRNGKey(1))
  assert float(a) == float(loss(params, jax.random.PRNGKey(1)))
  assert float(a) != float(loss(params, jax.random.PRNGKey(2)))


def test_max_time_bounds_the_training_noise_levels():
  """LossConfig.max_time = T draws t ~ U[0, T]: log-SNRs from schedule(T) up, median at
  schedule(T / 2); validation levels stay inside the trained range."""
  cfg = step_lib.LossConfig(max_time=0.6)
  n = 4000
  keys = step_lib.example_keys(jax.random.PRNGKey(2), jnp.arange(n))
  _, log_snr, _, _ = jax.device_get(jax.jit(
      lambda b, k: step_lib.noise_and_conditioning(b, k, cfg))(_cond_batch(n), keys))
  assert log_snr.min() >= float(schedules.cosine_log_snr(0.6)) - 1e-4
  np.testing.assert_allclose(np.median(log_snr), schedules.cosine_log_snr(0.3), atol=0.1)
  assert np.all(np.asarray(step_lib.validation_levels(cfg))
                > float(schedules.cosine_log_snr(0.6)))
  with pytest.raises(errors.UserError, match="max_time"):
    step_lib.LossConfig(max_time=0.0).validate()


def test_the_update_does_not_copy_the_state():
  """The donated state is updated in place. Guarding the update against a non-finite step
  with a select over the whole state made XLA copy every parameter and moment first."""
  def create():
    return lib.TinyNet(rngs=nnx.Rngs(params=0, dropout=1), lowres_size=4)

  with state_lib.no_eager_sharding():
    graphdef, params, rest = state_lib.split_model(create())
  tx, lr = optim.make_optimizer("adam", learning_rate=1e-2)
  state = state_lib.init_train_state(params, tx, seed=3)
  fn = step_lib.make_train_step(graphdef, rest, tx, loss_cfg=step_lib.LossConfig(), lr_fn=lr)
  host = lib.FakePipeline(BATCH, lowres_size=4).host_batch(0)
  batch = {k: v for k, v in host.items() if k != "index"}
  jitted = jax.jit(lambda s, b: fn(s, b, step_lib.step_key(s.rng, s.step)),
                   donate_argnums=(0,))
  hlo = jitted.lower(state, batch).compile().as_text()
  entry = hlo[hlo.index("\nENTRY "):]
  inputs = set(re.findall(r"%([\w.\-]+) = f32\[\d[^\]]*\]\S* parameter\(", entry))  # arrays
  copied = [n for n in re.findall(r" copy\(%([\w.\-]+)\)", entry) if n in inputs]
  assert len(inputs) > len(jax.tree.leaves(params)) and not copied, copied[:5]
