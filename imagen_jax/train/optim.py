"""Optimizers, the learning-rate schedule and the EMA of the parameters.

Imagen (Saharia et al. 2022, appendix F) trains the base 64x64 model with Adafactor and the
super-resolution models with Adam, all at learning rate 1e-4 after a 10k-step linear
warm-up, and keeps an exponential moving average of the parameters (decay 0.9999) for
sampling; the experiments/imagen_*.gin files bind exactly that. Cosine decay after the
warm-up (`lr_schedule.decay_steps`) and global-norm gradient clipping
(`make_optimizer.clip_norm`) are available on top; the paper configs leave decay off.
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import optax

from imagen_jax.errors import UserError

OPTIMIZERS = ("adam", "adamw", "adafactor")
DEFAULT_OPTIMIZER = "adam"


@gin.configurable
def lr_schedule(step, *, peak_lr: float = 1e-4, warmup_steps: int = 10_000,
                decay_steps: int | None = None, end_lr_fraction: float = 0.0):
  """Linear warm-up from 0 to `peak_lr`, then cosine decay to `peak_lr * end_lr_fraction`.

  `decay_steps` counts the steps after the warm-up; None keeps the peak rate (no decay).
  Defined on a traced `step`, so it is exact for any step (no float drift across restarts).
  """
  step = jnp.asarray(step, jnp.float32)
  warm = peak_lr * jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1))
  if not decay_steps:
    return warm
  progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
  cosine = end_lr_fraction + (1 - end_lr_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup_steps, warm, peak_lr * cosine)


@gin.configurable
def make_optimizer(name: str = DEFAULT_OPTIMIZER, *, learning_rate=lr_schedule,
                   clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0,
                   adafactor_min_dim_size_to_factor: int = 128):
  """The optimizer named by `name`: "adam", "adamw" or "adafactor", after global-norm clipping.

  Imagen: Adafactor for the base model, Adam for super-resolution (the experiment gin files
  bind `make_optimizer.name`). `learning_rate` is a schedule (step -> lr) or a float.
  Returns (optax transformation, learning_rate) — the latter for logging.
  """
  if name == "adam":
    opt = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  elif name == "adamw":
    opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  elif name == "adafactor":
    # Adafactor's own update clipping stays on (threshold 1.0, Shazeer & Stern 2018 §5);
    # no momentum, as in the Imagen / T5 setups.
    opt = optax.adafactor(learning_rate,
                          min_dim_size_to_factor=adafactor_min_dim_size_to_factor,
                          weight_decay_rate=weight_decay or None)
  else:
    raise UserError(f"unknown optimizer {name!r}; set make_optimizer.name to one of "
                    f"{list(OPTIMIZERS)}")
  if clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
  return opt, learning_rate


def optimizer_name() -> str:
  """The name of the optimizer `make_optimizer()` builds under the current gin config:
  its `make_optimizer.name` binding, else the default. imagen-plan reports and plans it."""
  try:
    return gin.query_parameter("make_optimizer.name")
  except ValueError:  # not bound
    return DEFAULT_OPTIMIZER


def learning_rate_at(optimizer_lr, step):
  """The learning rate at `step` for a schedule or a constant (for logging)."""
  return optimizer_lr(step) if callable(optimizer_lr) else jnp.asarray(optimizer_lr)


@gin.configurable
def ema_decay(step, *, decay: float = 0.9999, warmup: bool = True):
  """EMA decay at `step`: min(decay, (1 + t) / (10 + t)) with warm-up, else `decay`.

  The warm-up (as in TensorFlow's ExponentialMovingAverage with num_updates) lets the average
  forget the random initialisation quickly in the first steps.
  """
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def ema_update(ema_params, params, decay):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf, in float32."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                      ema_params, params)
