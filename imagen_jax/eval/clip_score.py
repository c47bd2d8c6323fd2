"""CLIP score: how well images match their prompts, as torchmetrics defines it.

  CLIPScore(I, C) = 100 * max(cos(E_I, E_C), 0), averaged over the image-prompt pairs

(Hessel et al. 2021, "CLIPScore", eq. 1 with w = 100, as in torchmetrics'
`CLIPScore`; Imagen reports it on COCO, Saharia et al. 2022, §4.1 and fig. A.5). E_I and
E_C are CLIP's projected image and text embeddings (`imagen_jax.nn.clip`). torchmetrics'
code clips the *mean* at 0 rather than each pair; the two agree whenever no pair has a
negative cosine, which is the case for real CLIP models on real images.

`ClipScorer` holds a CLIP directory's model, tokenizer and preprocessing. It embeds in
fixed-size batches (the last one padded with blank rows, cut from the result), sharded over
every device on the mesh's data axes, with one compiled program per batch shape.
`score_samples(dir)` scores an `imagen-sample` output directory (prompts from its
index.jsonl).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.data.clip_preprocess import ClipImageProcessor
from imagen_jax.errors import UserError
from imagen_jax.eval import samples as samples_lib
from imagen_jax.nn import clip as clip_lib
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import rules
from imagen_jax.text.clip_tokenizer import CLIPTokenizer


def pair_scores(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
  """100 * max(cos(image_i, text_i), 0) for each row i: [N, P], [N, P] -> [N]."""
  cos = jnp.sum(clip_lib.normalize(jnp.asarray(image_emb, jnp.float32))
                * clip_lib.normalize(jnp.asarray(text_emb, jnp.float32)), axis=-1)
  return 100.0 * jnp.maximum(cos, 0.0)


def clip_score(image_emb: jax.Array, text_emb: jax.Array) -> float:
  """The mean of `pair_scores` (0 to 100)."""
  if len(image_emb) == 0:
    raise UserError("CLIP score of no images: give at least one image")
  return float(jnp.mean(pair_scores(image_emb, text_emb)))


class ClipScorer:
  """A Hugging Face CLIP directory, ready to embed images and texts on every device."""

  def __init__(self, clip_dir: str | os.PathLike, *, batch_size: int = 64, mesh=None,
               progress: bool = True):
    # The tokenizer and preprocessing first: a directory without them fails before the
    # weights are read.
    self.tokenizer = CLIPTokenizer.load(clip_dir)
    self.preprocess = ClipImageProcessor.load(clip_dir)
    model = clip_lib.load_clip(clip_dir)
    self.config = model.config
    size = self.config.vision.image_size
    if self.preprocess.crop_size != size:
      raise UserError(f"{clip_dir}: preprocessor_config.json crops to "
                      f"{self.preprocess.crop_size} px but the vision tower takes {size} px")
    self.tokenizer.max_length = min(self.tokenizer.max_length,
                                    self.config.text.max_position_embeddings)
    self.mesh = mesh if isinstance(mesh, jax.sharding.Mesh) else mesh_lib.make_mesh(mesh)
    ways = mesh_lib.data_parallel_size(self.mesh)
    self.batch_size = -(-int(batch_size) // ways) * ways  # splits evenly over devices
    self.progress = progress and jax.process_index() == 0
    graphdef, state = nnx.split(model)
    shardings = rules.state_shardings(state, self.mesh)
    self._state = jax.device_put(state, shardings)
    self._text = jax.jit(lambda s, ids: nnx.merge(graphdef, s).encode_text(ids))
    self._image = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))

  def _batched(self, fn, inputs: np.ndarray, desc: str) -> np.ndarray:
    """fn over `inputs` in padded batches of `batch_size`; returns [N, P] float32."""
    from tqdm import tqdm
    n = inputs.shape[0]
    out = np.zeros((n, self.config.projection_dim), np.float32)
    sharding = mesh_lib.batch_sharding(self.mesh, inputs.ndim)
    starts = range(0, n, self.batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not self.progress):
      chunk = inputs[start:start + self.batch_size]
      batch = np.zeros((self.batch_size, *inputs.shape[1:]), inputs.dtype)
      batch[:len(chunk)] = chunk
      emb = fn(self._state, jax.device_put(batch, sharding))
      out[start:start + len(chunk)] = np.asarray(emb)[:len(chunk)]
    return out

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Projected text embeddings [N, P] (not normalised)."""
    return self._batched(self._text, self.tokenizer(texts).ids, "clip text")

  def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Projected image embeddings [N, P] of uint8 [H, W, 3] images (any size)."""
    return self._batched(self._image, self.preprocess.batch(images), "clip images")

  def pair_scores(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
    """[N] CLIP score of image i against text i."""
    if len(images) != len(texts):
      raise UserError(f"{len(images)} images for {len(texts)} texts; CLIP score pairs "
                      "image i with text i")
    # Each distinct text is embedded once (several samples share a prompt).
    unique = sorted(set(texts))
    text_emb = self.embed_texts(unique)
    row_of = {text: i for i, text in enumerate(unique)}
    rows = np.asarray([row_of[t] for t in texts], np.int64)
    return np.asarray(pair_scores(self.embed_images(images), text_emb[rows]))


def score_samples(samples_dir: str | os.PathLike, scorer: ClipScorer,
                  stage: int | None = None) -> dict[str, Any]:
  """CLIP score of an imagen-sample output directory (the last stage unless `stage`).

  Returns {"clip_score", "num_images", "stage", "images": [{file, prompt, prompt_index,
  sample, clip_score}]}.
  """
  stage, rows = samples_lib.stage_rows(samples_dir, stage)
  images = [samples_lib.load_image(samples_dir, row) for row in rows]
  scores = scorer.pair_scores(images, [row["prompt"] for row in rows])
  per_image = [{"file": row["file"], "prompt": row["prompt"],
                "prompt_index": row.get("prompt_index"), "sample": row.get("sample"),
                "clip_score": float(s)} for row, s in zip(rows, scores)]
  return {"clip_score": float(np.mean(scores)), "num_images": len(rows), "stage": stage,
          "images": per_image}
