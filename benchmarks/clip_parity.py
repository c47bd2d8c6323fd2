"""Our CLIP (imagen_jax.nn.clip + tokenizer + preprocessing) against transformers' CLIPModel.

  python benchmarks/clip_parity.py [--torch_python=/tmp/torchvenv/bin/python] \
      [--out=/tmp/clip_parity] [--prompts=/work/shared/data/drawbench_prompts.txt]

A check, not a test: transformers lives in its own virtual environment (torch must never be
installed into this project's .venv). Steps:

1. Here: learn a small byte-level BPE (500 merges) from the prompts, write it as vocab.json
   + merges.txt, write a preprocessor_config.json (shortest edge 32, crop 32) and a few test
   images of different sizes and aspect ratios (scikit-image's photos and noise).
2. In the torch venv: build a random transformers `CLIPModel` (hidden 64, 2 layers, 4
   heads, image 32, patch 8; text quick_gelu, vision gelu), perturb every parameter
   (layer norms and biases included, so a mapping mistake shows), `save_pretrained` it
   (safetensors) into the same directory, tokenize the prompts with `CLIPTokenizer`
   (padding to 77, truncation), preprocess the images with `CLIPImageProcessorPil`, and
   compute `get_text_features` / `get_image_features` (also with the legacy
   `eos_token_id=2` argmax pooling) and the CLIP score of each prompt with image i mod n.
3. Here: load the directory with ours and compare token ids (exact; also read from the
   `tokenizer.json` that transformers' `save_pretrained` writes), pixels, embeddings (max
   abs diff) and the CLIP score.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DEFAULT_TORCH_PYTHON = "/tmp/torchvenv/bin/python"
DEFAULT_PROMPTS = "/work/shared/data/drawbench_prompts.txt"
TRICKY = [
    "", "  Multiple   spaces\tand\nnewlines  ", "don't STOP believin' 'S 'LL 've",
    "naïve café — “quotes” 😀 ½ ² 3.14159", "x.<|endoftext|>y and <|startoftext|>",
    "İstanbul ÅNGSTRÖM straße ﬁ", "一二三 中文 日本語のテキスト", "C++ & C# == <html>&amp;",
    "word " * 100,
]


def torch_worker(out_dir: str, prompts: list[str]) -> None:
  # This venv's torchvision does not match its torch (its ops fail to register); hiding it
  # makes transformers use its PIL paths, which are the ones we mirror anyway.
  sys.modules["torchvision"] = None
  import numpy as np
  import torch
  from PIL import Image
  from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  vocab = json.load(open(os.path.join(out_dir, "vocab.json"), encoding="utf-8"))
  config = CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                       hidden_act="quick_gelu", bos_token_id=vocab["<|startoftext|>"],
                       eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
      vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu"),
      projection_dim=48)
  torch.manual_seed(0)
  model = CLIPModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif p.ndim <= 1:  # biases, class embedding, logit scale
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  model.save_pretrained(out_dir)
  tokenizer = CLIPTokenizer.from_pretrained(out_dir)
  # transformers' own files (tokenizer.json, its special-token configs), read by ours too.
  tokenizer.save_pretrained(os.path.join(out_dir, "saved_tokenizer"))
  tokens = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt")
  processor = CLIPImageProcessorPil.from_pretrained(out_dir)
  names = sorted(n for n in os.listdir(out_dir) if n.startswith("image_"))
  images = [Image.open(os.path.join(out_dir, n)).convert("RGB") for n in names]
  pixels = processor(images=images, return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    text = model.get_text_features(input_ids=tokens["input_ids"],
                                   attention_mask=tokens["attention_mask"]).pooler_output
    image = model.get_image_features(pixel_values=pixels).pooler_output
    model.text_model.eos_token_id = 2  # the legacy argmax pooling
    legacy = model.get_text_features(input_ids=tokens["input_ids"]).pooler_output
  img = image / image.norm(dim=-1, keepdim=True)
  txt = text / text.norm(dim=-1, keepdim=True)
  pairs = 100 * (img[torch.arange(len(prompts)) % len(images)] * txt).sum(-1)
  np.savez(os.path.join(out_dir, "torch.npz"), ids=tokens["input_ids"].numpy(),
           mask=tokens["attention_mask"].numpy(), pixels=pixels.numpy(),
           text=text.numpy(), image=image.numpy(), legacy=legacy.numpy(),
           pairs=pairs.numpy())


def prepare(out_dir: str, prompts: list[str]) -> None:
  import numpy as np
  from skimage import data as skdata
  from imagen_jax.data.clip_preprocess import ClipImageProcessor
  from imagen_jax.sample.output import write_png
  from imagen_jax.text import clip_tokenizer
  merges = clip_tokenizer.learn_merges(prompts, 500)
  clip_tokenizer.save_tokenizer(out_dir, clip_tokenizer.byte_level_vocab(merges), merges)
  ClipImageProcessor(shortest_edge=32, crop_size=32).save(out_dir)
  rng = np.random.default_rng(0)
  images = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()[:, :200],
            rng.integers(0, 256, (40, 57, 3), dtype=np.uint8)]
  for i, image in enumerate(images):
    write_png(os.path.join(out_dir, f"image_{i}.png"), image)


def compare(out_dir: str, prompts: list[str]) -> dict:
  import numpy as np
  from imagen_jax.data.clip_preprocess import ClipImageProcessor
  from imagen_jax.eval import clip_score
  from imagen_jax.nn import clip
  from imagen_jax.sample.output import read_image
  from imagen_jax.text.clip_tokenizer import CLIPTokenizer
  ref = np.load(os.path.join(out_dir, "torch.npz"))
  tokens = CLIPTokenizer.load(out_dir)(prompts)
  bad = [i for i in range(len(prompts)) if not np.array_equal(tokens.ids[i], ref["ids"][i])]
  saved = os.path.join(out_dir, "saved_tokenizer")
  for name in ("vocab.json", "merges.txt"):  # so that tokenizer.json is what ours reads
    if os.path.exists(os.path.join(saved, name)):
      os.remove(os.path.join(saved, name))
  from_json = CLIPTokenizer.load(saved)(prompts).ids
  names = sorted(n for n in os.listdir(out_dir) if n.startswith("image_"))
  pixels = ClipImageProcessor.load(out_dir).batch(
      [read_image(os.path.join(out_dir, n)) for n in names])
  model = clip.load_clip(out_dir)
  text = np.asarray(model.encode_text(tokens.ids))
  image = np.asarray(model.encode_image(pixels))
  legacy_config = clip.CLIPConfig(
      text=clip.dataclasses.replace(model.config.text, eos_token_id=2),
      vision=model.config.vision, projection_dim=model.config.projection_dim)
  model.text_model.config = legacy_config.text
  legacy = np.asarray(model.encode_text(tokens.ids))
  pairs = np.asarray(clip_score.pair_scores(image[np.arange(len(prompts)) % len(names)],
                                            text))
  theirs_score = float(np.maximum(ref["pairs"], 0).mean())
  return {
      "prompts": len(prompts), "token_rows_differing": len(bad),
      "token_rows_differing_from_tokenizer_json": int(
          (from_json != ref["ids"]).any(axis=1).sum()),
      "first_differing": [prompts[i][:60] for i in bad[:3]],
      "pixels_max_abs_diff": float(np.abs(pixels - ref["pixels"].transpose(0, 2, 3, 1)).max()),
      "text_emb_max_abs_diff": float(np.abs(text - ref["text"]).max()),
      "text_emb_max_abs": float(np.abs(ref["text"]).max()),
      "legacy_pool_text_emb_max_abs_diff": float(np.abs(legacy - ref["legacy"]).max()),
      "image_emb_max_abs_diff": float(np.abs(image - ref["image"]).max()),
      "image_emb_max_abs": float(np.abs(ref["image"]).max()),
      "clip_score_ours": float(pairs.mean()), "clip_score_transformers": theirs_score,
      "clip_score_abs_diff": abs(float(pairs.mean()) - theirs_score),
      "pair_score_max_abs_diff": float(np.abs(pairs - np.maximum(ref["pairs"], 0)).max()),
  }


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--torch_python", default=DEFAULT_TORCH_PYTHON)
  p.add_argument("--out", default="/tmp/clip_parity")
  p.add_argument("--prompts", default=DEFAULT_PROMPTS)
  p.add_argument("--torch_worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  with open(args.prompts, encoding="utf-8") as f:
    prompts = [line.strip() for line in f if line.strip()] + TRICKY
  if args.torch_worker:
    torch_worker(args.out, prompts)
    return 0
  os.makedirs(args.out, exist_ok=True)
  prepare(args.out, prompts)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch_worker",
                  f"--out={args.out}", f"--prompts={args.prompts}"], check=True, env=env)
  print(json.dumps(compare(args.out, prompts), indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
