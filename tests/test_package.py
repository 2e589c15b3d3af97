"""The package's shape: a curated public API, and the boundaries between its parts."""

from __future__ import annotations

import ast
import re
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


FIXED_PORT = re.compile(r"(?:127\.0\.0\.1|localhost):(\d+)")
NEVER_BOUND = "# never bound"
"""A line carrying this comment holds an address nothing listens on (a value a test feeds to
the config decoder); the comment says why."""


def test_tests_never_name_a_fixed_loopback_port() -> None:
    """A fixed port collides with whatever else runs on the machine (another test run, a dev
    server on 8080): tests bind port 0 or `free_port()` and read the port back."""
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if NEVER_BOUND not in line and any(port != "0" for port in FIXED_PORT.findall(line))
    ]
    assert not found, "fixed loopback ports in tests (use port 0 or free_port()):\n" + "\n".join(
        found
    )
