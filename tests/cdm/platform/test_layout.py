"""The platform's tree is its architecture: sub-packages as layers (`cdm.platform.LAYERS`), imports only downward,
no import circle. Read from the source with `ast`, so lazy (function-level) imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cdm
from cdm.platform import LAYERS

CDM = Path(cdm.__file__).parent
PLATFORM = CDM / "platform"
# The one sanctioned reach upward (see cdm/platform/__init__.py): the context opens later layers' clients lazily.
UPWARD_LAZY = {"cdm.platform.workspace.context"}


def module_name(path: Path) -> str:
    parts = path.relative_to(CDM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level and at run time) for each cdm import in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for a in node.names:  # `from cdm.platform.models import registry` imports a module
                sub = f"{base}.{a.name}"
                names.append(sub if (CDM.parent / Path(*sub.split("."))).with_suffix(".py").exists() else base)
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out += [(n, id(node) in top) for n in names if n == "cdm" or n.startswith("cdm.")]
    return out


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["cdm", "platform"] or len(parts) < 3 or parts[2] not in LAYERS:
        return None
    return LAYERS.index(parts[2])


MODULES = {module_name(p): p for p in CDM.rglob("*.py")}


def test_every_platform_module_sits_in_a_layer():
    stray = [m for m, p in MODULES.items() if m.startswith("cdm.platform.") and layer(m) is None
             and m != "cdm.platform.create"]
    assert stray == []
    assert sorted(p.name for p in PLATFORM.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) is not None))
def test_imports_go_down_the_layers(module):
    here = layer(module)
    up = [(target, top) for target, top in imports(MODULES[module])
          if layer(target) is not None and layer(target) > here]
    allowed = [(t, top) for t, top in up if module in UPWARD_LAZY and not top]
    assert up == allowed, f"{module} imports a later layer: {[t for t, _ in up]}"


def test_the_layout_check_fires_on_an_upward_import(tmp_path):
    """Positive control: the checks above see an upward import, module level or lazy."""
    bad = tmp_path / "bad.py"
    bad.write_text("from cdm.platform.models import registry\n\ndef f():\n    from cdm.platform.forgetting import scan\n")
    found = imports(bad)
    assert ("cdm.platform.models.registry", True) in found and ("cdm.platform.forgetting.scan", False) in found
    assert layer("cdm.platform.forgetting.scan") > layer("cdm.platform.workspace.paths")


def circle(graph: dict[str, list[str]]) -> list[str] | None:
    """One import circle of `graph` ({module: modules it imports}), as a path that returns to its start, or None."""
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:  # on the current path
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t, path + [t])):
                return found
        state[m] = 2
        return None

    return next((found for m in graph if m not in state and (found := visit(m, [m]))), None)


def test_no_import_circle():
    """cdm's modules import one another without a circle — lazy and type-checking imports included: a circle, even
    one Python can load, means two modules are one idea or a layer reaches up."""
    graph = {m: sorted({t for t, _ in imports(p) if t in MODULES and t != m}) for m, p in MODULES.items()}
    found = circle(graph)
    assert found is None, "import circle: " + " -> ".join(found)
    # Positive control: a circle through a lazy import, as `imports` reads it, is found.
    assert circle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]


def test_the_library_does_not_import_the_flow_layer():
    """`cdm` is the library; Prefect flows and tasks sit on it, never the other way."""
    wrong = {}
    for m, p in MODULES.items():
        for n in ast.walk(ast.parse(p.read_text())):
            names = [n.module] if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 else \
                [a.name for a in n.names] if isinstance(n, ast.Import) else []
            wrong.update({m: t for t in names if t.split(".")[0] in ("flows", "tasks")})
    assert wrong == {}
