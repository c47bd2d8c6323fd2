"""The train step: a pure function (state, batch, rng) -> (state, metrics), and the
validation loss at fixed noise levels.

The loss follows Imagen (Saharia et al. 2022, section 2 and appendix):
- eps-prediction by default ("v" and "x0" configurable), t ~ U[0, 1] per example, the
  forward process x_t = alpha x0 + sigma eps (VDM eq. 1) and the simple MSE loss (Ho et al.
  2020 eq. 14), in float32 (`diffusion.loss_at`);
- the caption dropped with probability 0.1 (all-zero embedding, all-false mask) so that one
  model learns the conditional and the unconditional score (Ho & Salimans 2022, CFG);
- super-resolution stages: noise conditioning augmentation (Imagen section 2.5, Ho et al.
  2021 "Cascaded Diffusion Models" section 4.1): a random level t_aug ~ U[0, aug_max] per
  example, the low-resolution image noised by the forward process at log-SNR
  schedule(t_aug), and that log-SNR given to the model as `lowres_log_snr`;
- inpainting models (`inpaint_channels` > 0; GLIDE, Nichol et al. 2021, section 4): a random
  mask per example (`diffusion.masks`, gin `MaskConfig`) and the model input `inpaint`, the
  masked image and the mask; the loss is the same, over the whole image.

Randomness: the step key is fold_in(root, step) (passed in as `rng`); every per-example draw
uses fold_in(step key, the example's index in the GLOBAL batch), so the result does not
depend on the number of hosts, devices or micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import gin
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imagen_jax.diffusion import conditioning, losses, masks, process, schedules
from imagen_jax.errors import UserError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import rules
from imagen_jax.train import optim
from imagen_jax.train.state import TrainState, merge_model


TASKS = ("diffusion", "classifier")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
  """How the training loss is computed (gin: `LossConfig.objective = 'v'`, ...)."""
  objective: str = "eps"           # what the model predicts: eps, v or x0
  schedule: str = "cosine"         # t -> log-SNR for training noise levels
  weighting: str = "none"          # "none", "min_snr" or "clamped_snr" (diffusion.losses)
  min_snr_gamma: float = 5.0
  cond_drop_prob: float = 0.1      # caption dropped for classifier-free guidance
  aug_schedule: str = "cosine"     # t_aug -> log-SNR of the low-res augmentation (SR stages)
  aug_max: float = 0.5             # t_aug ~ U[0, aug_max]
  # t ~ U[0, max_time]. Below 1, for a super-resolution stage that samples from its
  # upsampled input noised to t = max_time (SamplerSettings.lowres_start), not from noise.
  max_time: float = 1.0
  # "none": the low-res image is noised at its own size and the model resizes it (the
  # EfficientUNet contract); or a jax.image.resize method to upsample before noising.
  lowres_resize: str = "none"
  val_aug_t: float = 0.1           # fixed augmentation level of the validation loss
  val_levels: int = 8              # fixed log-SNR levels of the validation loss
  # "diffusion" (a denoising U-Net) or "classifier": a noise-aware classifier
  # (nn.classifier.NoisyClassifier) trained with cross-entropy on noised images at
  # log-SNR schedule(t), t ~ U[0, 1] (Dhariwal & Nichol 2021, section 4).
  task: str = "diffusion"

  def validate(self):
    process.check_objective(self.objective)
    schedules.get_schedule(self.schedule)
    schedules.get_schedule(self.aug_schedule)
    if self.weighting not in losses.WEIGHTINGS:
      raise UserError(f"LossConfig.weighting={self.weighting!r}; use one of {losses.WEIGHTINGS}")
    if not 0.0 <= self.cond_drop_prob <= 1.0:
      raise UserError(f"LossConfig.cond_drop_prob={self.cond_drop_prob} must be in [0, 1]")
    if not 0.0 <= self.aug_max <= 1.0:
      raise UserError(f"LossConfig.aug_max={self.aug_max} must be in [0, 1]")
    if not 0.0 < self.max_time <= 1.0:
      raise UserError(f"LossConfig.max_time={self.max_time} must be in (0, 1] (1 = every "
                      "noise level, as Imagen trains)")
    if self.task not in TASKS:
      raise UserError(f"LossConfig.task={self.task!r}; use one of {list(TASKS)}")
    return self


def example_keys(rng, global_index):
  """One key per example: fold_in(step key, global index in the batch)."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, global_index)


