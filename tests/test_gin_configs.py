"""Every gin file shipped under gin_configs/ parses with every configurable registered, and
the sample configs' stages hold valid settings."""

import pathlib

import gin
import pytest

import imagen_jax.cli.embed  # noqa: F401  (registers the configurables the files bind)
import imagen_jax.nn  # noqa: F401
import imagen_jax.text.encode  # noqa: F401
import imagen_jax.train.loop  # noqa: F401
from imagen_jax.cli import gin_utils
from imagen_jax.sample import cascade as cascade_lib

GIN_ROOT = pathlib.Path(__file__).resolve().parent.parent / "gin_configs"
FILES = sorted(p.relative_to(GIN_ROOT).as_posix() for p in GIN_ROOT.rglob("*.gin"))


def test_the_list_holds_every_kind_of_config():
  assert {"experiments/imagen_base64.gin", "experiments/imagen_sr256.gin",
          "experiments/imagen_sr1024.gin", "experiments/tiny_sr2.gin",
          "experiments/tiny_cascade3_sample.gin", "runs/sample.gin",
          "runs/train.gin", "runs/embed.gin", "models/tiny_base.gin"} <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_every_shipped_gin_file_parses(name):
  gin.clear_config()
  gin_utils.parse_gin([name], finalize=False)
  try:
    stages = gin.query_parameter("load_cascade.stages")
  except ValueError:
    return  # not a sample config
  # Each stage of a sample config builds: its sampler settings are valid.
  for ref in stages:
    with gin.config_scope(ref.scoped_selector.split("/")[0]):
      stage = cascade_lib.Stage()
    assert stage.model_dir and stage.num_steps >= 1


def test_tiny_sr2_continues_tiny_sr():
  gin.clear_config()
  gin_utils.parse_gin(["experiments/tiny_sr2.gin"], finalize=False)
  model = imagen_jax.nn.abstract_model()
  assert (model.image_size, model.lowres_size) == (128, 64)
  gin.clear_config()
  gin_utils.parse_gin(["experiments/tiny_cascade3_sample.gin"], finalize=False)
  assert [r.scoped_selector for r in gin.query_parameter("load_cascade.stages")] == [
      "base/Stage", "sr/Stage", "sr2/Stage"]
