"""The packages of agent/ import one way: a change that imports upward fails here.

    cli, service (-> web) -> engine -> units -> state, config, policy -> core, errors

`providers/` talk to the world and never import `agent/`. Imports made only for type
checking count too: a circle is a circle even when Python tolerates it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What each package of agent/ may import from agent/ (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "core": {"errors"},
    "policy": {"errors", "core"},
    "config": {"errors", "core", "policy"},
    "state": {"errors", "core", "config"},
    "units": {"errors", "core", "config", "policy", "state"},
    "engine": {"errors", "core", "config", "policy", "state", "units"},
    # The web page sits beside the service: it reads the store, the daemon starts it.
    "web": {"errors", "core", "config", "policy", "state", "units", "engine"},
    "service": {"errors", "core", "config", "policy", "state", "units", "engine", "web"},
    "cli": {"errors", "core", "config", "policy", "state", "units", "engine", "service", "web"},
    "__init__": set(),
}


def agent_imports(path: Path) -> list[tuple[int, str]]:
    """The `agent.X` packages a module imports, with their line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "agent":
                names = [f"agent.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "agent" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def package_of(path: Path) -> str:
    relative = path.relative_to(ROOT / "agent").parts
    return relative[0] if len(relative) > 1 else Path(relative[0]).stem


AGENT_MODULES = sorted((ROOT / "agent").rglob("*.py"))


@pytest.mark.parametrize("path", AGENT_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_agent_imports_one_way(path: Path) -> None:
    package = package_of(path)
    assert package in ALLOWED, f"{path}: a new package of agent/ must be placed in ALLOWED"
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {package} imports agent.{target}"
        for line, target in agent_imports(path)
        if target != package and target not in ALLOWED[package] and target != "__version__"
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_providers_never_import_agent() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted((ROOT / "providers").rglob("*.py"))
        for line, _ in agent_imports(path)
    ]
    assert not wrong, "providers/ imports agent/: " + ", ".join(wrong)


def test_no_flat_room_again() -> None:
    """agent/ holds packages; only the package marker and the error hierarchy sit at its top."""
    flat = sorted(p.name for p in (ROOT / "agent").glob("*.py"))
    assert flat == ["__init__.py", "errors.py"]
