"""imagen-train end to end: a tiny U-Net on the shapes data learns (falling loss), and bad
input stops with one clear line; export, load_for_inference and INIT_FROM on that run."""

import json
import re

import jax
import numpy as np
import pytest

import test_train_lib as lib
from imagen_jax.cli import train as cli
from imagen_jax.train import checkpoint as ckpt_lib
from imagen_jax.train import export as export_lib
from imagen_jax.train import state as state_lib

STEPS = 150
# A smaller U-Net than models/tiny_base.gin (8x8 images, 16 channels, one device) so that
# a few hundred steps fit in seconds on a 2-core CPU.
SMALL = ["--gin.IMAGE_SIZE=8", "--gin.TEXT_DIM=16", "--gin.UNet.model_channels=16",
         "--gin.UNet.channel_mult=(1, 2)", "--gin.UNet.num_res_blocks=1",
         "--gin.UNet.attention_resolutions=(4,)", "--gin.UNet.head_dim=16",
         "--gin.train.num_devices=1", "--gin.train.val_every=0",
         "--gin.lr_schedule.peak_lr=2e-3", "--gin.lr_schedule.warmup_steps=20"]


@pytest.fixture(scope="module")
def cache_dir(shapes_word_cache):
  return shapes_word_cache


def _args(model_dir, cache_dir, *extra):
  return ["--gin_file=experiments/tiny_base.gin", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.CACHE_DIR='{cache_dir}'", *SMALL, *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
  model_dir = tmp_path_factory.mktemp("run")
  capture = pytest.MonkeyPatch()
  import io
  import sys
  out = io.StringIO()
  capture.setattr(sys, "stdout", out)
  try:
    code = cli.main(_args(model_dir, cache_dir, f"--gin.TRAIN_STEPS={STEPS}",
                          "--gin.train.log_every=25", f"--gin.train.checkpoint_every={STEPS}"))
  finally:
    capture.undo()
  assert code == 0, out.getvalue()[-2000:]
  losses = [float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+\s+loss ([\d.]+)",
                                                   out.getvalue())]
  return model_dir, losses


def test_tiny_base_loss_falls_on_shapes(trained):
  model_dir, losses = trained
  assert len(losses) == STEPS // 25, losses
  # Loose bound: the mean loss of the last 50 steps is under half that of the first 25.
  assert np.mean(losses[-2:]) < 0.5 * losses[0], losses
  info = json.loads((model_dir / "model.json").read_text())
  assert info["model_class"] == "UNet" and info["image_size"] == 8 and info["text_dim"] == 16
  assert info["encoder"]["name"] == "words"
  config = (model_dir / "config.gin").read_text()
  assert "TRAIN_STEPS = 150" in config and "UNet.model_channels = 16" in config


def test_export_and_load_for_inference(trained, tmp_path):
  model_dir, _ = trained
  model, info = ckpt_lib.load_for_inference(model_dir)
  assert type(model).__name__ == "UNet" and model.image_size == 8
  assert info.step == STEPS and info.use_ema and info.objective == "eps"
  assert "UNet.model_channels = 16" in info.model_gin
  from flax import nnx
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ema, _ = ckpt_lib.restore_params(model_dir, state_lib.abstract_like(params), use_ema=True)
  assert lib.params_equal(params, ema)
  raw, _ = ckpt_lib.restore_params(model_dir, state_lib.abstract_like(params), use_ema=False)
  assert not lib.params_equal(raw, ema)

  assert export_lib.main([str(model_dir), str(tmp_path / "export")]) == 0
  from safetensors.numpy import load_file
  tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
  flat = export_lib.flatten_params(ema)
  assert set(tensors) == set(flat)
  assert all(np.array_equal(tensors[k], flat[k]) for k in flat)
  assert "UNet.model_channels = 16" in (tmp_path / "export" / "model.gin").read_text()
  exported = json.loads((tmp_path / "export" / "model.json").read_text())
  assert exported["exported"] == {"step": STEPS, "params": "ema", "from": str(model_dir)}


def test_init_from_starts_at_the_source_params(trained, cache_dir, tmp_path):
  source, _ = trained
  code = cli.main(_args(tmp_path / "ft", cache_dir, f"--gin.INIT_FROM='{source}'",
                        "--gin.TRAIN_STEPS=1", "--gin.train.checkpoint_every=1"))
  assert code == 0
  model, _ = ckpt_lib.load_for_inference(source, use_ema=False)
  from flax import nnx
  src = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  new, step = ckpt_lib.restore_params(tmp_path / "ft", state_lib.abstract_like(src),
                                      use_ema=False)
  assert step == 1
  # One Adam step at lr 2e-3/20 moves each parameter by about 1e-4: far from a fresh init.
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(src)))
  assert 0 < diff < 1e-3


def _fails(capsys, argv, pattern):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert re.search(pattern, err), err
  assert "Traceback" not in err


def test_bad_input_errors(trained, cache_dir, tmp_path, capsys):
  model_dir, _ = trained
  steps = "--gin.TRAIN_STEPS=1"
  _fails(capsys, _args(tmp_path / "a", cache_dir, steps, "--gin.train.chekpoint_every=5"),
         r"chekpoint_every")
  _fails(capsys, ["--gin_file=experiments/tiny_base.gin"], r"MODEL_DIR")
  _fails(capsys, _args(tmp_path / "b", tmp_path / "no_cache", steps),
         r"embedding cache .*not found.*imagen-embed")
  _fails(capsys, _args(tmp_path / "c", cache_dir, steps, "--gin.TEXT_DIM=32"),
         r"16-wide.*text_dim is 32")
  _fails(capsys, _args(tmp_path / "d", cache_dir, steps, "--gin.BATCH_SIZE=12",
                       "--gin.train.num_devices=8"),
         r"BATCH_SIZE=12 is not divisible by the data-parallel size 8")
  _fails(capsys, _args(model_dir, cache_dir, f"--gin.TRAIN_STEPS={STEPS + 1}",
                       "--gin.UNet.model_channels=8"),
         r"holds a checkpoint of another model.*num_params")
