"""The layout shows the architecture, and these checks keep it so: who may import whom.

Imports are read from the source (every `import` statement, also inside functions), so an import
made lazily at run time counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import gc
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "osmo_router"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _path_of(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imports_of(path: Path) -> set[str]:
    """Every module a source file imports (absolute names; `from X import y` counts X and X.y)."""
    # A finalizer run by the cycle collector inside ast.parse trips a CPython 3.11.7 bug ("AST
    # constructor recursion depth mismatch"); earlier tests leave such cycles (aiohttp's clients).
    gc.disable()
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    finally:
        gc.enable()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def closure(start: str) -> set[str]:
    """The project modules `start` reaches through imports, transitively (package __init__s included)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        if module in seen or _path_of(module) is None:
            continue
        seen.add(module)
        path = _path_of(module)
        assert path is not None
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        todo.extend(m for m in (*imports_of(path), *parents) if m.startswith("osmo_router"))
    return seen


def test_core_imports_no_transport() -> None:
    forbidden = ("osmo_router.router.grpc", "osmo_router.router.ws", "osmo_router.router.scaleout", "aiohttp")
    core = sorted((PACKAGE / "router" / "core").glob("*.py"))
    assert len(core) >= 8, "the core package moved?"
    offenders = {_module_name(path): sorted(m for m in imports_of(path) if m.startswith(forbidden)) for path in core}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_client_command_imports_no_router_or_agent_code() -> None:
    reached = closure("osmo_router.client.cli")
    assert "osmo_router.client.exec" in reached and "osmo_router.transport.ws_transport" in reached
    assert sorted(m for m in reached if m.startswith(("osmo_router.router", "osmo_router.agent"))) == []


def test_wire_imports_nothing_of_the_sides() -> None:
    for path in (PACKAGE / "wire").glob("*.py"):
        sides = ("osmo_router.router", "osmo_router.agent", "osmo_router.client")
        assert sorted(m for m in imports_of(path) if m.startswith(sides)) == [], path.name


def test_only_the_pipeline_pairs_sessions() -> None:
    """join_client / join_agent / wait_paired are called from the pipeline (and the store) only."""
    callers = set()
    for path in (PACKAGE / "router").rglob("*.py"):
        text = path.read_text()
        if any(f".{name}(" in text for name in ("join_client", "join_agent", "wait_paired")):
            callers.add(_module_name(path))
    assert callers == {"osmo_router.router.core.pipeline"}


def test_the_closure_walker_sees_lazy_imports() -> None:
    # The router's CLI imports the server inside a function: the walker must find it.
    assert "osmo_router.router.server" in closure("osmo_router.cli.main")
