r"""A small noised CLIP on the shapes data, for CLIP guidance (GLIDE, Nichol et al. 2021,
section 2.4), in two phases that each take minutes on a CPU:

  python -m imagen_jax.train.noised_clip --out=runs/noised_clip \
      --spiece=runs/quickstart/t5/spiece.model

1. A CLIP (`nn.clip.CLIP`: a ViT image tower on 16 px images, patch 4, and a text
   transformer) trained contrastively (Radford et al. 2021, figure 3) on clean shapes
   images and their captions. The shapes captions repeat within a batch (one-object
   captions especially), so the targets are soft: image i's target over the texts is
   uniform on the texts with the same caption (and symmetrically), not the diagonal.
2. Its image tower fine-tuned on NOISED images x_t = alpha x0 + sigma eps at log-SNR
   schedule(t), t ~ U[0, 1] (the base model's cosine schedule), against the FROZEN text
   tower's embeddings (GLIDE: "noised CLIP models ... the image encoder receives noised
   images"). The image tower here is not told t (a ViT without a time input; GLIDE's is
   time-conditioned): it must read the noise level from x_t itself.

The tokenizer is the quickstart's T5 sentencepiece model (`text/vocab.py`: id 0 pad, 1 EOS,
no BOS), copied into the output; the text tower pools at the EOS (its `eos_token_id` = 1).
Outputs: OUT/clean/ and OUT/noised/ (Hugging Face CLIP layout, `nn.clip.save_clip`),
OUT/spiece.model, OUT/noised_clip.json (settings, the schedule, the max text length, and
the final retrieval accuracies). `Stage.classifier_dir = OUT` makes the sampler use the
noised CLIP as its guide (`sample/cascade.py` `ClipGuide`): log p = exp(logit_scale) *
cos(f(x_t), g(prompt)), its gradient through `diffusion.classifier_guidance`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from imagen_jax.data import shapes
from imagen_jax.diffusion import process, schedules
from imagen_jax.errors import UserError
from imagen_jax.nn import clip as clip_lib
from imagen_jax.text import vocab as vocab_lib

INFO_FILE = "noised_clip.json"


def small_config(vocab_size: int, *, image_size: int = 16, patch_size: int = 4,
                 width: int = 64, layers: int = 2, heads: int = 2, max_length: int = 16,
                 projection_dim: int = 64) -> clip_lib.CLIPConfig:
  """A CLIP small enough to train on a CPU in minutes (~0.2M parameters per tower)."""
  text = clip_lib.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
      num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
      bos_token_id=0, eos_token_id=1, pad_token_id=0)
  vision = clip_lib.CLIPVisionConfig(
      hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
      num_attention_heads=heads, image_size=image_size, patch_size=patch_size)
  return clip_lib.CLIPConfig(text=text, vision=vision, projection_dim=projection_dim)


def soft_contrastive_loss(image_emb, text_emb, logit_scale, caption_ids):
  """CLIP's symmetric cross-entropy (Radford et al. 2021, figure 3) with soft targets:
  the target of image i is uniform over the texts j with caption_ids[j] == caption_ids[i]
  (duplicates are positives, not negatives). -> (loss, image->text top-1 accuracy)."""
  logits = jnp.exp(logit_scale) * clip_lib.normalize(image_emb) @ clip_lib.normalize(
      text_emb).T
  same = (caption_ids[:, None] == caption_ids[None, :]).astype(jnp.float32)
  target = same / jnp.sum(same, axis=1, keepdims=True)
  loss_i = -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits, axis=1), axis=1))
  loss_t = -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits, axis=0), axis=0))
  correct = same[jnp.arange(same.shape[0]), jnp.argmax(logits, axis=1)]
  return (loss_i + loss_t) / 2, jnp.mean(correct)


class ShapesText:
  """Every training caption's token ids (the quickstart sentencepiece), by caption index."""

  def __init__(self, spiece, max_length: int):
    self.vocab = vocab_lib.load_vocabulary(spiece)
    self.captions = shapes.all_captions("train")
    self.index = {c: i for i, c in enumerate(self.captions)}
    self.max_length = max_length
    self.ids = self.tokenize(self.captions)

  def tokenize(self, texts) -> np.ndarray:
    tokens = vocab_lib.tokenize(self.vocab, list(texts), self.max_length)
    if tokens.truncated:
      raise UserError(f"{len(tokens.truncated)} caption(s) exceed max_length="
                      f"{self.max_length} tokens, e.g. {list(texts)[tokens.truncated[0]]!r}")
    return np.asarray(tokens.ids, np.int32)