def noise_level_and_noise(k_t, k_noise, shape, cfg: LossConfig):
  """Per-example log-SNR at t ~ U[0, max_time] through cfg.schedule, and standard normal
  noise of `shape` per example; k_t, k_noise: one key per example."""
  t = cfg.max_time * jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(k_t)
  noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(k_noise)
  return schedules.get_schedule(cfg.schedule)(t), noise


def noise_and_conditioning(batch: dict, keys, cfg: LossConfig, *, train: bool = True,
                           fixed_log_snr=None, mask_cfg: masks.MaskConfig | None = None):
  """Per-example draws and model conditioning for a (micro-)batch.

  Returns (x0, log_snr [B], noise, cond) where cond holds text_emb, text_mask and, for SR
  stages, lowres / lowres_log_snr. With `fixed_log_snr` (validation) the noise level is
  given, no caption is dropped and the augmentation level is cfg.val_aug_t. With
  `mask_cfg` (an inpainting model) cond also holds `inpaint`: the image masked by a random
  mask drawn from fold_in(example key, 5), and the mask.
  """
  x0 = conditioning.to_float_image(batch["image"])
  b = x0.shape[0]
  split = jax.vmap(lambda k: jax.random.split(k, 5))(keys)      # [B, 5] keys
  k_t, k_noise, k_drop, k_aug, k_aug_noise = (split[:, i] for i in range(5))
  log_snr, noise = noise_level_and_noise(k_t, k_noise, x0.shape[1:], cfg)
  if fixed_log_snr is not None:
    log_snr = jnp.broadcast_to(jnp.asarray(fixed_log_snr, jnp.float32), (b,))

  text_emb = jnp.asarray(batch["text_emb"])
  text_mask = jnp.asarray(batch["text_mask"], bool)
  if train and cfg.cond_drop_prob > 0:
    drop = jax.vmap(lambda k: jax.random.uniform(k, ()))(k_drop) < cfg.cond_drop_prob
    text_emb = jnp.where(drop[:, None, None], jnp.zeros_like(text_emb), text_emb)
    text_mask = jnp.where(drop[:, None], False, text_mask)
  cond = {"text_emb": text_emb, "text_mask": text_mask}

  if "lowres" in batch:
    lowres = conditioning.to_float_image(batch["lowres"])
    if train:
      t_aug = cfg.aug_max * jax.vmap(lambda k: jax.random.uniform(k, ()))(k_aug)
    else:
      t_aug = jnp.full((b,), cfg.val_aug_t, jnp.float32)
    aug_log_snr = schedules.get_schedule(cfg.aug_schedule)(t_aug)
    cond.update(conditioning.augment_lowres(lowres, x0.shape[1], cfg.lowres_resize,
                                            aug_log_snr, k_aug_noise))
  if mask_cfg is not None:
    k_mask = jax.vmap(lambda k: jax.random.fold_in(k, 5))(keys)
    cond["inpaint"] = masks.inpaint_input(x0, masks.random_masks(k_mask, x0.shape[1],
                                                                 mask_cfg))
  return x0, log_snr, noise, cond


def training_masks(model) -> masks.MaskConfig | None:
  """The random-mask settings (gin `MaskConfig`) for an inpainting model, else None."""
  return masks.MaskConfig() if getattr(model, "inpaint_channels", 0) else None


def model_fn(model, train: bool, dropout_rng=None):
  """model_fn(x_t, log_snr, **cond) of the diffusion API for an NNX model.

  The U-Nets hold no RNG state: dropout masks come from `dropout_rng` (a function of the
  step key), so a step is a pure function of (state, batch, rng).
  """
  def fn(x_t, log_snr, *, text_emb, text_mask, lowres=None, lowres_log_snr=None,
         inpaint=None):
    # `inpaint` only for an inpainting model: other models need not take the keyword.
    extra = {} if inpaint is None else {"inpaint": inpaint}
    return model(x_t, log_snr, text_emb, text_mask, lowres=lowres,
                 lowres_log_snr=lowres_log_snr, train=train, dropout_rng=dropout_rng,
                 **extra)
  return fn


def disable_remat(model) -> None:
  """Turns off rematerialisation in every submodule with a `remat` flag (for counting the
  model FLOPs of a step without recomputation)."""
  for _, module in nnx.iter_modules(model):
    if getattr(module, "remat", False):
      module.remat = False


