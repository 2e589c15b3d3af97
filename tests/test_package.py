"""The package's shape: a curated public API, and the boundaries between its parts."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import busway
import busway.routers.expression

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "busway": REPO / "broker",
    "busway.routers": REPO / "routers",
    "busway.adapters": REPO / "adapters",
}


def _imports(folder: Path) -> dict[str, set[str]]:
    """Top-level module names imported by each .py file under `folder`."""
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


def test_public_api_is_sorted_and_complete() -> None:
    public = {name for name in vars(busway) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(busway, name)).__name__ == "module"}
    assert busway.__all__ == sorted(busway.__all__)
    assert set(busway.__all__) - {"__version__"} == public - modules


def test_expression_api_is_sorted() -> None:
    assert busway.routers.expression.__all__ == sorted(busway.routers.expression.__all__)


def test_engine_never_imports_an_adapter() -> None:
    for path, names in _imports(REPO / "broker").items():
        assert not any(name.startswith("busway.adapters") for name in names), path


def test_routers_never_import_nats_or_the_engine() -> None:
    for path, names in _imports(REPO / "routers").items():
        for name in names:
            assert not name.startswith("nats"), f"{path} imports {name}"
            assert not (name.startswith("busway") and not name.startswith("busway.routers")), (
                f"{path} imports {name}"
            )


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """A subpackage missing from `packages` would be silently left out of the wheel."""
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = set()
    for package, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            on_disk.add(".".join([package, *relative.parts]) if relative.parts else package)
    assert on_disk == listed


def test_only_broker_nats_imports_nats_py() -> None:
    """nats-py is confined to `busway._nats`: the rest holds its objects, never its module."""
    offenders = []
    for folder in FOLDERS.values():
        for path, names in _imports(folder).items():
            if path.startswith("broker/_nats/"):
                continue
            offenders += [
                f"{path} imports {name}"
                for name in sorted(names)
                if name == "nats" or name.startswith("nats.")
            ]
    assert not offenders, "nats-py imported outside broker/_nats: " + "; ".join(offenders)


_SPAWNERS = frozenset({"create_task", "ensure_future"})


def test_tasks_are_spawned_only_by_task_groups() -> None:
    """No bare `asyncio.create_task` / `ensure_future` / `loop.create_task`: every task busway
    starts belongs to a task group (futures' done-callbacks are fine)."""
    offenders = []
    for folder in FOLDERS.values():
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = (
                    func.attr
                    if isinstance(func, ast.Attribute)
                    else func.id
                    if isinstance(func, ast.Name)
                    else ""
                )
                if name in _SPAWNERS:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} calls {name}")
    assert not offenders, "tasks outside a task group: " + "; ".join(offenders)
