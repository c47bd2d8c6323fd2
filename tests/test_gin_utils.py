"""The gin helpers (imagen_jax.config) and the CLI launcher (imagen_jax.cli.gin_utils):
t5x-style flags, search paths, one-line errors, and a library that never imports cli/."""

import argparse
import ast
import os
import pathlib
import subprocess
import sys

import gin
import pytest

from imagen_jax import config
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
    config.parse_gin([str(f)])


def test_missing_gin_file_says_where_it_looked():
  with pytest.raises(UserError, match="not found"):
    config.parse_gin(["no/such/file.gin"])


def test_required_macros(tmp_path):
  f = tmp_path / "m.gin"
  f.write_text("MODEL_DIR = 'x'\n_probe.name = %MODEL_DIR\n")
  config.parse_gin([str(f)])
  config.require_macros("MODEL_DIR")
  with pytest.raises(UserError, match="TRAIN_STEPS"):
    config.require_macros("MODEL_DIR", "TRAIN_STEPS")


def test_run_turns_user_error_into_exit_2(capsys):
  def main(argv):
    raise UserError("bad thing; do X")
  assert gin_utils.run(main, []) == 2
  assert capsys.readouterr().err.strip() == "error: bad thing; do X"


def test_error_inside_a_configurable_is_one_line_without_gins_trailer(capsys):
  """gin appends "In call to configurable '_raises' (<function ...>)" to any exception
  raised inside a configurable; run() prints only the message."""
  @gin.configurable
  def _raises(value=1):
    raise UserError(f"value={value} is bad; set _raises.value to 2")

  config.parse_gin([], ["_raises.value = 3"])
  with pytest.raises(UserError, match="In call to configurable"):  # what gin raises
    _raises()
  assert gin_utils.run(lambda argv: _raises(), []) == 2
  err = capsys.readouterr().err
  assert err == "error: value=3 is bad; set _raises.value to 2\n"


def test_gin_parse_error_is_one_line(tmp_path, capsys):
  f = tmp_path / "bad.gin"
  f.write_text("_probe.value = 1\n_probe.vlaue = 2\n")
  assert gin_utils.run(lambda argv: config.parse_gin([str(f)]), []) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "bad.gin" in err and "line 2" in err, err


def test_train_cli_error_is_exactly_one_line(tmp_path, capsys):
  from imagen_jax.cli import train as train_cli
  code = train_cli.main([f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=1",
                         "--gin.DATASET='shapes'", "--gin.BATCH_SIZE=8",
                         "--gin_file=models/tiny_base.gin", "--gin_file=runs/train.gin",
                         "--gin.train.max_minutes=-1"])
  assert code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: train.max_minutes must be > 0") and err.count("\n") == 1, err


def test_operative_config_written(tmp_path):
  config.parse_gin([], ["_probe.value = 5"])
  _probe()
  path = config.write_operative_config(tmp_path / "run")
  assert "_probe.value = 5" in open(path).read()


PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "imagen_jax"


def _imported_modules(tree: ast.AST, module: str) -> set[str]:
  """Absolute names of every module an AST imports (relative imports resolved)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = module.split(".")[:-node.level]
        base = ".".join(parent + ([base] if base else []))
      names.add(base)
      names.update(f"{base}.{alias.name}" for alias in node.names)
  return names


def test_library_code_never_imports_cli():
  offenders = []
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE.parent)
    if rel.parts[1] == "cli":
      continue
    module = ".".join(rel.with_suffix("").parts)
    imported = _imported_modules(ast.parse(path.read_text()), module)
    if any(n == "imagen_jax.cli" or n.startswith("imagen_jax.cli.") for n in imported):
      offenders.append(str(rel))
  assert not offenders, f"library modules importing imagen_jax.cli: {offenders}"


def test_the_ast_walk_sees_nested_and_relative_imports():
  """The walk above must catch the import forms a library module could use."""
  code = "def f():\n  from ..cli import gin_utils\n"
  assert "imagen_jax.cli" in _imported_modules(ast.parse(code), "imagen_jax.train.loop")
  code = "import imagen_jax.cli.gin_utils as g\n"
  assert "imagen_jax.cli.gin_utils" in _imported_modules(ast.parse(code), "imagen_jax.x")


def test_importing_the_library_changes_no_global_logging():
  """Every library module imported in a fresh interpreter: the root logger keeps its
  filters and level. (Its handlers are not ours to check: orbax logs through absl at
  import, and absl then calls logging.basicConfig.)"""
  code = """
import importlib, logging, pkgutil, imagen_jax
root = logging.getLogger()
before = (list(root.filters), root.level)
for m in pkgutil.walk_packages(imagen_jax.__path__, "imagen_jax."):
  if ".cli" not in m.name:
    importlib.import_module(m.name)
after = (list(root.filters), root.level)
assert before == after, (before, after)
print("OK")
"""
  env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-2000:]


def test_parse_gin_filters_include_probes_only_while_parsing(tmp_path):
  (tmp_path / "inc.gin").write_text("_probe.value = 4\n")
  (tmp_path / "top.gin").write_text("include 'inc.gin'\n")
  filters = list(__import__("logging").getLogger().filters)
  config.parse_gin(["top.gin"], gin_search_paths=[str(tmp_path)])
  assert _probe() == (4, "x")
  assert list(__import__("logging").getLogger().filters) == filters
