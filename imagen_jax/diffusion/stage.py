"""One stage's sampling: (model_fn, settings, seeds, conditioning) -> images.

The one sampling path of the project: `imagen-sample`'s cascade (`StageSampler`) and the
trainer's preview grids both call `sample_stage` with a `SamplerSettings`, so a preview shows
exactly what `imagen-sample` gives for the same checkpoint, prompt, seed and settings.

Everything an image draws comes from its own integer seed: stage k uses
fold_in(key(seed), k), split into the keys of the initial noise, of the low-resolution
input's augmentation noise and of the sampler's per-step noise. So an image depends on its
seed and inputs only, never on the batch it is computed in.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import diffusion
from imagen_jax.diffusion import conditioning, masks
from imagen_jax.errors import UserError

SAMPLERS = diffusion.METHODS  # ("ddpm", "ddim", "dpmpp_2m")
THRESHOLDINGS = ("dynamic", "static", "none")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How one stage samples. A cascade's `Stage` carries these fields; the trainer's previews
  take `train.sample_method`, `train.sample_steps`, `train.guidance_scale` and the rest from
  gin (`preview/SamplerSettings.thresholding = 'static'`, ...).

  Attributes:
    sampler: "ddpm" (ancestral), "ddim" or "dpmpp_2m" (DPM-Solver++(2M)).
    num_steps: number of model evaluations (the grid is schedule(1 - i/num_steps) with its
      last point replaced by +inf, so the last step returns the denoised prediction).
    guidance_scale: classifier-free guidance weight (Imagen's w; 1 = no guidance).
    thresholding: "dynamic", "static" (clip x0 to [-1, 1]) or "none".
    percentile: dynamic thresholding percentile, in percent.
    aug_level: t_aug in [0, 1], the noise level of a super-resolution stage's low-resolution
      input (Imagen section 2.5); ignored by a base stage.
    eta: DDIM stochasticity (0 = deterministic DDIM, 1 = ancestral); only for "ddim".
    guidance_scale_end: None (a constant scale) or the scale of the last step, reached
      linearly over the steps from `guidance_scale` at the first.
    guidance_interval: None, or (lo, hi): classifier-free guidance only where lo <= log-SNR
      <= hi, the conditional model elsewhere (Kynkaanniemi et al. 2024).
    guidance_rescale: CFG rescale's phi in [0, 1] (Lin et al. 2024; 0 = off, 0.7 theirs).
    resample_steps: RePaint's resampling (Lugmayr et al. 2022) for "ddpm": each step taken
      this many times, noised back in between; harmonises inpainted regions (1 = none).
    lowres_start: a super-resolution stage's start time in (0, 1]. 1 starts from pure
      noise (Imagen). Below 1 it starts from the upsampled low-resolution image noised to
      that time, as SDEdit starts from its input (Meng et al. 2021): the stage then only
      refines, and a briefly trained SR model still returns a clean upsampling. A model
      trained with `LossConfig.max_time = T` has only seen t <= T: start there or below.
      Ignored by a base stage.
    classifier_scale: classifier guidance's scale s (Dhariwal & Nichol 2021, section 4:
      eps' = eps - s * sigma * grad log p(y | x_t)); 0 = off. With classifier-free
      guidance or without it (guidance_scale = 1, e.g. an unconditional model).
    classifier_dir: the MODEL_DIR of the noise-aware classifier (imagen-train with
      LossConfig.task = 'classifier'); each prompt's label comes from the classifier's
      label set (data/labels.py). Required when classifier_scale > 0.
  """
  sampler: str = "ddpm"
  num_steps: int = 256
  guidance_scale: float = 5.0
  thresholding: str = "dynamic"
  percentile: float = 99.5
  aug_level: float = 0.2
  eta: float = 0.0
  guidance_scale_end: float | None = None
  guidance_interval: tuple[float, float] | None = None
  guidance_rescale: float = 0.0
  resample_steps: int = 1
  lowres_start: float = 1.0
  classifier_scale: float = 0.0
  classifier_dir: str | None = None

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise UserError(f"sampler={self.sampler!r}; use one of {list(SAMPLERS)}")
    if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) \
        or self.num_steps < 1:
      raise UserError(f"num_steps={self.num_steps!r} must be a positive integer")
    if self.guidance_scale < 0:
      raise UserError(f"guidance_scale={self.guidance_scale} must be >= 0 (1 = no guidance)")
    if self.thresholding not in THRESHOLDINGS:
      raise UserError(f"thresholding={self.thresholding!r}; use one of {list(THRESHOLDINGS)}")
    if not 0.0 < self.percentile <= 100.0:
      raise UserError(f"percentile={self.percentile} must be in (0, 100] (percent; Imagen "
                      "uses 99.5)")
    if not 0.0 <= self.aug_level <= 1.0:
      raise UserError(f"aug_level={self.aug_level} must be a time in [0, 1] (Imagen uses "
                      "0.1-0.3)")
    if self.eta < 0 or (self.eta and self.sampler != "ddim"):
      raise UserError(f"eta={self.eta} applies only to sampler='ddim' and must be >= 0")
    if self.guidance_scale_end is not None and self.guidance_scale_end < 0:
      raise UserError(f"guidance_scale_end={self.guidance_scale_end} must be >= 0 or None")
    interval = self.guidance_interval
    if interval is not None and (len(interval) != 2 or not interval[0] < interval[1]):
      raise UserError(f"guidance_interval={interval!r} must be (lo, hi) log-SNRs with lo < hi, "
                      "or None")
    if isinstance(self.resample_steps, bool) or not isinstance(self.resample_steps, int) \
        or self.resample_steps < 1 or (self.resample_steps > 1 and self.sampler != "ddpm"):
      raise UserError(f"resample_steps={self.resample_steps!r} must be a positive integer, "
                      "and > 1 only with sampler='ddpm'")
    if not 0.0 <= self.guidance_rescale <= 1.0:
      raise UserError(f"guidance_rescale={self.guidance_rescale} must be in [0, 1]")
    if not 0.0 < self.lowres_start <= 1.0:
      raise UserError(f"lowres_start={self.lowres_start} must be a time in (0, 1] (1 = from "
                      "pure noise)")
    if not self.classifier_scale >= 0.0:
      raise UserError(f"classifier_scale={self.classifier_scale} must be >= 0 (0 = no "
                      "classifier guidance)")
    if self.classifier_scale > 0 and not self.classifier_dir:
      raise UserError(f"classifier_scale={self.classifier_scale} needs classifier_dir, the "
                      "MODEL_DIR of a classifier trained by imagen-train "
                      "(LossConfig.task = 'classifier')")

  @property
  def stochastic(self) -> bool:
    return self.sampler == "ddpm" or (self.sampler == "ddim" and self.eta > 0)

  def record(self, is_sr: bool) -> dict:
    """The settings recorded in index.jsonl."""
    out = {"method": self.sampler, "num_steps": self.num_steps,
           "guidance_scale": float(self.guidance_scale), "thresholding": self.thresholding}
    if self.thresholding == "dynamic":
      out["percentile"] = float(self.percentile)
    if self.sampler == "ddim":
      out["eta"] = float(self.eta)
    if is_sr:
      out["aug_level"] = float(self.aug_level)
    if self.guidance_scale_end is not None:
      out["guidance_scale_end"] = float(self.guidance_scale_end)
    if self.guidance_interval is not None:
      out["guidance_interval"] = [float(v) for v in self.guidance_interval]
    if self.guidance_rescale:
      out["guidance_rescale"] = float(self.guidance_rescale)
    if self.resample_steps > 1:
      out["resample_steps"] = self.resample_steps
    if is_sr and self.lowres_start < 1.0:
      out["lowres_start"] = float(self.lowres_start)
    if self.classifier_scale > 0:
      out["classifier_scale"] = float(self.classifier_scale)
      out["classifier_dir"] = str(self.classifier_dir)
    return out

  def guidance(self, model_fn, grid):
    """model_fn with classifier-free guidance as these settings ask, over `grid`."""
    scale = self.guidance_scale
    if self.guidance_scale_end is not None:
      # Linear over the model calls at grid[0 .. N-1], as a function of their log-SNR.
      scales = np.linspace(self.guidance_scale, self.guidance_scale_end, self.num_steps)
      calls = jnp.asarray(grid[:-1])
      scale = lambda log_snr: jnp.interp(log_snr, calls, jnp.asarray(scales, jnp.float32))
    return diffusion.classifier_free_guidance(model_fn, scale,
                                              interval=self.guidance_interval,
                                              rescale=self.guidance_rescale)

  def x0_transform(self):
    """The thresholding of x0_hat (Imagen section 2.3), or None."""
    if self.thresholding == "dynamic":
      return lambda x0: diffusion.dynamic_threshold(x0, self.percentile)
    if self.thresholding == "static":
      return diffusion.static_threshold
    return None


