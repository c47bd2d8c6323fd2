"""The package's shape, checked with `ast`: no function in imagen_jax/ longer than 120 lines
(docstring included), so that each reads on one screen or two."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "imagen_jax"
MAX_FUNCTION_LINES = 120
# "path:qualified name" of functions allowed to be longer for now, each with its reason.
ALLOWED: set[str] = set()


def long_functions(source: str, max_lines: int) -> list[tuple[str, int]]:
  """(qualified name, line count) of every function or method over max_lines lines."""
  out = []

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        name = f"{prefix}{child.name}"
        if not isinstance(child, ast.ClassDef):
          lines = child.end_lineno - child.lineno + 1
          if lines > max_lines:
            out.append((name, lines))
        visit(child, name + ".")
      else:
        visit(child, prefix)

  visit(ast.parse(source), "")
  return out


def test_the_checker_finds_nested_and_method_functions():
  body = "\n".join(f"  x{i} = {i}" for i in range(5))
  source = (f"class A:\n def m(self):\n{body}\n"
            f"def f():\n def inner():\n{body}\n  return 1\n")
  assert long_functions(source, 4) == [("A.m", 6), ("f", 8), ("f.inner", 7)]
  assert long_functions(source, 8) == []


def test_no_function_over_120_lines():
  violations = []
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE.parent).as_posix()
    for name, lines in long_functions(path.read_text(), MAX_FUNCTION_LINES):
      if f"{rel}:{name}" not in ALLOWED:
        violations.append(f"{rel}:{name} ({lines} lines)")
  assert not violations, "functions over 120 lines: " + ", ".join(violations)
