"""The layers import only downward, and nothing outside es_jax uses its private names (issue 11).

core (``es_jax/*.py``) <- ``es_jax.models`` <- ``es_jax.evaluation`` <-
``experiments`` / ``benchmarks``. Read from the source with ``ast`` (nothing is
imported), so a violation is found wherever it hides: a lazy import inside a
function, or an attribute such as ``noise_lib._draw`` on an imported module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("es_jax", "experiments", "benchmarks")

# (file, private name) pairs that exist today in files another change is rewriting; each is a
# debt, not a permission: empty this list as they go. Nothing may be added to it.
KNOWN_PRIVATE_USES: set[tuple[str, str]] = set()


def _files(package: str) -> list[Path]:
  return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(path: Path) -> list[tuple[str, tuple[str, ...], ast.AST]]:
  """(module, imported names, node) of every import in ``path``, relative ones resolved."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = _module_name(path).split(".")
  if path.name != "__init__.py":
    package = package[:-1]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, (), node) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level:
        base = package[:len(package) - node.level + 1]
        module = ".".join(base + ([module] if module else []))
      found.append((module, tuple(alias.name for alias in node.names), node))
  return found


def _es_jax_module_aliases(path: Path) -> dict[str, str]:
  """Local names bound to es_jax modules: ``import es_jax``, ``from es_jax import noise as n``."""
  aliases = {}
  for module, names, node in _imports(path):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "es_jax":
          # `import es_jax.noise` binds es_jax; `import es_jax.noise as n` binds the module.
          aliases[alias.asname or "es_jax"] = alias.name if alias.asname else "es_jax"
    elif module.split(".")[0] == "es_jax":
      for alias in node.names:
        if (ROOT / Path(*module.split("."), alias.name)).with_suffix(".py").exists() or (
            ROOT / Path(*module.split("."), alias.name) / "__init__.py").exists():
          aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
  return aliases


def _private_uses(path: Path) -> set[str]:
  """Private es_jax names that ``path`` imports or reaches through an imported es_jax module."""
  uses = set()
  for module, names, _ in _imports(path):
    if module.split(".")[0] != "es_jax":
      continue
    parts = module.split(".") + list(names)
    uses |= {f"{module}:{p}" if p in names else module for p in parts if _is_private(p)}
  aliases = _es_jax_module_aliases(path)
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Attribute) and _is_private(node.attr):
      root = node.value
      chain = [node.attr]
      while isinstance(root, ast.Attribute):
        chain.append(root.attr)
        root = root.value
      if isinstance(root, ast.Name) and root.id in aliases:
        uses.add(".".join([aliases[root.id], *reversed(chain)]))
  return uses


def _layer(module: str) -> str:
  parts = module.split(".")
  if parts[0] != "es_jax":
    return parts[0]
  if len(parts) > 1 and parts[1] in ("models", "evaluation"):
    return parts[1]
  return "core"


# What each layer of es_jax may import from es_jax and the repository.
ALLOWED = {"core": {"core"}, "models": {"core", "models"},
           "evaluation": {"core", "models", "evaluation"}}


def _upward_imports(path: Path) -> list[str]:
  layer = _layer(_module_name(path))
  wrong = []
  for module, names, node in _imports(path):
    top = module.split(".")[0]
    if top in ("experiments", "benchmarks"):
      wrong.append(f"line {node.lineno}: {module}")
    elif top == "es_jax":
      # `from es_jax import models` imports a subpackage: judge the names, not only the module.
      targets = [module] + [f"{module}.{n}" for n in names if module == "es_jax"]
      wrong += [f"line {node.lineno}: {t} (a {_layer(t)} module)" for t in targets
                if t != "es_jax" and _layer(t) not in ALLOWED[layer]]
  return wrong


@pytest.mark.parametrize("path", _files("es_jax"), ids=lambda p: str(p.relative_to(ROOT)))
def test_es_jax_imports_only_downward(path):
  wrong = _upward_imports(path)
  assert not wrong, (f"{_layer(_module_name(path))} module {path.relative_to(ROOT)} imports "
                     f"upward: {wrong}")


