"""The layers of docs/architecture.md hold: every import (also inside functions) points down.

Parses every module of `posebh_jax` and `data_pipelines` with `ast` (nothing is imported), so a
new upward import fails here with the importing module, line and target named.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipelines", "posebh_jax")

# Lowest first; a module may import its own layer and those below. Prefixes match a module and
# everything under it; the longest matching prefix decides.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("data", ("data_pipelines",)),
    ("runtime", ("posebh_jax.errors", "posebh_jax.train.distributed", "posebh_jax.train.sharding")),
    ("model", ("posebh_jax.models",)),
    ("method", ("posebh_jax.objective",)),
    ("experiment", ("posebh_jax.experiment", "posebh_jax.convert.weights",
                    "posebh_jax.convert.torch_to_flax", "posebh_jax.convert.pth_reader",
                    "posebh_jax.evaluation", "posebh_jax.export")),
    ("training", ("posebh_jax.train",)),
    ("application", ("posebh_jax", "posebh_jax.evaluation.evaluate", "posebh_jax.inference",
                     "posebh_jax.image_inference", "posebh_jax.convert")),
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


MODULES = _modules()


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) of every absolute import of one of our modules in the file."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        # `from pkg import module` imports the module; `from module import name` the module.
        out.append((node.lineno, sub if sub in MODULES else node.module))
  return [(line, m) for line, m in out if m in MODULES]


def _find_layer(module: str) -> int | None:
  """Index of the LAYERS entry with the longest prefix of `module`; None if none matches."""
  best, layer = -1, None
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > best:
        best, layer = len(p), i
  return layer


def _layer(module: str) -> int:
  layer = _find_layer(module)
  assert layer is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
  return layer


GRAPH = {m: [(line, t) for line, t in _imports(p) if t != m] for m, p in MODULES.items()}


def test_every_module_has_a_layer():
  missing = [m for m in MODULES if _find_layer(m) is None]
  assert len(MODULES) > 50 and not missing, (
      f"modules in no layer (add them to LAYERS and docs/architecture.md): {missing}")


def test_data_pipelines_imports_nothing_from_posebh_jax():
  bad = [f"{m}:{line} imports {t}" for m, edges in GRAPH.items() if m.startswith("data_pipelines")
         for line, t in edges if t.split(".")[0] == "posebh_jax"]
  assert not bad, bad


def _upward(graph) -> list[str]:
  return [f"{m}:{line} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
          for m, edges in graph.items() for line, t in edges if _layer(t) > _layer(m)]


def _cycle(graph) -> list[str] | None:
  """One import cycle of `graph` (a list of modules, first = last), or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done.
  path: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    path.append(m)
    for _, t in graph.get(m, ()):
      if state.get(t) == 1:
        return path[path.index(t):] + [t]
      if t not in state and (found := visit(t)):
        return found
    path.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m)):
      return found
  return None


def test_imports_point_down_the_layers():
  bad = _upward(GRAPH)
  assert not bad, "\n".join(bad)


def test_no_import_cycle():
  cycle = _cycle(GRAPH)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_an_upward_import_and_a_cycle():
  # The checkers are not vacuous: on a made-up graph they report what they must.
  fake = {"posebh_jax.objective.css": [(3, "posebh_jax.evaluation.predict")],
          "posebh_jax.evaluation.predict": [(5, "posebh_jax.objective.css")],
          "data_pipelines.pipeline": [(7, "posebh_jax.train.sharding")]}
  assert len(_upward(fake)) == 2
  assert _cycle(fake) in (["posebh_jax.evaluation.predict", "posebh_jax.objective.css",
                           "posebh_jax.evaluation.predict"],
                          ["posebh_jax.objective.css", "posebh_jax.evaluation.predict",
                           "posebh_jax.objective.css"])
  assert GRAPH["posebh_jax.objective.css"], "the parser found no import in css.py"
