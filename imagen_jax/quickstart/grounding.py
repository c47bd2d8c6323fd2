"""Grounding pretraining: teaches a small T5 encoder what the shapes captions mean.

Imagen's frozen T5-XXL arrives knowing that in "a red circle to the right of a blue square"
the red circle is the one on the right. A T5 with random weights does not: its embeddings
keep each word and some of the word order, but not which object the relation puts where,
and a U-Net trained on them cannot learn the layout (docs/quickstart.md, "Word order").

This module gives the encoder that knowledge the way CLIP's text encoder gets it: from
captioned images. A small head predicts a coarse rendering (8x8) of each training caption
from the encoder's token embeddings, every pixel attending to the tokens with a learned
query, as the U-Net's cross-attention later reads them. The best such prediction is the
caption's mean image, which puts each colour where the relation says, so the tokens must
come to carry which object goes where. Both encoder and head train; the head is then
dropped and the encoder is frozen and cached like any T5 checkpoint. `order_accuracy`
scores the head's predictions (the report that `pretrain` returns).

Only the training split's scenes are used (the held-out combinations stay unseen), from
the same deterministic stream as the training data (`shapes.sample_scene`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from imagen_jax.data import shapes
from imagen_jax.errors import UserError
from imagen_jax.nn import layers
from imagen_jax.nn.attention import masked_attention
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text import t5, vocab as vocab_lib


class GroundingHead(nnx.Module):
  """Token embeddings [B, L, D] -> an RGB image [B, R, R, 3] in [-1, 1] units.

  Each pixel has a learned query; it attends to the tokens (one head), and an MLP of the
  attended text and the query gives the pixel's colour.
  """

  def __init__(self, d_model: int, resolution: int, *, hidden: int = 128, rngs: nnx.Rngs):
    rngs = layers.local_rngs(rngs)
    init = layers.partitioned(nnx.initializers.normal(0.5), ("length", "embed"))
    self.resolution = resolution
    self.pixels = nnx.Param(init(rngs.params(), (resolution * resolution, d_model)))
    f32 = jnp.float32
    self.query = layers.dense(d_model, d_model, ("embed", "heads"), dtype=f32, rngs=rngs)
    self.key = layers.dense(d_model, d_model, ("embed", "heads"), dtype=f32, rngs=rngs)
    self.value = layers.dense(d_model, d_model, ("embed", "heads"), dtype=f32, rngs=rngs)
    self.mlp_in = layers.dense(2 * d_model, hidden, ("embed", "mlp"), dtype=f32, rngs=rngs)
    self.mlp_out = layers.dense(hidden, 3, ("mlp", None), dtype=f32, rngs=rngs)

  def __call__(self, text: jax.Array, mask: jax.Array) -> jax.Array:
    b = text.shape[0]
    pixels = jnp.broadcast_to(self.pixels[...], (b,) + self.pixels.shape)
    attended = masked_attention(self.query(pixels), self.key(text), self.value(text),
                                mask.astype(bool), num_heads=1)
    hidden = jax.nn.gelu(self.mlp_in(jnp.concatenate([attended, pixels], axis=-1)))
    return self.mlp_out(hidden).reshape(b, self.resolution, self.resolution, 3)


@dataclasses.dataclass(frozen=True)
class GroundingReport:
  """What pretraining did: its settings, the loss curve (every `log_every` steps) and the
  order accuracy of the head's predictions (1.0: every caption's objects where the
  caption puts them; 0.5: chance) on training and held-out captions."""
  steps: int
  batch_size: int
  resolution: int
  learning_rate: float
  seed: int
  losses: tuple[float, ...]
  order_train: float
  order_held_out: float
  seconds: float

  def summary(self) -> str:
    return (f"grounding: {self.steps} steps in {self.seconds:.0f}s, loss "
            f"{self.losses[0]:.3f} -> {self.losses[-1]:.3f}; the caption's layout order in "
            f"{self.order_train:.0%} of training and {self.order_held_out:.0%} of held-out "
            "captions (50% = chance)")


def _check(steps: int, batch_size: int, resolution: int, learning_rate: float,
           log_every: int) -> None:
  if steps < 0:
    raise UserError(f"grounding steps={steps} is negative; use 0 (a random encoder) or more")
  if batch_size < 1:
    raise UserError(f"grounding batch_size={batch_size} must be at least 1")
  if resolution < 2:
    raise UserError(f"grounding resolution={resolution} must be at least 2 pixels: the "
                    "head must see left from right")
  if not learning_rate > 0:
    raise UserError(f"grounding learning_rate={learning_rate} must be positive")
  if log_every < 1:
    raise UserError(f"grounding log_every={log_every} must be at least 1 (the steps run "
                    "in jitted chunks of log_every)")


def order_accuracy(predict, vocabulary, captions: Sequence[str], resolution: int,
                   max_length: int) -> float:
  """The fraction of two-object captions whose predicted image is closer to the caption's
  mean image than to that of the caption with its objects swapped (0.5 = chance)."""
  tokens = vocab_lib.tokenize(vocabulary, list(captions), max_length)
  pred = np.asarray(predict(jnp.asarray(tokens.ids), jnp.asarray(tokens.mask)))
  n = len(captions)
  def dist(target):
    return np.linalg.norm((pred - target).reshape(n, -1), axis=1)
  own = np.stack([shapes.mean_render(c, resolution) for c in captions])
  swapped = np.stack([shapes.mean_render(shapes.swap_objects(c), resolution)
                      for c in captions])
  return float(np.mean(dist(own) < dist(swapped)))


def pretrain(encoder: t5.T5Encoder, vocabulary, *, steps: int = 1000, batch_size: int = 64,
             resolution: int = 8, learning_rate: float = 3e-3, max_length: int = 16,
             num_scenes: int = 20_000, seed: int = 0, n_probe: int = 48,
             log_every: int = 50, progress: bool = True) -> GroundingReport:
  """Trains `encoder` in place (with a fresh GroundingHead) for `steps` steps of Adam on
  the MSE between the head's prediction and the scene rendered at `resolution`.

  Scenes are the first `num_scenes` (at most steps * batch_size) of
  `shapes.sample_scene(seed, i)`; batches are drawn from them with `seed`. Deterministic:
  the same arguments give the same weights. `vocabulary` is the encoder's
  `text.vocab.Vocabulary`. Batch 64 grounds as well as 128 for the U-Net trained on the
  encoder, in 60% of the time (docs/quickstart.md, item 17).
  """
  _check(steps, batch_size, resolution, learning_rate, log_every)
  start = time.time()
  head = GroundingHead(encoder.config.d_model, resolution, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split((encoder, head))
  num_scenes = max(1, min(num_scenes, steps * batch_size))
  scenes = [shapes.sample_scene(seed, i) for i in range(num_scenes)]
  images = np.stack([shapes.render(s, resolution) for s in scenes])
  images = images.astype(np.float32) / 127.5 - 1
  tokens = vocab_lib.tokenize(vocabulary, [s.caption for s in scenes], max_length)
  if tokens.truncated:
    raise UserError(f"grounding: max_length={max_length} cuts caption "
                    f"{scenes[tokens.truncated[0]].caption!r}; raise max_length")

  def predict(params, ids, mask):
    encoder, head = nnx.merge(graphdef, params)
    return head(encoder(ids, mask), mask)

  # The steps run in chunks of `log_every` inside one jitted lax.scan, the scenes held on
  # the devices and each step's batch gathered there by its row indices: one dispatch per
  # chunk. A step is tiny, so per-call overhead dominated a Python loop of jitted steps
  # (one core: 115 ms a step in such a loop, 73 ms in the scan; docs/quickstart.md).
  # Data parallel over the local devices (the quickstart makes one per CPU core): the
  # parameters and scenes replicated, each batch split by rows.
  devices = jax.local_devices()[:math.gcd(batch_size, jax.local_device_count())]
  mesh = mesh_lib.make_mesh(devices=devices)
  replicated = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(params, replicated)
  data = jax.device_put((tokens.ids, tokens.mask, images), replicated)
  by_rows = NamedSharding(mesh, PartitionSpec(None, mesh_lib.BATCH_AXES))
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_chunk(carry, data, rows):  # rows: [steps in the chunk, batch_size] scene indices
    def train_step(carry, rows):
      params, opt_state = carry
      ids, mask, target = (a[rows] for a in data)
      def loss_fn(p):
        return jnp.mean(jnp.square(predict(p, ids, mask) - target))
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    return jax.lax.scan(train_step, carry, rows)

  rng = np.random.default_rng(seed)
  losses = []
  carry = (params, opt_state)
  with tqdm(total=steps, desc="grounding the text encoder", unit="step",
            disable=not progress) as bar:
    for first in range(0, steps, log_every):
      n = min(log_every, steps - first)
      rows = jax.device_put(rng.integers(num_scenes, size=(n, batch_size)), by_rows)
      carry, chunk_losses = train_chunk(carry, data, rows)
      losses.append(float(chunk_losses[0]))  # the loss at step `first`
      if first + n == steps and n > 1:
        losses.append(float(chunk_losses[-1]))
      bar.update(n)
  params = carry[0]
  nnx.update(encoder, params[0])
  trained = jax.jit(lambda ids, mask: predict(params, ids, mask))  # compiled once

  def probe(split):
    two = [c for c in shapes.all_captions(split) if shapes.parse_caption(c).relation]
    picked = np.random.default_rng(0).choice(two, min(n_probe, len(two)), replace=False)
    return order_accuracy(trained, vocabulary, [str(c) for c in picked], resolution,
                          max_length)

  return GroundingReport(steps=steps, batch_size=batch_size, resolution=resolution,
                         learning_rate=learning_rate, seed=seed,
                         losses=tuple(losses) or (math.nan,),
                         order_train=probe("train"), order_held_out=probe("held_out"),
                         seconds=time.time() - start)