def per_example_loss(graphdef, rest, params, batch, keys, dropout_key, cfg: LossConfig, *,
                     no_remat: bool = False):
  """-> (loss [B], aux): aux holds sums to accumulate over micro-batches ({} for
  diffusion; `classifier_loss`'s for a classifier)."""
  model = merge_model(graphdef, params, rest)
  if no_remat:
    disable_remat(model)
  if cfg.task == "classifier":
    return classifier_loss(model, batch, keys, dropout_key, cfg)
  x0, log_snr, noise, cond = noise_and_conditioning(batch, keys, cfg,
                                                    mask_cfg=training_masks(model))
  fn = model_fn(model, train=True, dropout_rng=dropout_key)
  return losses.loss_at(fn, x0, log_snr, noise,
                        objective=cfg.objective, weighting=cfg.weighting,
                        min_snr_gamma=cfg.min_snr_gamma, **cond), {}


def classifier_loss(model, batch, keys, dropout_key, cfg: LossConfig):
  """A noise-aware classifier's loss (Dhariwal & Nichol 2021, section 4): the image noised
  by the forward process at log-SNR schedule(t), t ~ U[0, max_time] (the diffusion
  training's draws, `noise_level_and_noise`: the same keys, schedule and noise), and the
  cross-entropy of the classifier's logits on `batch['label']`. Examples labelled -1 (no
  label, e.g. two-object shapes captions) are masked; per-example losses are scaled so
  that their mean over the batch is the mean cross-entropy over the labelled examples.
  -> (loss [B], {"correct": labelled examples classified right, "labelled": their count}).
  """
  if "label" not in batch:
    raise UserError("LossConfig.task='classifier' needs labelled data: the model's label "
                    "set gives them (NoisyClassifier.labels)")
  x0 = conditioning.to_float_image(batch["image"])
  split = jax.vmap(lambda k: jax.random.split(k, 5))(keys)
  log_snr, noise = noise_level_and_noise(split[:, 0], split[:, 1], x0.shape[1:], cfg)
  logits = model(process.q_sample(x0, log_snr, noise), log_snr, train=True,
                 dropout_rng=dropout_key)
  labels = jnp.asarray(batch["label"], jnp.int32)
  valid = labels >= 0
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
  labelled = jnp.sum(valid.astype(jnp.float32))
  # The whole batch's count, also when each device computes its own rows (flat_grad_mesh).
  rows = rules.whole_batch_sum(jnp.float32(labels.shape[0]))
  scale = rows / jnp.maximum(rules.whole_batch_sum(labelled), 1.0)
  correct = jnp.sum((valid & (jnp.argmax(logits, -1) == labels)).astype(jnp.float32))
  return jnp.where(valid, ce, 0.0) * scale, {"correct": correct, "labelled": labelled}


def _batch_size(batch) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


def _unrolls_micro_batches(unroll: bool | None) -> bool:
  """None: unrolled on CPU only. XLA:CPU compiles a convolution's gradient inside a loop
  body to a generic kernel, 14-36x slower than outside a loop at the U-Nets' shapes, which
  made micro-batches slow the quickstart's step 12x (docs/benchmarks.md). Elsewhere the
  loop runs one micro-batch at a time, keeping one micro-batch's activations alive, which
  is what micro-batches are for."""
  return jax.default_backend() == "cpu" if unroll is None else unroll