def shapes_batch(seed: int, step: int, batch: int, image_size: int, text: ShapesText):
  """Batch `step` of the shapes training stream: (images float [-1, 1] [B,S,S,3], caption
  indices [B]); a pure function of (seed, step)."""
  scenes = [shapes.sample_scene(seed, step * batch + i) for i in range(batch)]
  images = np.stack([shapes.render(s, image_size) for s in scenes]).astype(np.float32)
  return images / 127.5 - 1.0, np.array([text.index[s.caption] for s in scenes], np.int32)


def _train_phase(model, text: ShapesText, *, steps: int, batch: int, lr: float, seed: int,
                 noised: bool, schedule: str, log) -> dict:
  """Adam on the contrastive loss; `noised`: images at random log-SNR against the frozen
  text tower (its embeddings of every caption, computed once). -> last metrics."""
  graphdef, params = nnx.split(model, nnx.Param)
  ids = jnp.asarray(text.ids)
  frozen = model.encode_text(ids) if noised else None
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps))
  opt_state = tx.init(params)
  size = model.config.vision.image_size

  def loss_fn(p, images, cap, key):
    m = nnx.merge(graphdef, p)
    if noised:
      k_t, k_eps = jax.random.split(key)
      log_snr = schedules.get_schedule(schedule)(jax.random.uniform(k_t, cap.shape))
      images = process.q_sample(images, log_snr, jax.random.normal(k_eps, images.shape))
      text_emb = frozen[cap]
    else:
      text_emb = m.encode_text(ids[cap])
    return soft_contrastive_loss(m.encode_image(images), text_emb, m.logit_scale[...], cap)

  @jax.jit
  def step_fn(p, o, images, cap, key):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, images, cap, key)
    if noised:  # the text tower is frozen: only the image tower and projection learn
      grads = jax.tree_util.tree_map_with_path(
          lambda path, g: g if path[0].key in ("vision_model", "visual_projection")
          else jnp.zeros_like(g), grads)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss, acc

  history, t0 = [], time.perf_counter()
  for step in range(steps):
    images, cap = shapes_batch(seed, step, batch, size, text)
    key = jax.random.fold_in(jax.random.key(seed + 1), step)
    params, opt_state, loss, acc = step_fn(params, opt_state, images, cap, key)
    history.append((float(loss), float(acc)))
    if (step + 1) % 50 == 0 or step + 1 == steps:
      recent = np.mean(history[-50:], axis=0)
      log(f"{'noised' if noised else 'clean'} step {step + 1}/{steps}: loss {recent[0]:.3f}"
          f", image->text accuracy {100 * recent[1]:.1f}% ({time.perf_counter() - t0:.0f}s)")
  nnx.update(model, params)
  recent = np.mean(history[-50:], axis=0)
  return {"steps": steps, "loss": float(recent[0]), "accuracy": float(recent[1]),
          "first_loss": history[0][0], "seconds": time.perf_counter() - t0}


def train_noised_clip(out_dir, spiece, *, clean_steps: int = 400, noised_steps: int = 400,
                      batch: int = 64, lr: float = 1e-3, seed: int = 0,
                      schedule: str = "cosine", max_length: int = 16, image_size: int = 16,
                      log=print) -> dict:
  """Both phases; writes OUT/clean, OUT/noised, OUT/spiece.model, OUT/noised_clip.json."""
  out = epath.Path(out_dir)
  if not epath.Path(spiece).exists():
    raise UserError(f"--spiece={os.fspath(spiece)!r} does not exist; give the quickstart's "
                    "sentencepiece model, e.g. runs/quickstart/t5/spiece.model")
  text = ShapesText(spiece, max_length)
  config = small_config(int(text.vocab.vocab_size), max_length=max_length,
                        image_size=image_size, patch_size=4 if image_size >= 16 else 2)
  model = clip_lib.random_clip(config, seed)
  kw = dict(batch=batch, lr=lr, seed=seed, schedule=schedule, log=log)
  clean = _train_phase(model, text, steps=clean_steps, noised=False, **kw)
  clip_lib.save_clip(out / "clean", model)
  noised = _train_phase(model, text, steps=noised_steps, noised=True, **kw)
  clip_lib.save_clip(out / "noised", model)
  shutil.copyfile(os.fspath(spiece), os.fspath(out / "spiece.model"))
  info = {"kind": "noised_clip", "schedule": schedule, "max_length": max_length,
          "time_conditioned": False, "batch": batch, "lr": lr, "seed": seed,
          "clean": clean, "noised": noised}
  (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
  return info


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--spiece", required=True, help="the quickstart T5's spiece.model")
  p.add_argument("--clean_steps", type=int, default=400)
  p.add_argument("--noised_steps", type=int, default=400)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    train_noised_clip(args.out, args.spiece, clean_steps=args.clean_steps,
                      noised_steps=args.noised_steps, batch=args.batch, lr=args.lr,
                      seed=args.seed)
  except UserError as e:
    print(f"noised_clip: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
