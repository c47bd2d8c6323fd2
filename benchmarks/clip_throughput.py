"""Images/s and texts/s of `ClipScorer` (preprocessing included) at a real CLIP's size.

  python benchmarks/clip_throughput.py [--model=vit-b-32|vit-l-14] [--images=256] \
      [--batch=64] [--image_size=256]

The weights are random (nothing is downloaded; the speed does not depend on the values) in
the shape of OpenAI's ViT-B/32 or ViT-L/14 (the usual CLIP-score model), saved in the
Hugging Face layout and loaded as `imagen-eval clip_score` loads a directory. Images are
random uint8 of `--image_size` px (resized to 224 as a real run would); texts are
DrawBench prompts. The first batch (compilation) is timed apart from the rest.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

SIZES = {
    "vit-b-32": dict(text=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8),
                     vision=dict(hidden_size=768, intermediate_size=3072,
                                 num_attention_heads=12, patch_size=32), projection_dim=512),
    "vit-l-14": dict(text=dict(hidden_size=768, intermediate_size=3072,
                               num_attention_heads=12),
                     vision=dict(hidden_size=1024, intermediate_size=4096,
                                 num_hidden_layers=24, num_attention_heads=16, patch_size=14),
                     projection_dim=768),
}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=sorted(SIZES), default="vit-b-32")
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image_size", type=int, default=256)
  args = p.parse_args()
  import jax
  from imagen_jax.data.clip_preprocess import ClipImageProcessor
  from imagen_jax.eval import clip_score, drawbench
  from imagen_jax.nn import clip
  from imagen_jax.text import clip_tokenizer as ct

  merges = ct.learn_merges(drawbench.prompts(), 1000)
  vocab = ct.byte_level_vocab(merges)
  size = SIZES[args.model]
  config = clip.CLIPConfig(
      text=clip.CLIPTextConfig(bos_token_id=vocab[ct.BOS], eos_token_id=vocab[ct.EOS],
                               **size["text"]),
      vision=clip.CLIPVisionConfig(**size["vision"]), projection_dim=size["projection_dim"])
  with tempfile.TemporaryDirectory() as tmp:
    clip.save_clip(tmp, clip.random_clip(config, seed=0))
    ct.save_tokenizer(tmp, vocab, merges)
    ClipImageProcessor().save(tmp)
    scorer = clip_score.ClipScorer(tmp, batch_size=args.batch, progress=False)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
            for _ in range(args.images)]
  texts = (drawbench.prompts() * (args.images // 200 + 1))[:args.images]
  print(f"{args.model}, {len(jax.devices())} {jax.devices()[0].platform} device(s), "
        f"batch {scorer.batch_size}")
  for name, fn, inputs in (("images", scorer.embed_images, images),
                           ("texts", scorer.embed_texts, texts)):
    start = time.perf_counter()
    fn(inputs[:scorer.batch_size])
    first = time.perf_counter() - start
    start = time.perf_counter()
    fn(inputs)
    rate = len(inputs) / (time.perf_counter() - start)
    print(f"{name}: {rate:.1f}/s (first batch incl. compilation {first:.1f} s); 30,000 "
          f"would take {30000 / rate / 60:.1f} min")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