def make_train_step(graphdef, rest, optimizer: optax.GradientTransformation, *,
                    loss_cfg: LossConfig, lr_fn: Callable | float,
                    ema_decay_fn: Callable = optim.ema_decay, micro_batches: int = 1,
                    batch_sharding: Callable[[int], NamedSharding] | None = None,
                    flat_grad_mesh: Mesh | None = None, no_remat: bool = False,
                    unroll_micro_batches: bool | None = None, for_flop_count: bool = False):
  """Returns train_step(state, batch, rng) -> (state, metrics); jit it (see loop.py).

  micro_batches > 1 accumulates gradients over a lax.scan: micro-batch m holds the examples
  whose global index i has i % micro_batches == m, so each device keeps its own rows (no
  communication), and the optimizer makes one exact update per step on the whole batch.
  `unroll_micro_batches` unrolls the scan (None: on CPU only; `_unrolls_micro_batches`).
  `batch_sharding(ndim)` constrains each micro-batch to the batch sharding.
  Dropout masks (models with dropout) use fold_in(step key, micro-batch), so unlike the
  per-example draws they change with micro_batches.
  `flat_grad_mesh` (see `flat_grad_mesh_for`): each device computes the gradient of its
  own rows (`shard_map` over the mesh's batch axes), and the shards' gradients are summed
  in one all-reduce of one flat vector instead of XLA's all-reduce per parameter.
  `no_remat` builds the step without rematerialisation (to count model FLOPs for MFU).
  `for_flop_count` builds the same step for XLA's cost analysis only (lower it, never run
  it): micro-batches unrolled, since the analysis counts a loop's body once, and no
  `flat_grad_mesh`, since a shard_map's body is one device's program. Its count is then
  the whole batch's.
  A non-finite loss or gradient norm skips the update: that step changes no parameter,
  optimizer moment or EMA (the step counter still advances, so the next step sees the
  next batch), and its metric `nonfinite` is 1. The loop counts consecutive skips.
  """
  loss_cfg.validate()
  if for_flop_count:
    flat_grad_mesh, unroll_micro_batches = None, True
  unroll = _unrolls_micro_batches(unroll_micro_batches)

  def grads_of(params, batch, keys, dropout_key):
    def total(p):
      loss, aux = per_example_loss(graphdef, rest, p, batch, keys, dropout_key, loss_cfg,
                                   no_remat=no_remat)
      return jnp.sum(loss), aux
    (loss_sum, aux), grads = jax.value_and_grad(total, has_aux=True)(params)
    return loss_sum, grads, aux

  def accumulated_grads(params, batch, keys, dropout_rng, micro_sharding):
    """-> (loss sum, gradient sum, aux) over the rows of `batch`, in micro-batches."""
    if micro_batches == 1:
      return grads_of(params, batch, keys, dropout_rng)
    rows = _batch_size(batch)

    def to_micro(x):
      x = x.reshape(rows // micro_batches, micro_batches, *x.shape[1:])
      return jnp.swapaxes(x, 0, 1)

    def body(carry, inputs):
      g_acc, l_acc, a_acc = carry
      mb, mb_keys, m = inputs
      if micro_sharding is not None:
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, micro_sharding(x.ndim)), mb)
      l, g, a = grads_of(params, mb, mb_keys, jax.random.fold_in(dropout_rng, m))
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l,
              jax.tree.map(jnp.add, a_acc, a)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    no_aux = {"correct": 0.0, "labelled": 0.0} if loss_cfg.task == "classifier" else {}
    (grads, loss_sum, aux), _ = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32),
               jax.tree.map(lambda v: jnp.zeros((), jnp.float32), no_aux)),
        (jax.tree.map(to_micro, batch), to_micro(keys),
         jnp.arange(micro_batches, dtype=jnp.int32)),
        unroll=micro_batches if unroll else 1)
    return loss_sum, grads, aux

  def train_step(state: TrainState, batch: dict, rng) -> tuple[TrainState, dict]:
    b = _batch_size(batch)
    if b % micro_batches:
      raise UserError(f"batch size {b} is not divisible by micro_batches={micro_batches}")
    example_rng, dropout_rng = jax.random.split(rng)
    keys = example_keys(example_rng, jnp.arange(b, dtype=jnp.int32))
    if flat_grad_mesh is None:
      loss_sum, grads, aux = accumulated_grads(state.params, batch, keys, dropout_rng,
                                               batch_sharding)
    else:
      loss_sum, grads, aux = _summed_over_shards(
          lambda p, bt, k: accumulated_grads(p, bt, k, dropout_rng, None),
          flat_grad_mesh)(state.params, batch, keys)
    grads = jax.tree.map(lambda g: g / b, grads)
    loss = loss_sum / b
    grad_norm = optax.global_norm(grads)
    decay = ema_decay_fn(state.step)

    def update(state, grads):
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return state.replace(params=params, opt_state=opt_state,
                           ema_params=optim.ema_update(state.ema_params, params, decay))

    # A cond rather than optax.apply_if_finite (which holds back the optimizer alone, not
    # the EMA) or a select over the whole state: a select reads every state buffer twice,
    # and XLA then copies each parameter and moment before updating it in place (4% of
    # the quickstart's step on two devices; docs/benchmarks.md).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.lax.cond(finite, update, lambda state, grads: state, state, grads)
    new_state = new_state.replace(step=state.step + 1)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "learning_rate": optim.learning_rate_at(lr_fn, state.step),
               "ema_decay": decay, "param_norm": optax.global_norm(new_state.params),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    if "labelled" in aux:  # a classifier: accuracy on the labelled (noised) examples
      metrics["accuracy"] = aux["correct"] / jnp.maximum(aux["labelled"], 1.0)
    return new_state, metrics

  return train_step