def sampling_grid(schedule: str, num_steps: int) -> np.ndarray:
  """The log-SNR grid of `num_steps` model evaluations: schedule(1 - i/num_steps) for
  i < num_steps, then +inf, so that the last step returns x0_hat (as k-diffusion ends at
  sigma = 0)."""
  with jax.ensure_compile_time_eval():  # a constant of the program, also under jit
    grid = np.asarray(diffusion.log_snr_grid(diffusion.get_schedule(schedule), num_steps))
  return np.concatenate([grid[:-1], [np.inf]]).astype(np.float32)


@jax.jit
def _image_seeds(root_seed, prompt_index, sample):
  def one(p, s):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(root_seed), p), s)
    return jax.random.bits(key, dtype=jnp.uint32)
  return jax.vmap(one)(prompt_index, sample)


def image_seeds(root_seed: int, prompt_index, sample) -> list[int]:
  """The integer seed of each image: 32 random bits of
  fold_in(fold_in(key(root_seed), prompt_index), sample). Stage k of that image uses
  fold_in(key(image seed), k)."""
  if not 0 <= int(root_seed) < 2**32:
    raise UserError(f"seed={root_seed} must be in [0, 2**32)")
  p = np.asarray(prompt_index, np.int32)
  s = np.asarray(sample, np.int32)
  if p.size == 0:
    return []
  return [int(x) for x in np.asarray(_image_seeds(np.uint32(root_seed), p, s))]


