"""The sampling cascade: prompts -> base stage -> super-resolution stages -> images.

A cascade is a list of stages (Imagen, Saharia et al. 2022, section 2.4: a 64x64 base model
and super-resolution models to 256 and 1024). Each `Stage` names its checkpoint and its
sampler settings; `load_cascade` loads them into a `Cascade`, which a notebook calls:

  cascade = Cascade.from_config("runs/sample.gin")            # or load_cascade([Stage(...)])
  images = cascade(["a red circle"], num_samples=4, seed=0)   # list: one array per stage
  images[-1].shape                                            # [1, 4, H, W, 3] uint8

How it runs:
- Every image has its own integer seed, `image_seeds(seed, prompt_index, sample)`: the
  prompt index and sample index folded into the root seed. Each stage samples with
  `stage.sample_stage`, the one stage-sampling function (guidance, the log-SNR grid,
  thresholding, noise conditioning augmentation of the low-resolution input, every draw
  from fold_in(key(image seed), k)). So an image depends on its seed and prompt only: a
  rerun, another batch size, padding or another number of processes gives identical
  images, and `cascade.reproduce(prompt, seed)` regenerates any row of index.jsonl.
- Each stage's whole sampling loop (up to the conversion to uint8) is one jitted program
  for one batch shape; the last batch is padded (with copies of its last item, whose
  outputs are dropped), so there is no recompilation between batches. Batches are sharded
  over the ('data', 'fsdp') axes of a mesh over this process's devices, and the batch size
  is rounded up to a multiple of their number.
- Stages run one after the other over all images. What a stage produces goes to a sink:
  memory for the notebook call, or an output directory (`sample_to_dir`) where existing
  images are skipped, so a killed job resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from imagen_jax.data import labels as labels_lib
from imagen_jax.diffusion import conditioning
from imagen_jax.errors import UserError
from imagen_jax.nn import clip as clip_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.sample import output
from imagen_jax.diffusion import stage as stage_lib
from imagen_jax.diffusion.stage import SAMPLERS, THRESHOLDINGS, image_seeds  # noqa: F401
# Imported here, not lazily: it registers gin configurables, which gin refuses once a
# CLI has parsed (and locked) its config.
from imagen_jax.train import checkpoint
from imagen_jax.train import noised_clip
from imagen_jax.train import step as step_lib
from imagen_jax.text import vocab as vocab_lib


# ---------------------------------------------------------------------------------------
# Configuration.


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Stage(stage_lib.SamplerSettings):
  """One stage of the cascade: a checkpoint and how to sample from it (the inherited
  `SamplerSettings` fields).

  Defaults follow Imagen where the paper gives them:
  - thresholding: dynamic, percentile 99.5 (section 2.3 and appendix; Saharia et al. found
    it best with large guidance weights). Configs for the shapes data override it with
    `static`: there, white backgrounds sit at the clipping edge, and dynamic thresholding's
    rescaling greys them out (docs/sample.md);
  - guidance_scale: Imagen sweeps guidance weights 1-10 for the base model (figure 4) and
    uses large weights with dynamic thresholding; 5.0 is a middle value of that sweep
    (1.0 = no guidance, 0.0 = unconditional);
  - aug_level: the forward-process time t_aug of the low-resolution input's noise at sampling
    (section 2.5; Imagen reports 0.1-0.3 working well). 0.2 here; ignored by a base stage.

  Attributes:
    model_dir: a MODEL_DIR written by imagen-train (local or gs://).
    step: checkpoint step to load; None = the latest.
    use_ema: load the EMA parameters (the default, as Imagen samples from EMA weights).
    sampler, num_steps, guidance_scale, thresholding, percentile, aug_level, eta: see
      `SamplerSettings` (diffusion/stage.py); the property `sampling` gives them alone.
    batch_size: images per batch for this stage; None = the cascade's batch size.
  """
  model_dir: str = ""
  step: int | None = None
  use_ema: bool = True
  batch_size: int | None = None

  def __post_init__(self):
    if not isinstance(self.model_dir, (str, os.PathLike)) or not os.fspath(self.model_dir):
      raise UserError(f"Stage.model_dir={self.model_dir!r}: give the stage's MODEL_DIR "
                      "(written by imagen-train)")
    if self.step is not None and (not isinstance(self.step, int) or self.step < 0):
      raise UserError(f"Stage.step={self.step!r} must be a checkpoint step or None (latest)")
    if self.batch_size is not None and (not isinstance(self.batch_size, int)
                                        or self.batch_size < 1):
      raise UserError(f"Stage.batch_size={self.batch_size!r} must be a positive integer")
    try:
      super().__post_init__()
    except UserError as e:
      raise UserError(f"Stage.{e}") from None

  @property
  def sampling(self) -> stage_lib.SamplerSettings:
    """The stage's sampler settings alone."""
    names = [f.name for f in dataclasses.fields(stage_lib.SamplerSettings)]
    return stage_lib.SamplerSettings(**{n: getattr(self, n) for n in names})


@dataclasses.dataclass
class LoadedGuide:
  """A stage's noise-aware classifier for classifier guidance (`Stage.classifier_dir`),
  with the label set that turns prompts into its classes."""
  model: nnx.Module
  info: checkpoint.ModelInfo
  label_set: labels_lib.LabelSet

  def prompt_labels(self, prompts: Sequence[str]) -> np.ndarray:
    """int32 [len(prompts)]; UserError naming the first prompt without a label."""
    return np.array([self.label_set.prompt_label(p) for p in prompts], np.int32)

  @staticmethod
  def log_prob_fn(model, labels):
    """log p(y | x_t) = log_softmax(model(x_t, log_snr))[y] (`model`: the merged
    classifier inside the sampling program)."""
    return stage_lib.classifier_log_prob(lambda x, log_snr: model(x, log_snr), labels)


@dataclasses.dataclass
class ClipGuide:
  """A noised CLIP as a stage's guide (GLIDE, Nichol et al. 2021, section 2.4), written by
  `python -m imagen_jax.train.noised_clip`: log p = exp(logit_scale) * cos(f(x_t),
  g(prompt)), f the image tower trained on noised images, g the frozen text tower. Its
  gradient goes through the same `classifier_guidance` hook as a classifier's."""
  model: nnx.Module
  info: dict
  vocab: Any

  def prompt_labels(self, prompts: Sequence[str]) -> np.ndarray:
    """float32 [len(prompts), P]: each prompt's normalised text embedding."""
    tokens = vocab_lib.tokenize(self.vocab, list(prompts), int(self.info["max_length"]))
    if tokens.truncated:
      raise UserError(f"prompt {prompts[tokens.truncated[0]]!r} is longer than the CLIP "
                      f"guide's {self.info['max_length']} tokens; shorten it")
    emb = self.model.encode_text(jnp.asarray(tokens.ids, jnp.int32))
    return np.asarray(clip_lib.normalize(emb), np.float32)

  @staticmethod
  def log_prob_fn(model, text):
    def log_prob(x, log_snr):
      del log_snr  # the image tower reads the noise level from x_t (not time-conditioned)
      image = clip_lib.normalize(model.encode_image(x.astype(jnp.float32)))
      return jnp.exp(model.logit_scale[...]) * jnp.sum(image * text, axis=-1)
    return log_prob


def load_guide(config: Stage, image_size: int, *, mesh=None) -> LoadedGuide | ClipGuide:
  """The guide of `config.classifier_dir`: a noise-aware classifier (EMA parameters) or a
  noised CLIP (`train/noised_clip.py`), checked to take this stage's images."""
  path = epath.Path(config.classifier_dir)
  if (path / noised_clip.INFO_FILE).exists():
    info = json.loads((path / noised_clip.INFO_FILE).read_text())
    model = clip_lib.load_clip(path / "noised")
    if model.config.vision.image_size != image_size:
      raise UserError(f"the CLIP guide in {os.fspath(path)!r} takes "
                      f"{model.config.vision.image_size}px images but the stage samples "
                      f"{image_size}px")
    return ClipGuide(model, info, vocab_lib.load_vocabulary(path / "spiece.model"))
  if not (path / "model.json").exists():
    raise UserError(f"Stage.classifier_dir={os.fspath(path)!r} is not a MODEL_DIR written "
                    "by imagen-train (no model.json); train one with "
                    "--gin_file=experiments/quickstart_classifier.gin")
  model, info = checkpoint.load_for_inference(path, mesh=mesh)
  if info.num_classes is None or not info.labels:
    raise UserError(f"Stage.classifier_dir={os.fspath(path)!r} holds a {info.model_class}, "
                    "not a classifier (LossConfig.task = 'classifier')")
  if int(info.image_size) != image_size:
    raise UserError(f"the classifier in {os.fspath(path)!r} classifies {info.image_size}px "
                    f"images but the stage samples {image_size}px; train it at the stage's "
                    "size")
  return LoadedGuide(model, info, labels_lib.get_label_set(info.labels))


@dataclasses.dataclass
class LoadedStage:
  """A stage with its model and checkpoint description (`load_for_inference`'s
  `ModelInfo`), and its classifier when it uses classifier guidance."""
  config: Stage
  model: nnx.Module
  info: checkpoint.ModelInfo
  guide: LoadedGuide | ClipGuide | None = None

  @property
  def image_size(self) -> int:
    return int(self.info.image_size)

  @property
  def lowres_size(self) -> int | None:
    return self.info.lowres_size

  @property
  def is_sr(self) -> bool:
    return self.lowres_size is not None

  @property
  def name(self) -> str:
    return os.fspath(self.config.model_dir)

  def settings(self) -> dict:
    out = self.config.sampling.record(self.is_sr)
    out.update(model_dir=self.name, use_ema=self.config.use_ema,
               objective=self.info.objective, schedule=self.info.schedule)
    if self.info.step is not None:
      out["step"] = int(self.info.step)
    if self.is_sr:
      out["aug_schedule"] = self.info.aug_schedule
    return out


def load_stage(config: Stage, *, mesh=None) -> LoadedStage:
  """Loads a stage's model from its MODEL_DIR (EMA parameters unless use_ema=False)."""
  model_dir = epath.Path(config.model_dir)
  if not model_dir.exists():
    raise UserError(f"checkpoint directory {os.fspath(model_dir)!r} does not exist; set the "
                    "stage's model_dir to a MODEL_DIR written by imagen-train")
  try:
    model, info = checkpoint.load_for_inference(model_dir, step=config.step,
                                                use_ema=config.use_ema, mesh=mesh)
  except FileNotFoundError as e:
    raise UserError(f"no checkpoint in {os.fspath(model_dir)!r} ({e}); point the stage at "
                    "a MODEL_DIR written by imagen-train") from e
  guide = (load_guide(config, int(info.image_size), mesh=mesh)
           if config.classifier_scale > 0 else None)
  return LoadedStage(config, model, info, guide)


# ---------------------------------------------------------------------------------------
# Seeds and work items.


@dataclasses.dataclass(frozen=True)
class WorkItem:
  """One image of the cascade: prompt `prompt_index`, sample `sample`, its integer seed."""
  prompt_index: int
  sample: int
  seed: int


def work_items(num_prompts: int, num_samples: int, seed: int) -> list[WorkItem]:
  """All images, prompt-major: (0, 0), (0, 1), ..., (1, 0), ..."""
  pairs = [(p, s) for p in range(num_prompts) for s in range(num_samples)]
  seeds = image_seeds(seed, [p for p, _ in pairs], [s for _, s in pairs])
  return [WorkItem(p, s, x) for (p, s), x in zip(pairs, seeds)]


def process_share(items: Sequence[WorkItem], process_index: int,
                  process_count: int) -> list[WorkItem]:
  """This process's items when several processes share the work: every
  process_count-th item, so each process gets a near-equal share of every prompt range."""
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index={process_index} must be in [0, {process_count})")
  return list(items[process_index::process_count])


# ---------------------------------------------------------------------------------------
# Edits.


@dataclasses.dataclass(frozen=True, eq=False)
class Edit:
  """What to do with one prompt's images besides plain text-to-image sampling.

  Attributes:
    image: uint8 [H, W, 3], the image to inpaint or to start from.
    mask: [H, W] or [H, W, 3] (bool or uint8): white / nonzero where the image is
      regenerated, black / zero where it is kept (GLIDE inpainting, at every stage).
    strength: SDEdit (Meng et al. 2021) in (0, 1]: the base stage starts from `image`
      noised to this time; 1 = from pure noise.
    negative_prompt: its embedding fills the unconditional half of classifier-free
      guidance instead of the empty caption.
    source: what index.jsonl records of the edit's files (e.g. their paths).
  """
  image: np.ndarray | None = None
  mask: np.ndarray | None = None
  strength: float | None = None
  negative_prompt: str | None = None
  source: dict | None = None

  def __post_init__(self):
    if self.image is not None:
      image = np.asarray(self.image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise UserError(f"edit images must be uint8 [H, W, 3]; got {image.dtype} "
                        f"{image.shape}")
    if (self.mask is not None or self.strength is not None) and self.image is None:
      raise UserError("an edit with a mask or a strength needs its image")
    if self.mask is not None and np.shape(self.mask)[:2] != np.shape(self.image)[:2]:
      raise UserError(f"mask of size {np.shape(self.mask)[:2]} for an image of size "
                      f"{np.shape(self.image)[:2]}; give a mask of the image's size")
    if self.strength is not None and not 0.0 < float(self.strength) <= 1.0:
      raise UserError(f"strength={self.strength} must be in (0, 1] (1 = from pure noise)")

  def record(self) -> dict:
    """The edit's fields for index.jsonl."""
    out = dict(self.source or {})
    if self.strength is not None:
      out["strength"] = float(self.strength)
    if self.negative_prompt is not None:
      out["negative_prompt"] = self.negative_prompt
    if self.mask is not None:
      out["inpaint"] = True
    return out

  def mask_at(self, size: int) -> np.ndarray:
    """float32 [size, size, 1]: 1 where regenerated. A pixel any of whose source pixels is
    regenerated is regenerated (the known region only shrinks)."""
    if self.mask is None:
      return np.ones((size, size, 1), np.float32)
    m = np.asarray(self.mask)
    m = (m.mean(axis=-1) if m.ndim == 3 else m).astype(np.float32) > (
        0.5 if m.dtype == bool else 127.5)
    fitted = output.fit_image(np.repeat((m * 255).astype(np.uint8)[..., None], 3, -1), size)
    return (fitted[..., :1] > 0).astype(np.float32)

  def image_at(self, size: int) -> np.ndarray:
    """float32 [size, size, 3] in [-1, 1]: the image centre-cropped and resized to size."""
    if self.image is None:
      return np.zeros((size, size, 3), np.float32)
    return np.asarray(conditioning.to_float_image(output.fit_image(self.image, size)))


EDIT_KEYS = ("prompt", "image", "mask", "strength", "negative_prompt")


def load_edits(path) -> tuple[list[str], list[Edit]]:
  """An edits file: JSON lines with `prompt` and optional `image`, `mask`, `strength`,
  `negative_prompt`; file paths relative to the edits file. -> (prompts, edits)."""
  path = epath.Path(path)
  if not path.exists():
    raise UserError(f"edits file {os.fspath(path)!r} does not exist")
  prompts, edits = [], []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    where = f"{os.fspath(path)} line {n}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{where} is not JSON ({e.msg}); write one JSON object per line") from None
    unknown = sorted(set(record) - set(EDIT_KEYS)) if isinstance(record, dict) else []
    if not isinstance(record, dict) or "prompt" not in record or unknown:
      raise UserError(f"{where}: give an object with \"prompt\" and optional keys "
                      f"{list(EDIT_KEYS[1:])}" + (f"; unknown: {unknown}" if unknown else ""))
    images = {k: read_edit_image(path.parent / record[k], where) for k in ("image", "mask")
              if record.get(k) is not None}
    try:
      edits.append(Edit(image=images.get("image"), mask=images.get("mask"),
                        strength=record.get("strength"),
                        negative_prompt=record.get("negative_prompt"),
                        source={k: record[k] for k in ("image", "mask") if k in images}))
    except UserError as e:
      raise UserError(f"{where}: {e}") from None
    prompts.append(str(record["prompt"]))
  if not prompts:
    raise UserError(f"edits file {os.fspath(path)} holds no edits; one JSON object per line")
  return prompts, edits


def read_edit_image(path, where: str = "") -> np.ndarray:
  """An edit's image or mask file as uint8 [H, W, 3]; a missing file is a UserError."""
  if not epath.Path(path).exists():
    raise UserError(f"{where + ': ' if where else ''}image file {os.fspath(path)!r} does "
                    "not exist")
  return output.read_image(path)


def make_edits(num_prompts: int, *, init_images=None, masks=None, strength=None,
               negative_prompts=None) -> list[Edit] | None:
  """One `Edit` per prompt from per-prompt lists (or one strength / negative prompt for
  all); None when nothing is edited."""
  if all(v is None for v in (init_images, masks, strength, negative_prompts)):
    return None

  def per_prompt(value, name, scalar_types):
    if value is None or isinstance(value, scalar_types):
      return [value] * num_prompts
    value = list(value)
    if len(value) != num_prompts:
      raise UserError(f"{len(value)} {name} for {num_prompts} prompts; give one per prompt")
    return value

  images = per_prompt(init_images, "init_images", ())
  return [Edit(image=i, mask=m, strength=s, negative_prompt=n) for i, m, s, n in zip(
      images, per_prompt(masks, "masks", ()), per_prompt(strength, "strengths", (int, float)),
      per_prompt(negative_prompts, "negative_prompts", (str,)))]


# ---------------------------------------------------------------------------------------
# Text.


class PromptEncoder:
  """Prompts -> (text_emb float32 [N, L, D], text_mask bool [N, L]).

  Prompts in the embedding cache are read from it; the others go through the T5 encoder.
  Encoder outputs are rounded to bfloat16, the precision of the cache that training read
  (DESIGN.md section 3), so a prompt gives the same embedding from either source.
  """

  def __init__(self, encoder=None, cache=None):
    if encoder is None and cache is None:
      raise UserError("no text encoder and no embedding cache: configure "
                      "load_cascade.text_encoder (text_encoder.t5_path) or pass --cache_dir")
    self.encoder = encoder
    self.cache = cache
    self._warned: set[str] = set()

  @property
  def identity(self) -> dict:
    if self.encoder is not None:
      return dict(self.encoder.identity)
    return dict(self.cache.manifest["encoder"])

  @property
  def max_length(self) -> int:
    return int(self.identity["max_length"])

  def check_stage(self, stage: LoadedStage, index: int) -> None:
    """The stage must have been trained with this encoder (same weights, vocabulary and
    length; the `name`, often a path, may differ)."""
    trained = stage.info.encoder
    if not trained:
      logging.warning("stage %d (%s) records no text encoder; cannot check that prompts are "
                      "encoded as in training", index, stage.name)
      return
    mine = self.identity
    keys = sorted((set(trained) & set(mine)) - {"name"})
    diffs = [f"{k}: {trained[k]!r} in training, {mine[k]!r} now" for k in keys
             if trained[k] != mine[k]]
    if diffs:
      raise UserError(f"stage {index} ({stage.name}) was trained with another text encoder ("
                      + "; ".join(diffs) + "); configure text_encoder.t5_path / "
                      "text_encoder.max_length (or --cache_dir) to the T5 checkpoint and "
                      "settings the stage was trained with")
    if self.cache is not None:
      self.cache.check_compatible(trained)
    text_dim = stage.info.text_dim
    if int(text_dim) != int(mine["d_model"]):
      raise UserError(f"stage {index} ({stage.name}) takes text width {text_dim}, but the "
                      f"text encoder gives {mine['d_model']}")

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    n, length = len(prompts), self.max_length
    cached = [i for i, p in enumerate(prompts) if self.cache is not None and p in self.cache]
    fresh = sorted(set(range(n)) - set(cached))
    if fresh and self.encoder is None:
      missing = [prompts[i] for i in fresh[:3]]
      raise UserError(f"prompt(s) {missing} are not in the embedding cache and no text "
                      "encoder is configured; add them with imagen-embed or configure "
                      "text_encoder.t5_path")
    emb = mask = None
    if cached:
      e, m = self.cache.get_batch([prompts[i] for i in cached], length)
      emb = np.zeros((n, length, e.shape[-1]), np.float32)
      mask = np.zeros((n, length), bool)
      emb[cached], mask[cached] = np.asarray(e, np.float32), m
    if fresh:
      texts = [prompts[i] for i in fresh]
      if hasattr(self.encoder, "encode_with_info"):
        e, m, truncated = self.encoder.encode_with_info(texts)
      else:
        (e, m), truncated = self.encoder.encode(texts), []
      for i in truncated:
        if texts[i] in self._warned:
          continue
        self._warned.add(texts[i])
        logging.warning("prompt %r is longer than the text encoder's %d tokens and was "
                        "truncated", texts[i], self.max_length)
      e = np.asarray(jnp.asarray(e, jnp.bfloat16).astype(jnp.float32))
      if emb is None:
        emb = np.zeros((n, length, e.shape[-1]), np.float32)
        mask = np.zeros((n, length), bool)
      emb[fresh], mask[fresh] = e, m
    return emb, mask


# ---------------------------------------------------------------------------------------
# One stage's sampling program.


def _default_mesh(devices):
  return mesh_lib.make_mesh(None, devices=devices)


class StageSampler:
  """The compiled sampling loop of one stage, for one batch size.

  `__call__(seeds uint32 [B], text_emb, text_mask, lowres uint8 [B, s, s, 3] | None)`
  -> uint8 [B, H, W, 3]. `jitted._cache_size()` counts its compilations.
  """

  def __init__(self, stage: LoadedStage, stage_index: int, mesh, batch_size: int):
    self.stage, self.stage_index, self.mesh = stage, stage_index, mesh
    self.batch_size = batch_size
    graphdef, state = nnx.split(stage.model)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Sampling replicates the weights: every device runs the full model on its batch rows.
    self.state = jax.device_put(state, replicated)
    self.batch_sharding = lambda ndim: mesh_lib.batch_sharding(mesh, ndim)

    settings, info = stage.config.sampling, stage.info
    self.guide_state = guide_graphdef = None
    if stage.guide is not None:
      guide_graphdef, guide_state = nnx.split(stage.guide.model)
      self.guide_state = jax.device_put(guide_state, replicated)

    def sample(state, seeds, text_emb, text_mask, lowres, aug_level, edit, guide_state,
               labels):
      model_fn = step_lib.model_fn(nnx.merge(graphdef, state), train=False)
      classifier = None
      if guide_state is not None:
        guide = nnx.merge(guide_graphdef, guide_state)
        classifier = (stage.guide.log_prob_fn(guide, labels), settings.classifier_scale)
      x = stage_lib.sample_stage(model_fn, settings, info, seeds, stage_index,
                                 text_emb=text_emb, text_mask=text_mask, lowres=lowres,
                                 aug_level=aug_level, classifier=classifier,
                                 **(edit or {}))
      return conditioning.to_uint8_image(x)

    self.jitted = jax.jit(sample, out_shardings=self.batch_sharding(4))

  def __call__(self, seeds, text_emb, text_mask, lowres=None, edit=None,
               labels=None) -> jax.Array:
    """Dispatches one batch (asynchronously); all inputs have batch_size rows. `edit`: None
    or a dict of `sample_stage`'s editing arrays (negative_emb, negative_mask, image, mask,
    strength), each with batch_size rows. `labels`: int [B], each row's class for the
    stage's classifier guidance (required exactly when the stage has a classifier)."""
    if (labels is None) != (self.guide_state is None):
      raise UserError("a stage with a classifier needs one label per row, and only such "
                      "a stage takes labels")
    put = lambda x: jax.device_put(x, self.batch_sharding(np.ndim(x)))
    args = [put(np.asarray(seeds, np.uint32)), put(np.asarray(text_emb, np.float32)),
            put(np.asarray(text_mask, bool))]
    args.append(None if lowres is None else put(np.asarray(lowres, np.uint8)))
    # An argument, not a constant: stages that differ only in aug_level share one program.
    args.append(np.float32(self.stage.config.aug_level))
    args.append(None if edit is None else {k: put(np.asarray(v)) for k, v in edit.items()})
    args += [self.guide_state, None if labels is None else put(np.asarray(labels))]
    with jax.set_mesh(self.mesh):
      return self.jitted(self.state, *args)


# ---------------------------------------------------------------------------------------
# Where images go.


class Sink(Protocol):
  def has(self, stage: int, item: WorkItem) -> bool: ...
  def read(self, stage: int, item: WorkItem) -> np.ndarray: ...
  def write(self, stage: int, item: WorkItem, image: np.ndarray) -> None: ...
  def record(self, rows: Sequence[dict]) -> None: ...


class MemorySink:
  """Keeps images in a dict; what the notebook call returns."""

  def __init__(self):
    self.images: dict[tuple[int, int, int], np.ndarray] = {}

  def has(self, stage, item):
    return (stage, item.prompt_index, item.sample) in self.images

  def read(self, stage, item):
    return self.images[(stage, item.prompt_index, item.sample)]

  def write(self, stage, item, image):
    self.images[(stage, item.prompt_index, item.sample)] = np.asarray(image)

  def record(self, rows):
    del rows


class DirectorySink:
  """PNGs under out_dir (written atomically) and rows in index.jsonl.

  An image whose PNG exists is never recomputed nor overwritten: a rerun resumes.
  """

  def __init__(self, out_dir, process_index: int = 0, process_count: int = 1):
    self.out_dir = epath.Path(out_dir)
    self.index = output.IndexWriter(self.out_dir, process_index, process_count)
    self._listed: dict[int, set[str]] = {}

  def _path(self, stage, item) -> epath.Path:
    return self.out_dir / output.image_file(stage, item.prompt_index, item.sample)

  def has(self, stage, item):
    if stage not in self._listed:  # one listing per stage, not one stat per image
      directory = self.out_dir / f"stage{stage}"
      self._listed[stage] = ({p.name for p in directory.iterdir()} if directory.exists()
                             else set())
    return self._path(stage, item).name in self._listed[stage]

  def read(self, stage, item):
    return output.read_image(self._path(stage, item))

  def write(self, stage, item, image):
    output.write_png(self._path(stage, item), image)
    self._listed.setdefault(stage, set()).add(self._path(stage, item).name)

  def record(self, rows):
    self.index.add(rows)


# ---------------------------------------------------------------------------------------
# The cascade.


@dataclasses.dataclass
class StageStats:
  stage: int
  size: int
  images: int = 0          # generated in this run (skipped ones not counted)
  skipped: int = 0
  seconds: float = 0.0
  first_batch_seconds: float = 0.0   # includes compilation

  @property
  def images_per_second(self) -> float:
    return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class RunSummary:
  stages: list[StageStats]
  final_images: int
  seconds: float

  def line(self) -> str:
    parts = []
    for s in self.stages:
      parts.append(f"stage {s.stage} ({s.size}x{s.size}): {s.images} images in "
                   f"{s.seconds:.1f} s = {s.images_per_second:.3g} images/s"
                   + (f" (first batch incl. compile {s.first_batch_seconds:.1f} s)"
                      if s.images else "") + (f", {s.skipped} already done" if s.skipped
                                              else ""))
    total = self.final_images / self.seconds if self.seconds > 0 else 0.0
    parts.append(f"total: {self.final_images} images in {self.seconds:.1f} s = "
                 f"{total:.3g} images/s")
    return "; ".join(parts)


class Cascade:
  """Loaded stages plus a text encoder, callable on a list of prompts."""

  def __init__(self, stages: Sequence[LoadedStage], text: PromptEncoder | None = None, *,
               batch_size: int = 8, devices: Sequence[jax.Device] | None = None,
               mesh=None):
    if not stages:
      raise UserError("a cascade needs at least one stage")
    self.stages = list(stages)
    self.text = text
    for k in range(1, len(self.stages)):
      prev, cur = self.stages[k - 1], self.stages[k]
      if not cur.is_sr:
        raise UserError(f"stage {k} ({cur.name}) is a base model (it takes no low-resolution "
                        "image); only stage 0 can be a base stage, list the stages base first")
      if cur.lowres_size != prev.image_size:
        raise UserError(f"stage {k} ({cur.name}) takes {cur.lowres_size}x{cur.lowres_size} "
                        f"low-resolution images, but stage {k - 1} ({prev.name}) outputs "
                        f"{prev.image_size}x{prev.image_size}; chain stages whose sizes "
                        "match")
    if text is not None:
      for k, stage in enumerate(self.stages):
        text.check_stage(stage, k)
    if mesh is None:
      mesh = _default_mesh(list(devices) if devices is not None else jax.local_devices())
    self.mesh = mesh
    self.data_parallel = mesh_lib.data_parallel_size(mesh)
    if not isinstance(batch_size, int) or batch_size < 1:
      raise UserError(f"batch_size={batch_size!r} must be a positive integer")
    self.batch_size = batch_size
    self._samplers: dict[int, StageSampler] = {}

  @classmethod
  def from_config(cls, gin_files: str | Sequence[str], bindings: Sequence[str] = (),
                  **kwargs) -> "Cascade":
    """Parses gin files (searched as the CLIs do) and bindings, then `load_cascade()`."""
    from imagen_jax import config
    import imagen_jax.nn  # noqa: F401  (registers the configurables the gin files bind)
    import imagen_jax.text.encode  # noqa: F401
    gin_files = [gin_files] if isinstance(gin_files, (str, os.PathLike)) else list(gin_files)
    config.parse_gin([os.fspath(f) for f in gin_files], list(bindings), finalize=False)
    return load_cascade(**kwargs)

  # --- batching ---------------------------------------------------------------------

  def stage_batch_size(self, k: int) -> int:
    """The stage's batch size rounded up to a multiple of the data-parallel devices."""
    b = self.stages[k].config.batch_size or self.batch_size
    return int(math.ceil(b / self.data_parallel) * self.data_parallel)

  def sampler(self, k: int) -> StageSampler:
    if k not in self._samplers:
      self._samplers[k] = StageSampler(self.stages[k], k, self.mesh, self.stage_batch_size(k))
    return self._samplers[k]

  # --- the public calls -------------------------------------------------------------

  def __call__(self, prompts: Sequence[str], *, num_samples: int = 1, seed: int = 0,
               stop_at_stage: int | None = None, start_images=None, init_images=None,
               masks=None, strength=None, negative_prompts=None,
               progress: bool = False) -> list[np.ndarray]:
    """Samples every prompt `num_samples` times through the cascade.

    Args:
      prompts: the texts.
      num_samples: images per prompt.
      seed: the root seed; image (p, s) has seed image_seeds(seed, p, s).
      stop_at_stage: run stages 0 ... N-1 only (1 = the base alone).
      start_images: uint8 [N, H, W, 3] (or a list), one per prompt: super-resolve these
        with the super-resolution stages instead of sampling the base (each is centre-cropped
        and resized to the first SR stage's input size if needed).
      init_images, masks, strength, negative_prompts: edits, one per prompt (a single
        strength or negative prompt applies to all); see `Edit`. init_images with masks
        inpaint at every stage; with strength the base stage starts from them (SDEdit).

    Returns:
      one uint8 array [num_prompts, num_samples, H_k, W_k, 3] per stage k run. With
      start_images the list starts with the start images themselves (resized, repeated
      per sample), followed by the super-resolution stages' outputs.
    """
    prompts = list(prompts)
    items = work_items(len(prompts), num_samples, seed)
    sink = MemorySink()
    edits = make_edits(len(prompts), init_images=init_images, masks=masks, strength=strength,
                       negative_prompts=negative_prompts)
    first, last = self.run(prompts, items, sink, stop_at_stage=stop_at_stage,
                           start_images=start_images, edits=edits, progress=progress)[1:]
    out = []
    for k in range(first, last):
      out.append(np.stack([sink.read(k, it) for it in items]).reshape(
          len(prompts), num_samples, *sink.read(k, items[0]).shape))
    if start_images is not None:
      fitted = self._fit_start_images(start_images, first, len(prompts))
      out.insert(0, np.repeat(np.stack(fitted)[:, None], num_samples, axis=1))
    return out

  def reproduce(self, prompt: str, seed: int, *, stop_at_stage: int | None = None,
                start_image=None, edit: Edit | None = None) -> list[np.ndarray]:
    """Regenerates one image from its index.jsonl `prompt` and `seed` (and its `edit`)
    -> one [H, W, 3] per stage run."""
    sink = MemorySink()
    item = WorkItem(0, 0, int(seed))
    start = None if start_image is None else [start_image]
    first, last = self.run([prompt], [item], sink, stop_at_stage=stop_at_stage,
                           start_images=start, edits=None if edit is None else [edit],
                           progress=False)[1:]
    return [sink.read(k, item) for k in range(first, last)]

  # --- the engine -------------------------------------------------------------------

  def stage_range(self, stop_at_stage: int | None, start_images) -> tuple[int, int]:
    """(first, last): the stages to run, first inclusive, last exclusive."""
    n = len(self.stages)
    last = n if stop_at_stage is None else stop_at_stage
    if not isinstance(last, int) or not 1 <= last <= n:
      raise UserError(f"stop_at_stage={stop_at_stage!r} must be in 1 ... {n} (the cascade "
                      f"has {n} stages; 1 = the base alone)")
    if start_images is None:
      if self.stages[0].is_sr:
        s = self.stages[0]
        raise UserError(f"stage 0 ({s.name}) is a super-resolution checkpoint ({s.lowres_size}"
                        f" -> {s.image_size}); the first stage must be a base model, or pass "
                        "start images (--start_image) to super-resolve")
      return 0, last
    first = 0 if self.stages[0].is_sr else 1
    if first >= last:
      raise UserError(f"start images need a super-resolution stage to run, but the stages run "
                      f"are 0 ... {last - 1}; raise stop_at_stage or add an SR stage")
    return first, last

  def _fit_start_images(self, start_images, first: int, num_prompts: int) -> list[np.ndarray]:
    images = list(start_images)
    if len(images) != num_prompts:
      raise UserError(f"{len(images)} start images for {num_prompts} prompts; give one "
                      "prompt per start image")
    return [output.fit_image(im, self.stages[first].lowres_size) for im in images]

  def _embed(self, prompts: Sequence[str], needed: Sequence[int]):
    if self.text is None:
      raise UserError("this cascade has no text encoder: configure load_cascade.text_encoder "
                      "or an embedding cache (--cache_dir)")
    emb, mask = self.text([prompts[i] for i in needed])
    return {p: i for i, p in enumerate(needed)}, emb, mask

  def _negatives(self, edits, pending) -> dict | None:
    """Negative prompt embeddings of the pending prompts: {prompt index: (emb, mask)}, an
    empty or absent negative prompt being the dropped caption (zeros, all false)."""
    if not edits or not any(e.negative_prompt for e in edits):
      return None
    wanted = sorted({edits[p].negative_prompt for p in pending if edits[p].negative_prompt})
    emb, mask = self.text(wanted) if wanted else (None, None)
    width = emb.shape[-1] if emb is not None else int(self.text.identity["d_model"])
    zeros = (np.zeros((self.text.max_length, width), np.float32),
             np.zeros((self.text.max_length,), bool))
    row = {n: i for i, n in enumerate(wanted)}
    return {p: ((emb[row[edits[p].negative_prompt]], mask[row[edits[p].negative_prompt]])
                if edits[p].negative_prompt else zeros) for p in pending}

  def _edit_batch(self, k: int, first: int, padded, edits, negatives) -> dict | None:
    """`sample_stage`'s editing arrays for stage k and a padded batch, or None."""
    if not edits:
      return None
    out = {}
    if negatives is not None:
      out["negative_emb"] = np.stack([negatives[it.prompt_index][0] for it in padded])
      out["negative_mask"] = np.stack([negatives[it.prompt_index][1] for it in padded])
    chosen = [edits[it.prompt_index] for it in padded]
    size = self.stages[k].image_size
    # SDEdit starts the base stage; SR stages take the stage below.
    sdedit = k == first and not self.stages[k].is_sr and any(
        e.strength is not None for e in edits)
    if any(e.mask is not None for e in edits) or sdedit:
      out["image"] = np.stack([e.image_at(size) for e in chosen])
    if any(e.mask is not None for e in edits):
      out["mask"] = np.stack([e.mask_at(size) for e in chosen])
    if sdedit:
      out["strength"] = np.array([1.0 if e.strength is None else e.strength for e in chosen],
                                 np.float32)
    return out or None

  def _check_inpainting_models(self, first: int, last: int, edits) -> None:
    """An inpainting model (inpaint_channels > 0) takes the edit's image and mask: refuse
    to run one without masks (an edit without a mask regenerates its whole image)."""
    has_masks = bool(edits) and any(e.mask is not None for e in edits)
    for k in range(first, last):
      channels = self.stages[k].info.inpaint_channels
      if channels and not has_masks:
        raise UserError(f"stage {k} ({self.stages[k].name}) is an inpainting model "
                        f"(inpaint_channels={channels}): give an image and a mask to inpaint "
                        "(--init_image and --mask, or --edits), or use a text-to-image model")

  def run(self, prompts: Sequence[str], items: Sequence[WorkItem], sink: Sink, *,
          stop_at_stage: int | None = None, start_images=None, edits=None,
          progress: bool = True, row_extra: dict | None = None,
          encode_all: bool = False) -> tuple[RunSummary, int, int]:
    """Runs `items` through the stages, skipping images the sink already has. `edits`:
    None or one `Edit` per prompt.

    Only prompts with work left are encoded, unless `encode_all`: with several processes
    every process must make the same text-encoder calls (its mesh may span all of them).
    Returns (summary, first stage, last stage + 1).
    """
    from tqdm import tqdm
    if not prompts:
      raise UserError("no prompts to sample; give at least one prompt")
    first, last = self.stage_range(stop_at_stage, start_images)
    start = (self._fit_start_images(start_images, first, len(prompts))
             if start_images is not None else None)
    t_start = time.perf_counter()
    # Prompts are encoded once, and only those with work left (a finished rerun skips T5).
    pending = sorted({it.prompt_index for k in range(first, last) for it in items
                      if not sink.has(k, it)})
    if encode_all:
      pending = list(range(len(prompts)))
    row_of, emb, mask = self._embed(prompts, pending) if pending else ({}, None, None)
    if edits is not None and len(edits) != len(prompts):
      raise UserError(f"{len(edits)} edits for {len(prompts)} prompts; give one per prompt")
    if edits and start is not None and any(e.strength is not None for e in edits):
      raise UserError("strength (image-to-image) starts the base stage; it cannot be used "
                      "with start images, which the SR stages take instead")
    negatives = self._negatives(edits, pending)
    self._check_inpainting_models(first, last, edits)
    # Classifier guidance: every prompt's class, checked before any sampling.
    labels = {k: self.stages[k].guide.prompt_labels(prompts) for k in range(first, last)
              if self.stages[k].guide is not None}
    stats = []
    for k in range(first, last):
      stage = self.stages[k]
      settings = stage.settings()
      if start is not None and k == first:
        settings["lowres"] = "start_image"

      def row(it, k=k, settings=settings):
        return {"prompt": prompts[it.prompt_index], "prompt_index": it.prompt_index,
                "seed": it.seed, "sample": it.sample, "stage": k,
                "file": output.image_file(k, it.prompt_index, it.sample),
                "sampler": settings, **(row_extra or {}),
                **({"edit": edits[it.prompt_index].record()} if edits else {})}

      done = [it for it in items if sink.has(k, it)]
      todo = [it for it in items if not sink.has(k, it)]
      sink.record([row(it) for it in done])
      st = StageStats(stage=k, size=stage.image_size, skipped=len(done))
      bar = tqdm(total=len(items), initial=len(done), desc=f"stage {k} ({stage.image_size}px)",
                 unit="img", disable=not progress, leave=True)
      t0 = time.perf_counter()
      if todo:
        sampler = self.sampler(k)
        b = sampler.batch_size
        inflight = None
        for i in range(0, len(todo), b):
          batch = todo[i:i + b]
          # The last batch is padded with copies of its last item: same shape, no recompile.
          padded = batch + [batch[-1]] * (b - len(batch))
          rows = [row_of[it.prompt_index] for it in padded]
          lowres = None
          if stage.is_sr:
            lowres = np.stack([start[it.prompt_index] if start is not None and k == first
                               else sink.read(k - 1, it) for it in batch])
            lowres = np.concatenate([lowres, np.repeat(lowres[-1:], b - len(batch), 0)])
          out = sampler([it.seed for it in padded], emb[rows], mask[rows], lowres,
                        self._edit_batch(k, first, padded, edits, negatives),
                        labels[k][[it.prompt_index for it in padded]] if k in labels
                        else None)
          # Write the previous batch while this one runs on the devices.
          if inflight is not None:
            self._finish(k, *inflight, sink, row, bar)
          inflight = (batch, out)
          if i == 0:
            jax.block_until_ready(out)
            st.first_batch_seconds = time.perf_counter() - t0
        self._finish(k, *inflight, sink, row, bar)
      bar.close()
      st.images, st.seconds = len(todo), time.perf_counter() - t0
      stats.append(st)
    summary = RunSummary(stats, final_images=sum(1 for it in items if sink.has(last - 1, it)),
                         seconds=time.perf_counter() - t_start)
    return summary, first, last

  @staticmethod
  def _finish(k, batch, out, sink, row, bar):
    images = np.asarray(out)[:len(batch)]
    for it, image in zip(batch, images):
      sink.write(k, it, image)
    sink.record([row(it) for it in batch])
    bar.update(len(batch))


@gin.configurable
def load_cascade(stages: Sequence[Stage] = gin.REQUIRED, *, text_encoder: Any = None,
                 cache_dir: str | None = None, batch_size: int = 8,
                 devices: Sequence[jax.Device] | None = None) -> Cascade:
  """Loads every stage's checkpoint and the text encoder into a `Cascade`.

  Gin: `load_cascade.stages = [@base/Stage(), @sr/Stage()]`, `load_cascade.text_encoder =
  @text_encoder()`. `devices` default: this process's devices.
  """
  if stages is gin.REQUIRED or not stages:
    raise UserError("load_cascade.stages is empty; list the stages, e.g. "
                    "load_cascade.stages = [@base/Stage(), @sr/Stage()]")
  stages = [s if isinstance(s, Stage) else Stage(**s) for s in stages]
  devices = list(devices) if devices is not None else jax.local_devices()
  mesh = mesh_lib.make_mesh(None, devices=devices)
  loaded = [load_stage(s, mesh=mesh) for s in stages]
  cache = None
  if cache_dir:
    from imagen_jax.text import cache as cache_lib  # no gin configurables
    cache = cache_lib.EmbeddingCache.open(cache_dir)
  text = PromptEncoder(text_encoder, cache) if (text_encoder is not None or cache) else None
  return Cascade(loaded, text, batch_size=batch_size, mesh=mesh)


# ---------------------------------------------------------------------------------------
# Sampling into a directory (the CLI's work).


def sample_to_dir(cascade: Cascade, prompts: Sequence[str], out_dir, *, num_samples: int = 1,
                  seed: int = 0, stop_at_stage: int | None = None, start_images=None,
                  edits: Sequence[Edit] | None = None, grid_max_images: int = 64, process_index: int = 0, process_count: int = 1,
                  barrier: Callable[[str], None] | None = None,
                  progress: bool = True) -> RunSummary:
  """Samples into out_dir: stage{k}/ PNGs, index.jsonl and grid.png (see output.py).

  Images already in out_dir are skipped (and their index rows completed), so a rerun of a
  killed job resumes. With several processes each one samples its share of the
  images (`process_share`), then after `barrier` process 0 merges the index and writes the
  grid; out_dir must then be a path every process sees (e.g. gs://).
  """
  if num_samples < 1:
    raise UserError(f"num_samples={num_samples} must be at least 1")
  items = work_items(len(prompts), num_samples, seed)
  mine = process_share(items, process_index, process_count)
  sink = DirectorySink(out_dir, process_index, process_count)
  summary, _, last = cascade.run(prompts, mine, sink, stop_at_stage=stop_at_stage,
                                 start_images=start_images, edits=edits,
                                 progress=progress and process_index == 0,
                                 row_extra={"root_seed": int(seed)},
                                 encode_all=process_count > 1)
  if process_count > 1:
    if barrier is None:
      raise ValueError("several processes need a barrier to merge the index")
    barrier("imagen_sample_done")
  if process_index == 0:
    output.merge_index(out_dir)
    shown = items[:grid_max_images]
    images = [sink.read(last - 1, it) for it in shown]
    captions = [prompts[it.prompt_index] + (f" #{it.sample}" if num_samples > 1 else "")
                for it in shown]
    output.write_png(epath.Path(out_dir) / output.GRID_FILE,
                     output.make_grid(images, captions))
  return summary