def flat_grad_mesh_for(mesh: Mesh, param_shardings) -> Mesh | None:
  """The mesh for `make_train_step(flat_grad_mesh=...)`, or None to leave the gradient
  reduction to XLA. Only on CPU, only when the batch is split (data-parallel size > 1) and
  every parameter is replicated. XLA:CPU runs an all-reduce one array at a time (a
  rendezvous of the devices per array; a gloo round trip per array between processes),
  and a device waiting there holds a core: one flat all-reduce made the quickstart's
  two-device step 1.15x faster (docs/benchmarks.md). On TPUs and GPUs, XLA's own
  all-reduces overlap the backward pass, and a flat copy of the gradient would cost
  device memory, so they keep XLA's reduction."""
  if mesh.devices.flat[0].platform != "cpu" or mesh_lib.data_parallel_size(mesh) == 1:
    return None
  if not all(s.is_fully_replicated for s in jax.tree.leaves(param_shardings)):
    return None
  return mesh


def _summed_over_shards(grads_fn, mesh: Mesh):
  """grads_fn(params, batch, keys) -> (loss sum, gradient sum, aux) over the rows it is
  given, run on each device's rows of the batch and summed over the mesh's batch axes:
  the gradient as one flat vector, in one all-reduce with the loss and aux."""
  axes = mesh_lib.BATCH_AXES

  def local(params, batch, keys):
    loss_sum, grads, aux = grads_fn(params, batch, keys)
    flat, unravel = ravel_pytree(grads)
    flat, loss_sum, aux = jax.lax.psum((flat, loss_sum, aux), axes)
    return loss_sum, unravel(flat), aux

  def rows(x):
    return mesh_lib.batch_spec(x.ndim)

  def run(params, batch, keys):
    return jax.shard_map(local, mesh=mesh, axis_names=set(axes),
                         in_specs=(P(), jax.tree.map(rows, batch), rows(keys)),
                         out_specs=P(), check_vma=False)(params, batch, keys)
  return run


def validation_levels(cfg: LossConfig):
  """Fixed log-SNRs at t = max_time (i + 1/2) / K, i = 0..K-1 (interior of the trained
  range, so all finite)."""
  t = cfg.max_time * (jnp.arange(cfg.val_levels, dtype=jnp.float32) + 0.5) / cfg.val_levels
  return schedules.get_schedule(cfg.schedule)(t)


VALIDATION_SEED = 1234  # fixed noise for validation: comparable across runs


def make_eval_step(graphdef, rest, loss_cfg: LossConfig):
  """Returns eval_step(params, batch) -> per-level loss sums [K] and the example count.

  The noise of example i at level k is drawn from fold_in(fold_in(VALIDATION_SEED, i), k)
  where i is the example's index in the validation stream (`batch['index']`), so the
  validation loss only depends on the parameters, whatever the batch layout.
  """
  levels = validation_levels(loss_cfg)

  def eval_step(params, batch):
    model = merge_model(graphdef, params, rest)
    fn = model_fn(model, train=False)
    base = jax.random.PRNGKey(VALIDATION_SEED)
    index = jnp.asarray(batch["index"]).astype(jnp.uint32)
    valid = jnp.asarray(batch.get("valid", jnp.ones(index.shape, bool)), jnp.float32)

    def at_level(k):
      keys = example_keys(jax.random.fold_in(base, k), index)
      x0, log_snr, noise, cond = noise_and_conditioning(batch, keys, loss_cfg, train=False,
                                                        fixed_log_snr=levels[k],
                                                        mask_cfg=training_masks(model))
      per_ex = losses.loss_at(fn, x0, log_snr, noise, objective=loss_cfg.objective,
                              weighting=loss_cfg.weighting,
                              min_snr_gamma=loss_cfg.min_snr_gamma, **cond)
      return jnp.sum(per_ex * valid)

    sums = jax.lax.map(at_level, jnp.arange(loss_cfg.val_levels))
    return sums, jnp.sum(valid)

  return eval_step


def step_key(root_rng, step):
  """The key of train step `step`: fold_in(root, step)."""
  return jax.random.fold_in(root_rng, step)

