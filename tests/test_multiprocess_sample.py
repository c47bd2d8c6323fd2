"""imagen-sample as a 2-process x 2-device job (launch/multiprocess_cpu.sh) gives the same
images and index as one process: each process samples its share, process 0 merges
index.jsonl after a barrier and writes the grid."""

import json
import os
import pathlib
import subprocess

import gin
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from imagen_jax import config
from imagen_jax.cli import sample as sample_cli

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCHER = str(REPO / "launch" / "multiprocess_cpu.sh")

BASE_GIN = """
create_model.model_cls = @UNet
UNet.image_size = 8
UNet.text_dim = 16
UNet.model_channels = 8
UNet.channel_mult = (1, 2)
UNet.num_res_blocks = 1
UNet.attention_resolutions = (4,)
UNet.head_dim = 8
UNet.num_groups = 4
"""
PROMPTS = ["a red circle", "a blue square", "a green triangle left of a red circle"]
NUM_SAMPLES = 2  # 6 images: 3 per process
MAX_LENGTH = 8


def write_base_stage(model_dir: pathlib.Path, identity: dict) -> str:
  """A base-stage checkpoint in imagen-train's format with random non-zero parameters
  (drawn with numpy on the abstract model: no eager JAX op per parameter)."""
  from imagen_jax import nn
  from imagen_jax.train import checkpoint, state as state_lib, step as step_lib
  gin.clear_config()
  gin.parse_config(BASE_GIN)
  model = nnx.eval_shape(lambda: nn.create_model(rngs=nnx.Rngs(params=1, dropout=1)))
  _, shapes, _ = state_lib.split_model(model)
  rng = np.random.default_rng(1)
  # Zero-initialised output layers would make every image the same: all random.
  params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
                        shapes)
  state = jax.jit(lambda p: state_lib.init_train_state(p, optax.adam(1e-3), 1))(params)
  ckpt = checkpoint.Checkpointer(model_dir, async_save=False)
  ckpt.save(state, force=True)
  ckpt.close()
  info = checkpoint.model_info(model, params, loss_cfg=step_lib.LossConfig(), encoder=identity)
  checkpoint.check_or_write_model_json(model_dir, info)
  (model_dir / "model.gin").write_text(config.model_gin_str())
  gin.clear_config()
  return os.fspath(model_dir)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  from imagen_jax.text import encode, t5, vocab
  root = tmp_path_factory.mktemp("mp_sample")
  spiece = vocab.train_sentencepiece(PROMPTS * 4 + ["orange rectangle below"],
                                     root / "sp.model", vocab_size=40)
  t5_dir = t5.save_random_encoder(root / "t5", t5.T5Config(
      vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2), seed=0,
      spiece_model=spiece)
  identity = encode.TextEncoder.load(t5_dir, max_length=MAX_LENGTH, batch_size=8).identity
  base = write_base_stage(root / "base", identity)
  (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
  (root / "sample.gin").write_text(
      "include 'runs/sample.gin'\n"
      f"BASE_DIR = '{base}'\nT5_PATH = '{t5_dir}'\nMAX_LENGTH = {MAX_LENGTH}\n"
      "load_cascade.stages = [@base/Stage()]\n"
      "load_cascade.batch_size = 4\n"
      "base/Stage.sampler = 'ddpm'\nbase/Stage.num_steps = 3\n")
  return root


def args(env, out_dir):
  return [f"--gin_file={env / 'sample.gin'}", f"--prompts={env / 'prompts.txt'}",
          f"--out_dir={out_dir}", f"--num_samples={NUM_SAMPLES}", "--seed=3", "--no_progress"]


def pixels(out_dir: pathlib.Path) -> dict[str, np.ndarray]:
  return {p.relative_to(out_dir).as_posix(): np.asarray(Image.open(p))
          for p in out_dir.rglob("stage*/*.png")}


@pytest.mark.slow
def test_two_process_sampling_matches_one_process(env):
  one = env / "one"
  assert sample_cli.main(args(env, one)) == 0  # in this process: 1 process, 8 devices
  two = env / "two"
  result = subprocess.run(
      [LAUNCHER, "2", "--devices_per_process=2", "--timeout=200", "--", "imagen-sample",
       *args(env, two)], capture_output=True, text=True, timeout=240, cwd=REPO)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  # Only process 0 reports, and only it writes the grid and the merged index.
  assert "[0] wrote" in result.stdout and "[1] wrote" not in result.stdout
  assert (two / "grid.png").exists()
  assert not list(two.glob("index.part-*"))  # merged into index.jsonl
  rows_one = [json.loads(l) for l in (one / "index.jsonl").read_text().splitlines()]
  rows_two = [json.loads(l) for l in (two / "index.jsonl").read_text().splitlines()]
  assert len(rows_two) == len(PROMPTS) * NUM_SAMPLES
  key = lambda r: (r["prompt_index"], r["sample"], r["stage"])
  assert sorted(rows_two, key=key) == sorted(rows_one, key=key)
  images_one, images_two = pixels(one), pixels(two)
  assert sorted(images_two) == sorted(images_one) and len(images_two) == 6
  for name in images_one:
    # Per-image keys: an image does not depend on which process or batch made it. The
    # model runs on other batch shapes and devices here, so allow one 8-bit level.
    diff = np.abs(images_one[name].astype(int) - images_two[name].astype(int))
    assert diff.max() <= 1, name
  # Different images per prompt/sample (the comparison above is not vacuous).
  assert len({v.tobytes() for v in images_one.values()}) == 6
