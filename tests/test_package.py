"""The package's shape: a curated public API, and the boundaries between its parts."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
import textwrap
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

import busway
import busway.routers.expression
from tests.support import decode_test_config, run_cli

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


# --- The typed public surface (#13 item 4) ---------------------------------------------------


def _classes_in(hint: object) -> Iterator[type]:
    """Every class a type hint mentions, through unions, generics and callables."""
    if isinstance(hint, type) and not typing.get_args(hint):
        yield hint
    origin = typing.get_origin(hint)
    if isinstance(origin, type):
        yield origin
    for arg in typing.get_args(hint):
        if isinstance(arg, list):  # Callable's parameter list
            for item in arg:
                yield from _classes_in(item)
        else:
            yield from _classes_in(arg)


def _private(cls: type) -> bool:
    """True for a class from a module path with a `_segment`, unless `busway` re-exports it."""
    if getattr(busway, cls.__name__, None) is cls:
        return False
    return any(part.startswith("_") for part in cls.__module__.split("."))


def _public_hints(cls: type) -> dict[str, object]:
    """`member: hint` for every public attribute, property, method parameter and return of
    `cls`, and the parameters of its constructor."""
    namespace = vars(sys.modules[cls.__module__])
    hints: dict[str, object] = {
        # The class's own declarations (its bases' private ones are not its surface).
        name: eval(hint, namespace) if isinstance(hint, str) else hint
        for name, hint in vars(cls).get("__annotations__", {}).items()
        if name[0] != "_"
    }
    for name in ["__init__", *(n for n in dir(cls) if not n.startswith("_"))]:
        member = inspect.getattr_static(cls, name)
        if isinstance(member, property):
            member = member.fget
        elif isinstance(member, classmethod | staticmethod):
            member = member.__func__
        if inspect.isfunction(member):
            for param, hint in typing.get_type_hints(member).items():
                hints[f"{name}({param})"] = hint
    return hints


def test_bus_exposes_no_private_type(tmp_path: Path) -> None:
    """What an application reads off a `Bus` is typed with what `import busway` offers: the
    declared types of its members, and the classes of the values its attributes hold."""
    leaks = [
        f"Bus.{member}: {cls.__module__}.{cls.__qualname__}"
        for member, hint in _public_hints(busway.Bus).items()
        for cls in _classes_in(hint)
        if _private(cls)
    ]
    bus = busway.Bus(decode_test_config("", tmp_path))
    leaks += [
        f"bus.{name} holds a {type(value).__module__}.{type(value).__qualname__}"
        for name, value in vars(bus).items()
        if name[0] != "_" and _private(type(value))
    ]
    assert leaks == []


def test_every_public_attribute_of_a_bus_is_declared(tmp_path: Path) -> None:
    """An attribute assigned in `__init__` but not declared on the class would escape the check
    above: every public one must be declared (and so typed)."""
    bus = busway.Bus(decode_test_config("", tmp_path))
    declared = vars(busway.Bus)["__annotations__"]
    undeclared = sorted(name for name in vars(bus) if name[0] != "_" and name not in declared)
    assert undeclared == []


def test_version_comes_from_the_package_metadata() -> None:
    installed = importlib.metadata.version("busway")
    assert busway.__version__ == installed
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"busway {installed}\n"


@pytest.mark.slow
def test_adapter_factories_are_type_checked_against_their_config(tmp_path: Path) -> None:
    """`Adapter` is generic over its config structs: mypy rejects a factory that takes
    another struct, and infers the config type a registry hands back."""
    tree = tmp_path / "types" / "busway"
    tree.mkdir(parents=True)
    for item in (REPO / "broker").iterdir():
        (tree / item.name).symlink_to(item)
    (tree / "routers").symlink_to(REPO / "routers")
    (tree / "adapters").symlink_to(REPO / "adapters")
    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            """
            from busway import Adapter, BuildContext, Sink, SinkConfig
            from busway.adapters.file import FileSinkConfig, FileSourceConfig, adapter


            class MyConfig(SinkConfig, tag="mine", frozen=True, kw_only=True):
                pass


            def create(config: FileSinkConfig, context: BuildContext) -> Sink:
                raise NotImplementedError


            mine = Adapter(type="mine", sink_config=MyConfig, create_sink=create)
            reveal_type(adapter)
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--config-file",
            str(REPO / "pyproject.toml"),
            str(tmp_path / "app.py"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(tree.parent)},
        timeout=300,
        check=False,
    )
    lines = [line.split(": ", 1)[1] for line in result.stdout.splitlines()]
    assert lines == [
        'error: Argument "create_sink" to "Adapter" has incompatible type '
        '"Callable[[FileSinkConfig, BuildContext], Sink]"; expected '
        '"Callable[[MyConfig, BuildContext], Sink] | None"  [arg-type]',
        'note: Revealed type is "busway._registry.Adapter[busway.adapters.file.source.'
        'FileSourceConfig, busway.adapters.file.sink.FileSinkConfig]"',
    ], result.stdout + result.stderr


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
