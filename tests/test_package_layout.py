"""The subpackages of imagen_jax form layers: read from the source (ast), no import cycle.

`data` reads the embedding cache of `text`, so `text` must never import `data`; the
quickstart's own code (which uses both) lives above them in `imagen_jax.quickstart`.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "imagen_jax"


def _imported_modules(tree: ast.AST) -> set[str]:
  """Every `imagen_jax...` module named by an import anywhere in `tree` (lazy imports in
  function bodies count: they close a cycle at run time all the same)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "imagen_jax":  # from imagen_jax import text
        names.update(f"imagen_jax.{alias.name}" for alias in node.names)
      else:
        names.add(node.module)
  return {n for n in names if n.startswith("imagen_jax.")}


def subpackage_imports(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  """{subpackage or top-level module: the other ones its files import}."""
  graph = {}
  for path in sorted(package.rglob("*.py")):
    parts = path.relative_to(package).parts
    source = parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")
    targets = {m.split(".")[1] for m in _imported_modules(ast.parse(path.read_text()))}
    graph.setdefault(source, set()).update(targets - {source})
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of `graph` as a path [a, b, ..., a], or None (depth-first search)."""
  state = {}  # node -> "open" while on the stack, "done" after
  stack = []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "d"}, "b": set(), "d": {"d"}}) == ["d", "d"]


def test_imports_are_read_from_lazy_and_from_imports():
  tree = ast.parse("from imagen_jax import text\n"
                   "def f():\n  from imagen_jax.data import shapes\n  import imagen_jax.nn\n"
                   "from . import sibling\nimport numpy\n")
  assert _imported_modules(tree) == {"imagen_jax.text", "imagen_jax.data", "imagen_jax.nn"}


def test_text_and_data_do_not_import_each_other_both_ways():
  graph = subpackage_imports()
  assert "data" not in graph["text"], (
      "imagen_jax/text imports imagen_jax/data, which imports text: move the code that "
      "needs both above them (e.g. imagen_jax/quickstart)")


def test_no_library_module_imports_the_quickstart():
  graph = subpackage_imports()
  importers = sorted(name for name, targets in graph.items()
                     if "quickstart" in targets and name != "quickstart")
  assert not importers, f"{importers} import imagen_jax.quickstart"


def test_the_library_subpackages_have_no_import_cycle():
  # cli/ is the top layer (it may import anything); library imports of cli are a
  # separate rule, so edges into it are left out here.
  graph = {name: targets - {"cli"} for name, targets in subpackage_imports().items()
           if name != "cli"}
  assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