def stage_keys(seeds, stage_index: int):
  """Per-example keys (initial noise, augmentation noise, sampler noise), each [B], from
  the images' integer seeds [B] and the stage index."""
  keys = jax.vmap(lambda s: jax.random.split(
      jax.random.fold_in(jax.random.key(s), stage_index), 3))(jnp.asarray(seeds, jnp.uint32))
  return keys[:, 0], keys[:, 1], keys[:, 2]


def sdedit_start(strength, num_steps: int):
  """The grid index where SDEdit (Meng et al. 2021) starts for strength in (0, 1]: the step
  whose time t = 1 - i/N is nearest `strength`, at most N - 1 (one step at least);
  strength 1 starts at 0, from pure noise."""
  k = jnp.round((1.0 - jnp.asarray(strength, jnp.float32)) * num_steps).astype(jnp.int32)
  return jnp.clip(k, 0, num_steps - 1)


def sample_stage(model_fn, settings: SamplerSettings, info, seeds, stage_index: int, *,
                 text_emb, text_mask, lowres=None, aug_level=None, negative_emb=None,
                 negative_mask=None, image=None, mask=None, strength=None,
                 classifier=None):
  """Samples one stage of the cascade for a batch; pure and jittable.

  Args:
    model_fn: model_fn(x_t, log_snr [B], *, text_emb, text_mask, lowres=None,
      lowres_log_snr=None) -> prediction of `info.objective`.
    settings: the sampler settings.
    info: the model description (`train.checkpoint.ModelInfo`): image_size, channels,
      objective, schedule, aug_schedule, lowres_resize.
    seeds: uint32 [B], one integer seed per image; stage_index: this stage's index.
    text_emb, text_mask: [B, L, D] and [B, L] caption embeddings.
    lowres: uint8 [B, s, s, C], a super-resolution stage's input (noise conditioning
      augmentation at `settings.aug_level`, as in training), or None for a base stage.
    aug_level: overrides `settings.aug_level`; may be a traced scalar, so that one compiled
      program serves every level.
    negative_emb, negative_mask: per-example negative prompts for the unconditional half of
      classifier-free guidance (zeros and all-false = no negative prompt).
    image, mask: inpainting at this stage's size: image float [B, H, W, C] in [-1, 1] and
      mask [B, H, W, 1], 1 where regenerated and 0 where `image` is kept (GLIDE). The
      known region is replaced at every step; an inpainting model (`info.inpaint_channels`
      > 0, which needs them) also takes image * (1 - mask) and the mask as input, in both
      halves of classifier-free guidance.
    strength: SDEdit, float [B] in (0, 1]: start from `image` noised to that time (1 =
      from pure noise, the plain sample).
    classifier: None or (log_prob_fn(x_t, log_snr) -> [B], scale): classifier guidance
      (Dhariwal & Nichol 2021) on top of classifier-free guidance; `classifier_log_prob`
      makes log_prob_fn from a noise-aware classifier and each example's label.

  Returns:
    float32 [B, H, W, C] in [-1, 1] (unclipped); `conditioning.to_uint8_image` quantises.
  """
  max_time = float(info.max_time)
  start_time = settings.lowres_start if lowres is not None else 1.0
  if start_time > max_time + 1e-6:
    fix = (f"set its Stage.lowres_start to {max_time:g} or less" if lowres is not None else
           "a base stage starts from pure noise (t = 1): train it with LossConfig.max_time = 1")
    raise UserError(f"this {info.image_size}px stage was trained on t <= {max_time:g} "
                    f"(LossConfig.max_time) but would start sampling at t = {start_time:g}: "
                    + fix)
  k_init, k_aug, k_sampler = stage_keys(seeds, stage_index)
  size, channels = int(info.image_size), int(info.channels)
  noise = jax.vmap(lambda k: jax.random.normal(k, (size, size, channels)))(k_init)
  grid = sampling_grid(info.schedule, settings.num_steps)
  cond = {"text_emb": text_emb, "text_mask": text_mask}
  start_image = image
  if info.inpaint_channels:
    if mask is None or image is None:
      raise UserError("this stage's model is an inpainting model (inpaint_channels="
                      f"{info.inpaint_channels}): give an image and a mask to inpaint")
    cond["inpaint"] = masks.inpaint_input(image, mask)
  if negative_emb is not None:
    cond.update(negative_text_emb=negative_emb, negative_text_mask=negative_mask)
  if lowres is not None:
    t_aug = settings.aug_level if aug_level is None else aug_level
    aug_log_snr = diffusion.get_schedule(info.aug_schedule)(jnp.asarray(t_aug, jnp.float32))
    lowres = conditioning.to_float_image(lowres)
    cond.update(conditioning.augment_lowres(lowres, size, info.lowres_resize, aug_log_snr,
                                            k_aug))
    if settings.lowres_start < 1.0 and strength is None:
      # Start from the (clean) upsampled low-resolution image noised to lowres_start.
      start_image = conditioning.upsample(lowres, size, "bilinear")
      strength = jnp.full(lowres.shape[:1], settings.lowres_start, jnp.float32)
  guided = settings.guidance(model_fn, grid)
  if classifier is not None:
    guided = diffusion.classifier_guidance(guided, classifier[0], classifier[1],
                                           objective=info.objective)
  x0_transform = settings.x0_transform()
  if mask is not None:
    x0_transform = diffusion.inpaint_transform(image, mask, x0_transform)
  x_init, start = noise, None
  if strength is not None:
    start = sdedit_start(strength, settings.num_steps)
    noised = diffusion.q_sample(start_image, jnp.asarray(grid)[start], noise)
    x_init = jnp.where((start == 0)[:, None, None, None], noise, noised)
  return diffusion.sample(lambda x, log_snr: guided(x, log_snr, **cond), x_init,
                          jnp.asarray(grid), method=settings.sampler,
                          rng=k_sampler if settings.stochastic else None,
                          objective=info.objective, x0_transform=x0_transform,
                          eta=settings.eta, start_index=start,
                          resample_steps=settings.resample_steps)


def classifier_log_prob(classifier_fn, labels):
  """log p(y | x_t) of a noise-aware classifier for `sample_stage`'s `classifier`:
  classifier_fn(x_t, log_snr [B]) -> logits [B, K], labels int [B] (each example's own
  class y) -> log_prob_fn(x_t, log_snr) = log_softmax(logits)[y], [B] (Dhariwal & Nichol
  2021, algorithm 1 and eq. 14: the gradient of this is what guidance adds)."""
  labels = jnp.asarray(labels, jnp.int32)

  def log_prob(x, log_snr):
    logp = jax.nn.log_softmax(classifier_fn(x, log_snr).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  return log_prob
