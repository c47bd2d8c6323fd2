"""imagen-embed as a 2-process x 2-device job (launch/multiprocess_cpu.sh) writes the same
cache as one process: the same keys, the same values within bfloat16 rounding; a rerun
with more captions embeds only those, each process its share, and rewrites no shard."""

import json
import pathlib
import subprocess

import numpy as np
import pytest
import seqio

from imagen_jax.cli import embed
from imagen_jax.text import cache as cache_lib
from imagen_jax.text import t5

SEQIO_MODEL = (pathlib.Path(seqio.__file__).parent / "test_data" / "sentencepiece" /
               "sentencepiece.model")
REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCHER = str(REPO / "launch" / "multiprocess_cpu.sh")
TINY = t5.T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu")
CAPTIONS = [f"a {size} {colour} {shape}" for size in ("small", "large")
            for colour in ("red", "blue", "green") for shape in ("circle", "square")]
MORE = [f"a {colour} triangle above a {shape}" for colour in ("red", "blue", "green")
        for shape in ("circle", "square")]


def _args(t5_dir, cache_dir, captions):
  return ["--gin_file=runs/embed.gin", f"--gin.CACHE_DIR='{cache_dir}'",
          f"--gin.T5_PATH='{t5_dir}'", "--gin.text_encoder.batch_size=4",
          "--gin.MAX_LENGTH=48", "--gin.embed.shard_size=3", "--no_progress",
          f"--captions={captions}"]


def _two_processes(args):
  result = subprocess.run(
      [LAUNCHER, "2", "--devices_per_process=2", "--timeout=200", "--", "imagen-embed",
       *args], capture_output=True, text=True, timeout=240, cwd=REPO)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def _values(cache_dir):
  cache = cache_lib.EmbeddingCache.open(cache_dir)
  return {key: cache.lookup(caption).astype(np.float32)
          for key, caption in ((cache_lib.caption_key(c), c)
                               for c in CAPTIONS + MORE) if caption in cache}


@pytest.mark.slow
def test_two_process_cache_equals_one_process_and_resumes(tmp_path):
  t5_dir = tmp_path / "t5"
  t5.save_random_encoder(t5_dir, TINY, seed=0, spiece_model=SEQIO_MODEL)
  first = tmp_path / "first.txt"
  first.write_text("\n".join(CAPTIONS + CAPTIONS[:3]) + "\n")  # 3 duplicates
  everything = tmp_path / "all.txt"
  everything.write_text("\n".join(CAPTIONS + MORE) + "\n")
  one, two = tmp_path / "one", tmp_path / "two"
  assert embed.main(_args(t5_dir, one, everything)) == 0  # here: 1 process, 8 devices

  out = _two_processes(_args(t5_dir, two, first))
  assert f"[0] {len(CAPTIONS)} new captions embedded (0 already cached, 3 duplicates)" in out
  reports = [l for l in out.splitlines() if "new captions embedded" in l]
  assert len(reports) == 1 and reports[0].startswith("[0] ")  # process 0 reports
  summary = json.loads((two / embed.SUMMARY_FILE).read_text())
  assert (summary["processes"], summary["devices"], summary["new"]) == (2, 4, len(CAPTIONS))
  shares = [p["new"] for p in summary["per_process"]]
  assert sum(shares) == len(CAPTIONS) and min(shares) > 0  # both processes embedded
  assert all(p["devices"] == 2 and p["captions_per_s_per_device"] > 0
             for p in summary["per_process"])
  # The run lasts as long as its slowest process, from its start to the merged cache.
  assert summary["seconds"] == max(p["wall_seconds"] for p in summary["per_process"])
  assert all(p["wall_seconds"] >= p["seconds"] for p in summary["per_process"])
  manifest = cache_lib.read_manifest(two)
  assert not list(two.glob(cache_lib.PART_PREFIX + "*"))  # merged into manifest.json
  files = {s["file"] for s in manifest["shards"]}
  assert {f.split("-")[1] for f in files} == {"p00000", "p00001"}  # each its own shards
  written = {f: (two / f).read_bytes() for f in files}

  # The rerun embeds only the captions it lacks, and leaves the shards it has alone.
  out = _two_processes(_args(t5_dir, two, everything))
  assert f"[0] {len(MORE)} new captions embedded ({len(CAPTIONS)} already cached" in out
  assert all((two / f).read_bytes() == data for f, data in written.items())

  values_one, values_two = _values(one), _values(two)
  assert sorted(values_two) == sorted(values_one)
  assert len(values_one) == len(CAPTIONS + MORE)
  assert cache_lib.EmbeddingCache.open(two).keys() == cache_lib.EmbeddingCache.open(one).keys()
  for key, value in values_one.items():
    # Other batch shapes and devices: float32 results may differ in the last bits, which
    # bfloat16 rounding turns into at most one bfloat16 step (2^-8 relative).
    np.testing.assert_allclose(values_two[key], value, rtol=2 ** -7, atol=1e-6)
