"""imagen-embed: in-process runs (captions file, second run, bad input) and one subprocess
run over the built-in shapes data, as a user types it."""

import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest

from imagen_jax.cli import embed
from imagen_jax.errors import UserError
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import t5, vocab

REPO = pathlib.Path(__file__).resolve().parent.parent


def _args(tiny_t5_dir, cache_dir, *extra):
  return ["--gin_file=runs/embed.gin", f"--gin.CACHE_DIR='{cache_dir}'",
          f"--gin.T5_PATH='{tiny_t5_dir}'", "--gin.text_encoder.batch_size=8",
          "--gin.MAX_LENGTH=48", "--gin.embed.shard_size=4", "--no_progress",
          *extra]


def test_embed_captions_file_then_nothing_new(tiny_t5_dir, seqio_spm, tmp_path, capsys):
  captions = tmp_path / "captions.txt"
  lines = ["a red circle", "a blue square", "  a red circle ", "", "A red circle",
           "a green triangle above a red square", "a blue square"]
  captions.write_text("\n".join(lines) + "\n")
  cache_dir = tmp_path / "cache"
  assert embed.main(_args(tiny_t5_dir, cache_dir, f"--captions={captions}")) == 0
  out = capsys.readouterr().out
  assert "4 new captions" in out and "2 duplicates" in out
  cache = cache_lib.EmbeddingCache.open(cache_dir)
  assert len(cache) == 4  # "a red circle" twice (once with spaces), "a blue square" twice
  assert [s["count"] for s in cache.manifest["shards"]] == [4]
  n = int(vocab.tokenize(vocab.load_vocabulary(seqio_spm), ["a red circle"]).mask.sum())
  assert cache.lookup("a red circle").shape == (n, 32)  # real tokens only, EOS included
  config = (cache_dir / "config.gin").read_text()
  assert f"T5_PATH = '{tiny_t5_dir}'" in config and "embed.shard_size = 4" in config
  # The second run adds nothing.
  manifest = (cache_dir / "manifest.json").read_bytes()
  assert embed.main(_args(tiny_t5_dir, cache_dir, f"--captions={captions}")) == 0
  assert "0 new captions embedded (4 already cached" in capsys.readouterr().out
  assert (cache_dir / "manifest.json").read_bytes() == manifest
  # The command that the missing-caption error gives adds the caption, same encoder.
  with pytest.raises(UserError, match="a purple hexagon") as error:
    cache.lookup("a purple hexagon")
  message = str(error.value)
  command = shlex.split(message[message.index("imagen-embed"):message.index("--captions")])
  new = tmp_path / "new.txt"
  new.write_text("a purple hexagon\n")
  assert embed.main(command[1:] + [f"--captions={new}", "--no_progress"]) == 0
  assert "1 new captions embedded (0 already cached" in capsys.readouterr().out
  cache = cache_lib.EmbeddingCache.open(cache_dir)
  assert len(cache) == 5 and cache.manifest["encoder"]["max_length"] == 48
  assert cache.lookup("a purple hexagon").shape[1] == 32
  # --verify checks every checksum.
  assert embed.main(_args(tiny_t5_dir, cache_dir, "--verify")) == 0
  assert "all checksums match" in capsys.readouterr().out


def test_embed_bad_input_exits_2(tiny_t5_dir, tiny_t5_config, seqio_spm, tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  cache_dir = tmp_path / "cache"
  assert embed.main(_args(tiny_t5_dir, cache_dir, f"--captions={empty}")) == 2
  assert "empty.txt' is empty" in capsys.readouterr().err
  assert embed.main(_args(tiny_t5_dir, cache_dir)) == 2  # neither DATASET nor --captions
  assert "no captions" in capsys.readouterr().err
  captions = tmp_path / "c.txt"
  captions.write_text("a red circle\n")
  no_t5 = [a for a in _args(tiny_t5_dir, cache_dir) if "T5_PATH" not in a]
  assert embed.main(no_t5 + [f"--captions={captions}"]) == 2
  assert "T5_PATH" in capsys.readouterr().err
  # A cache made by one encoder refuses another one.
  assert embed.main(_args(tiny_t5_dir, cache_dir, f"--captions={captions}")) == 0
  other = tmp_path / "other_t5"
  t5.save_random_encoder(other, tiny_t5_config, seed=1, spiece_model=seqio_spm)
  capsys.readouterr()
  assert embed.main(_args(other, cache_dir, f"--captions={captions}")) == 2
  assert "weights_sha256" in capsys.readouterr().err


def test_imagen_embed_command_over_shapes(tiny_t5_dir, seqio_spm, tmp_path):
  """The installed command, in a fresh process, over the held-out shapes captions."""
  cache_dir = tmp_path / "cache"
  command = [str(pathlib.Path(sys.executable).parent / "imagen-embed"),
             *_args(tiny_t5_dir, cache_dir, "--gin.DATASET='shapes:held_out'",
                    "--gin.text_encoder.batch_size=32", "--gin.embed.shard_size=50")]
  env = dict(os.environ)
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "72 new captions embedded" in result.stdout
  from imagen_jax.data import shapes
  captions = shapes.all_captions("held_out")
  cache = cache_lib.EmbeddingCache.open(cache_dir)
  assert len(cache) == len(captions) == 72
  assert [s["count"] for s in cache.manifest["shards"]] == [50, 22]
  emb, mask = cache.get_batch(captions[:4], 48)
  tokens = vocab.tokenize(vocab.load_vocabulary(seqio_spm), captions[:4], 48)
  assert emb.shape == (4, 48, 32)
  np.testing.assert_array_equal(mask, tokens.mask)
  assert np.isfinite(emb.astype(np.float32)).all()
