"""The quickstart: its text assets (imagen_jax.quickstart.text_assets), its prompts, and the whole
`launch/quickstart.sh --smoke` path (every phase, tiny models, a few steps)."""

import json
import os
import pathlib
import re
import subprocess

import numpy as np
import pytest

from imagen_jax.data import shapes
from imagen_jax.errors import UserError
from imagen_jax.quickstart import text_assets
from imagen_jax.text import vocab

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "gin_configs" / "experiments" / "quickstart_prompts.txt"


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  """The random encoder (no grounding): the properties below are those of its init."""
  return pathlib.Path(text_assets.make_toy_text_assets(tmp_path_factory.mktemp("toy") / "t5",
                                               grounding_steps=0))


def test_toy_assets_are_deterministic(toy_dir, tmp_path):
  # A few steps of grounding: enough to check that it runs, changes the weights and is
  # deterministic (tests/test_quickstart_grounding.py checks what it learns).
  grounded = [pathlib.Path(text_assets.make_toy_text_assets(tmp_path / name, grounding_steps=8))
              for name in ("a", "b")]
  for name in ("config.json", "model.safetensors", "spiece.model", "grounding.json"):
    assert (grounded[0] / name).read_bytes() == (grounded[1] / name).read_bytes(), name
  report = json.loads((grounded[0] / "grounding.json").read_text())
  assert report["steps"] == 8 and report["seed"] == 0
  # Grounding changed the random weights; 0 steps keeps them and writes no report.
  assert not (toy_dir / "grounding.json").exists()
  assert (toy_dir / "model.safetensors").read_bytes() != (
      grounded[0] / "model.safetensors").read_bytes()
  again = pathlib.Path(text_assets.make_toy_text_assets(tmp_path / "random", grounding_steps=0))
  assert (again / "model.safetensors").read_bytes() == (
      toy_dir / "model.safetensors").read_bytes()
  other_seed = pathlib.Path(text_assets.make_toy_text_assets(tmp_path / "t5_seed1", seed=1,
                                                     grounding_steps=0))
  assert (other_seed / "model.safetensors").read_bytes() != (
      toy_dir / "model.safetensors").read_bytes()


def test_toy_tokenizer_keeps_grammar_words_whole(toy_dir):
  v = vocab.load_vocabulary(toy_dir / "spiece.model")
  sp = v.tokenizer
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
  words = sorted({w for c in shapes.all_captions("train") for w in c.split()})
  for word in words:
    assert len(sp.encode(word)) == 1, (word, sp.encode(word, out_type=str))
  captions = shapes.all_captions("train") + shapes.all_captions("held_out")
  tokens = vocab.tokenize(v, captions, max_length=text_assets.DEFAULT_MAX_LENGTH)
  assert not tokens.truncated
  assert (tokens.ids != 2).all()  # no <unk>, held-out captions included
  assert tokens.mask.sum(1).max() == 11  # 10 words + EOS
  # "blue" and "purple" (unknown letters for seqio's test model) are distinct pieces.
  assert sp.encode("blue") != sp.encode("purple")
  # A word outside the grammar made of the corpus' letters is spelled, not dropped.
  assert 2 not in sp.encode("a pale dog") and len(sp.encode("dog")) > 1


def test_toy_encoder_loads_and_separates_captions(toy_dir):
  from imagen_jax.text.encode import TextEncoder
  config = json.loads((toy_dir / "config.json").read_text())
  assert config["d_model"] == 64 and config["vocab_size"] == 96
  enc = TextEncoder.load(toy_dir, max_length=text_assets.DEFAULT_MAX_LENGTH, batch_size=8)
  caps = ["a red circle above a blue square", "a blue circle above a red square",
          "a red circle below a blue square"]
  emb, mask = enc.encode(caps)
  assert emb.shape == (3, text_assets.DEFAULT_MAX_LENGTH, 64) and mask.sum(1).tolist() == [8, 8, 8]
  assert np.isfinite(emb).all()
  # Swapped colours and a changed relation give different embeddings.
  assert np.abs(emb[0] - emb[1]).max() > 0.1 and np.abs(emb[0] - emb[2]).max() > 0.1
  # Word order survives: "red" as the first object vs as the second (same words, roles
  # swapped) moves its embedding by a good part of its norm. With T5's initial position
  # bias scale (d_model ** -0.5) it moved by only 4-7%, a near bag of words.
  swapped = ["a red circle above a blue square", "a blue square above a red circle"]
  (first, second), _ = enc.encode(swapped)
  red_first, red_second = first[1], second[5]
  assert np.linalg.norm(red_first - red_second) > 0.2 * np.linalg.norm(red_first)


def test_toy_bad_input(tmp_path):
  with pytest.raises(UserError, match="grounding_steps=-1"):
    text_assets.make_toy_text_assets(tmp_path / "t5", grounding_steps=-1)
  with pytest.raises(UserError, match="num_heads"):
    text_assets.toy_t5_config(d_model=30, num_heads=4)
  with pytest.raises(UserError, match="no non-empty"):
    vocab.train_sentencepiece(["", "  "], tmp_path / "sp.model", 96, model_type="bpe")