@pytest.mark.parametrize("path", _files("experiments") + _files("benchmarks"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_outside_es_jax_uses_its_private_names(path):
  relative = str(path.relative_to(ROOT))
  uses = _private_uses(path) - {name for file, name in KNOWN_PRIVATE_USES if file == relative}
  assert not uses, (f"{relative} uses es_jax internals {sorted(uses)}; use (or add) a public, "
                    "documented es_jax API instead")


def test_the_scan_finds_what_it_looks_for(tmp_path, monkeypatch):
  """The checks above can fail: planted violations are found, allowed imports are not."""
  monkeypatch.setitem(globals(), "ROOT", tmp_path)
  (tmp_path / "es_jax" / "models").mkdir(parents=True)
  for name in ("__init__.py", "noise.py", "models/__init__.py"):
    (tmp_path / "es_jax" / name).write_text("")
  bench = tmp_path / "bench.py"
  bench.write_text("from es_jax import noise as nl\nfrom es_jax.es import _evaluate, es_step\n"
                   "import es_jax\nx = nl._draw(1)\ny = es_jax.noise._layout\nz = nl.layout\n"
                   "w = es_jax.__version__\n")
  assert _private_uses(bench) == {"es_jax.es:_evaluate", "es_jax.noise._draw",
                                  "es_jax.noise._layout"}
  core = tmp_path / "es_jax" / "noise.py"
  core.write_text("from es_jax import models\nfrom es_jax.evaluation import drift\n"
                  "from es_jax import _checks, shaping\n"
                  "def f():\n  import experiments.run\n")
  assert [w.split(": ")[1] for w in _upward_imports(core)] == [
      "es_jax.models (a models module)", "es_jax.evaluation (a evaluation module)",
      "experiments.run"]
  models = tmp_path / "es_jax" / "models" / "__init__.py"
  models.write_text("from es_jax import noise\nfrom .. import evaluation\n")
  assert [w.split(": ")[1] for w in _upward_imports(models)] == [
      "es_jax.evaluation (a evaluation module)"]


def _import_graph() -> dict[str, set[str]]:
  """es_jax module -> the es_jax modules it imports, lazy imports inside functions included.

  A lazy import hides a circle from Python's import order but not from the
  design: the two modules still need each other. ``from pkg import sub`` is an
  edge to the submodule, and importing ``a.b.c`` is an edge to the packages
  ``a.b`` and ``a`` as well (Python runs them first), except the importer's
  own packages: every submodule imports those, which is not a circle.
  """
  modules = {_module_name(path): path for path in _files("es_jax")}
  graph = {}
  for name, path in modules.items():
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    targets = set()
    for module, names, _ in _imports(path):
      submodules = {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
      for target in submodules or {module}:
        parts = target.split(".")
        targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    graph[name] = (targets & modules.keys()) - own_packages - {name}
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
  """One import circle of ``graph`` as ``[a, b, ..., a]``; [] if it has none."""
  done, stack = set(), []

  def visit(node):
    if node in stack:
      return stack[stack.index(node):] + [node]
    if node in done:
      return []
    stack.append(node)
    for target in sorted(graph.get(node, ())):
      if found := visit(target):
        return found
    stack.pop()
    done.add(node)
    return []

  for node in sorted(graph):
    if found := visit(node):
      return found
  return []


def test_es_jax_has_no_import_circle():
  cycle = _cycle(_import_graph())
  assert not cycle, (f"es_jax modules import each other in a circle: {' -> '.join(cycle)}; move "
                     "what they share into a module that both import")


def test_the_circle_scan_finds_a_lazy_circle(tmp_path, monkeypatch):
  """The circle check can fail: a function-level import closes a circle; a package's own is not."""
  monkeypatch.setitem(globals(), "ROOT", tmp_path)
  (tmp_path / "es_jax" / "models").mkdir(parents=True)
  (tmp_path / "es_jax" / "__init__.py").write_text("from es_jax import models\n")
  (tmp_path / "es_jax" / "models" / "__init__.py").write_text(
      "from es_jax.models.a import f\n")
  (tmp_path / "es_jax" / "models" / "a.py").write_text(
      "from es_jax.models import b\ndef f():\n  return b\n")
  (tmp_path / "es_jax" / "models" / "b.py").write_text("def g():\n  from es_jax.models import a\n")
  assert _import_graph() == {"es_jax": {"es_jax.models"}, "es_jax.models": {"es_jax.models.a"},
                             "es_jax.models.a": {"es_jax.models.b"},
                             "es_jax.models.b": {"es_jax.models.a"}}
  assert _cycle(_import_graph()) == ["es_jax.models.a", "es_jax.models.b", "es_jax.models.a"]
  (tmp_path / "es_jax" / "models" / "b.py").write_text("")
  assert _cycle(_import_graph()) == []
