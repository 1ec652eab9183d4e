"""The package's module graph, read from the source: no import cycles (imports inside functions
count too), and the layers of docs/design.md import one way only."""

from __future__ import annotations

import ast
import os

PACKAGE = "rml_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# docs/design.md's layers, lowest first: a module imports modules of its own or a lower layer.
LAYERS = (
    ("constants", "errors", "storage", "config_args", "compilation_cache"),
    ("losses", "prototypes", "class_balance", "metrics", "augment", "sharding", "soft_labels",
     "weights", "visualize", "models", "datasets", "state", "checkpoint", "compiled", "tpu"),
    ("inference",),
    ("step",),
    ("input_pipeline", "schema", "workdir"),
    ("program",),
    ("train", "evaluate", "predict", "export", "bench", "tpu_compile", "convert", "experiments"),
    ("main",),
)


def _module_name(path: str) -> str:
  relative = os.path.relpath(path, os.path.dirname(ROOT))[:-len(".py")].split(os.sep)
  if relative[-1] == "__init__":
    relative = relative[:-1]
  return ".".join(relative)


def _modules() -> dict[str, str]:
  """{dotted module name: file path} of every module of the package."""
  found = {}
  for folder, _, names in os.walk(ROOT):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        found[_module_name(path)] = path
  return found


def import_graph() -> dict[str, set[str]]:
  """{module: the package modules it imports anywhere in its file}."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from a.b import c` imports a.b.c when that is a module, else the names of a.b.
        targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                   else node.module for alias in node.names]
      else:
        continue
      edges.update(t for t in targets if t in modules and t != name)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle [m0, m1, ..., m0], or None."""
  state = {}  # module -> "open" while on the DFS stack, "done" after

  def visit(module, stack):
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph[module]):
      if state.get(target) == "open":
        return stack[stack.index(target):] + [target]
      if target not in state:
        cycle = visit(target, stack)
        if cycle:
          return cycle
    stack.pop()
    state[module] = "done"
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module, [])
      if cycle:
        return cycle
  return None


def _layer(module: str) -> int:
  top = module.split(".")[1] if "." in module else ""
  for index, names in enumerate(LAYERS):
    if top in names:
      return index
  raise AssertionError(f"{module} is in no layer of tests/test_layout.py (docs/design.md)")


def test_the_package_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_modules_import_their_own_or_lower_layers_only():
  graph = import_graph()
  upward = sorted(f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, targets in graph.items()
                  for t in targets if m != PACKAGE and t != PACKAGE and _layer(t) > _layer(m))
  assert not upward, "\n".join(upward)


def test_the_graph_reads_imports_inside_functions():
  graph = import_graph()
  assert "rml_jax.train" in graph["rml_jax.main"]  # imported inside main() after flag parsing
