"""The shared gin launcher: t5x-style flags, search paths and one-line errors."""

import argparse

import gin
import pytest

from imagen_jax.cli import gin_utils
from imagen_jax.errors import UserError


@gin.configurable
def _probe(value=1, name="x"):
  return value, name


def _parser():
  p = argparse.ArgumentParser()
  gin_utils.add_gin_flags(p)
  return p


def test_dot_shorthand_becomes_binding_and_later_wins(tmp_path):
  f = tmp_path / "a.gin"
  f.write_text("_probe.value = 3\n_probe.name = 'file'\n")
  args = gin_utils.parse_args(_parser(), [f"--gin_file={f}", "--gin._probe.value=7",
                                          "--gin._probe.value", "9"])
  gin_utils.apply_gin_args(args)
  assert _probe() == (9, "file")


def test_unknown_binding_names_file_and_line(tmp_path):
  f = tmp_path / "bad.gin"
  f.write_text("_probe.value = 1\n_probe.vlaue = 2\n")
  with pytest.raises(UserError, match=r"bad.gin.*line 2|line 2.*bad.gin"):
    gin_utils.parse_gin([str(f)])


def test_missing_gin_file_says_where_it_looked():
  with pytest.raises(UserError, match="not found"):
    gin_utils.parse_gin(["no/such/file.gin"])


def test_required_macros(tmp_path):
  f = tmp_path / "m.gin"
  f.write_text("MODEL_DIR = 'x'\n_probe.name = %MODEL_DIR\n")
  gin_utils.parse_gin([str(f)])
  gin_utils.require_macros("MODEL_DIR")
  with pytest.raises(UserError, match="TRAIN_STEPS"):
    gin_utils.require_macros("MODEL_DIR", "TRAIN_STEPS")


def test_run_turns_user_error_into_exit_2(capsys):
  def main(argv):
    raise UserError("bad thing; do X")
  assert gin_utils.run(main, []) == 2
  assert capsys.readouterr().err.strip() == "error: bad thing; do X"


def test_operative_config_written(tmp_path):
  gin_utils.parse_gin([], ["_probe.value = 5"])
  _probe()
  path = gin_utils.write_operative_config(tmp_path / "run")
  assert "_probe.value = 5" in open(path).read()
