"""The layer rule, read from the code's imports (README "How it works"):

    api (app.main, app.__main__, app.api, app.routes, app.schemas)
      -> engine (app.engine) -> runner (app.runner) -> core (charrnn)

nothing upward; app.config and app.metrics serve the layers and import none of them. A route
module imports only the API layer, the engine's public module and the schemas. No import
cycle, not even one under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANKS = {"core": 0, "runner": 1, "engine": 2, "api": 3}


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("app", "charrnn"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The project modules ``name`` imports (``from package import submodule`` counts as the
    submodule), TYPE_CHECKING blocks and function bodies included."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                # A name from a package's namespace is its ``__init__``'s: an edge to it.
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name}


def layer(name: str) -> str | None:
    if name.startswith("charrnn"):
        return "core"
    if name in ("app.config", "app.metrics"):
        return None  # serves every app layer
    for prefix, rank in (("app.runner", "runner"), ("app.engine", "engine")):
        if name == prefix or name.startswith(prefix + "."):
            return rank
    return "api"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nothing_imports_upward(name):
    own = layer(name)
    for imported in _imports(name):
        other = layer(imported)
        if own is None:
            assert other == "core" or other is None, f"{name} (shared) imports {imported}"
        elif other is not None:
            assert RANKS[other] <= RANKS[own], f"{name} ({own}) imports {imported} ({other})"


ROUTES = sorted(m for m in MODULES if m.startswith("app.routes."))
API = sorted(m for m in MODULES if m.startswith(("app.api", "app.routes")))


@pytest.mark.parametrize("name", ROUTES)
def test_routes_import_only_the_api_the_engine_and_the_schemas(name):
    imported = _imports(name)
    for module in imported:
        allowed = module in ("app.engine", "app.schemas") or module.startswith("app.api")
        assert allowed, f"{name} imports {module}"
    # A route reads the request and answers; the work is in the API layer's adapters.
    own = {m for m in imported if m.startswith("app.") and m != "app.api"}
    assert len(own) <= 6, f"{name} imports {len(own)} app modules: {sorted(own)}"


@pytest.mark.parametrize("name", API)
def test_the_api_asks_the_engine_not_its_runner(name):
    """The API layer reaches a model through the engine's facade (``LoadedModel.vocab``,
    ``facts()``), never the runner or its decoder behind it."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("runner", "decoder", "scheduler"):
            raise AssertionError(f"{name}:{node.lineno} reaches .{node.attr}")


def test_no_import_cycle():
    """Package ``__init__`` modules included: a submodule that imports a name from its own
    package's namespace (whose ``__init__`` imports it) closes a cycle."""
    check_acyclic({name: _imports(name) for name in MODULES})


def test_the_cycle_check_sees_a_module_importing_its_own_package():
    graph = {"app.runner": {"app.runner.runner"}, "app.runner.runner": {"app.runner"}}
    with pytest.raises(AssertionError, match=r"import cycle: app\.runner -> app\.runner\.runner"):
        check_acyclic(graph)


def check_acyclic(graph: dict[str, set[str]]) -> None:
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> None:
        if node in stack:
            cycle = [*stack[stack.index(node) :], node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        stack.append(node)
        for nxt in graph[node]:
            visit(nxt)
        stack.pop()
        done.add(node)

    for name in graph:
        visit(name)


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checks themselves can fail: a runner module that imports the engine, and one that
    imports its own package, are reported."""
    fake = tmp_path / "bad.py"
    fake.write_text("from app.engine import Handle\n")
    monkeypatch.setitem(MODULES, "app.runner.bad", fake)
    with pytest.raises(AssertionError, match=r"app\.runner\.bad"):
        test_nothing_imports_upward("app.runner.bad")