def test_prompts_file():
  prompts = [l for l in PROMPTS.read_text().splitlines() if l.strip()]
  assert 40 <= len(prompts) <= 60
  parsed = [shapes.parse_caption(p) for p in prompts]
  held = [p for p in prompts if shapes.is_held_out(p)]
  one = [p for p, c in zip(prompts, parsed) if c.relation is None]
  assert len(held) >= 8 and len(one) >= 8
  for relation in shapes.RELATIONS:
    assert any(c.relation == relation for c in parsed), relation
  for color in shapes.COLORS:
    assert any(color in p.split() for p in prompts), color


def _quickstart(*args, env=None, timeout=900):
  env = dict(os.environ if env is None else env)
  # The quickstart runs as a user runs it, choosing its CPU devices itself (one per usable
  # core), not with the tests' 8 simulated ones.
  env.pop("XLA_FLAGS", None)
  return subprocess.run([str(ROOT / "launch" / "quickstart.sh"), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_quickstart_bad_arguments(tmp_path):
  result = _quickstart("--bogus", str(tmp_path / "out"))
  assert result.returncode == 2 and "unknown option --bogus" in result.stderr
  result = _quickstart(f"--t5={tmp_path / 'missing'}", str(tmp_path / "out"))
  assert result.returncode == 2 and "is not a T5 directory" in result.stderr
  result = _quickstart("--grounding_steps=-3", str(tmp_path / "out"))
  assert result.returncode == 2 and "--grounding_steps=-3 must be a whole number" in result.stderr
  result = _quickstart("--grounding_steps=5", f"--t5={tmp_path}", str(tmp_path / "out"))
  assert result.returncode == 2 and "drop one of the two" in result.stderr
  for minutes in ("5", "ten"):
    result = _quickstart(f"--minutes={minutes}", str(tmp_path / "out"))
    assert result.returncode == 2 and f"--minutes={minutes} must be a whole number" in result.stderr


@pytest.mark.slow
def test_quickstart_smoke_runs_every_phase(tmp_path):
  out = tmp_path / "qs"
  result = _quickstart("--smoke", str(out))
  log = result.stdout + result.stderr
  assert result.returncode == 0, log[-4000:]
  for header in ("1. text encoder", "2. caption embeddings", "3. base model", "4. SR model",
                 "5. sampling", "6. ShapesBench", "quickstart finished"):
    assert header in result.stdout, header
  assert "ShapesBench, stage 0 (16px)" in result.stdout
  cores = len(os.sched_getaffinity(0))
  devices = max(d for d in (1, 2, 4, 8) if d <= cores)  # one per core, a power of two
  assert f"XLA_FLAGS: --xla_force_host_platform_device_count={devices}\n" in result.stdout
  assert "ShapesBench, stage 1 (64px)" in result.stdout
  # Each training stage's time guard is what is left of the 20-minute budget less what the
  # later phases need (320 s after the base, 120 s after SR), and reaches imagen-train.
  guards = [float(g) for g in re.findall(r"^time guard: ([0-9.]+) min", result.stdout, re.M)]
  assert len(guards) == 2, result.stdout
  assert 1 <= guards[0] <= 20 - 320 / 60 and 1 <= guards[1] <= 20 - 120 / 60, guards
  for stage, guard in zip(("base", "sr"), guards):
    assert f"train.max_minutes = {guard}\n" in (out / stage / "config.gin").read_text(), stage
  samples = out / "samples"
  rows = [json.loads(l) for l in (samples / "index.jsonl").read_text().splitlines()]
  prompts = (out / "smoke_prompts.txt").read_text().splitlines()
  assert sorted((r["stage"], r["prompt"]) for r in rows) == sorted(
      (s, p) for s in (0, 1) for p in prompts)
  from PIL import Image
  for r in rows:
    size = Image.open(samples / r["file"]).size
    assert size == ((16, 16) if r["stage"] == 0 else (64, 64)), (r["file"], size)
  assert (samples / "grid.png").exists()
  bench = json.loads((samples / "shapesbench.json").read_text())
  assert bench["n_scored"] == 2 * len(prompts)
  for stage in bench["stages"].values():
    assert {"train", "held_out"} <= set(stage), stage
  # The small T5 was grounded (5 steps in smoke), and both stages were trained on its
  # embeddings (its width, its identity).
  assert json.loads((out / "t5" / "grounding.json").read_text())["steps"] == 5
  cache = json.loads((out / "cache" / "manifest.json").read_text())
  for stage, size in (("base", 16), ("sr", 64)):
    info = json.loads((out / stage / "model.json").read_text())
    assert info["image_size"] == size and info["text_dim"] == 64
    assert info["encoder"]["weights_sha256"] == cache["encoder"]["weights_sha256"]

  # Running it again resumes: the grounded T5 is reused (not rewritten), training and
  # sampling find their work done, and the images are unchanged.
  weights = (out / "t5" / "model.safetensors").read_bytes()
  grid = (samples / "grid.png").read_bytes()
  again = _quickstart("--smoke", str(out))
  assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
  assert f"reusing {out / 't5'}" in again.stdout
  assert (out / "t5" / "model.safetensors").read_bytes() == weights
  assert (samples / "grid.png").read_bytes() == grid
