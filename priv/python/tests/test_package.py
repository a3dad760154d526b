"""What the Python package ships, and the shape of its import graph.

The package is ``snakepit_telemetry`` (the telemetry API, the backends and
``add_to_server``) plus ``snakepit_bridge``, its compatibility name (one module,
see tests/test_beside_snakepit.py); the command worker the demo, the tests and
the benchmarks run lives in the repository's ``support/python`` and is not
shipped. No module of the package imports (at module level or late, inside a
function) a module that imports it back, directly or through others.
"""

from __future__ import annotations

import ast
import os
import random
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from .conftest import PY_ROOT

PACKAGE = "snakepit_telemetry"
COMPAT = "snakepit_bridge"
PACKAGE_DIR = PY_ROOT / PACKAGE
PACKAGE_DIRS = (PACKAGE_DIR, PY_ROOT / COMPAT)
COMMAND_WORKER = PY_ROOT.parent.parent / "support" / "python" / "command_worker.py"


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of both packages."""
    found = {}
    for path in sorted(p for d in PACKAGE_DIRS for p in d.rglob("*.py")):
        parts = list(path.relative_to(PY_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _import_edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source (late imports too).

    ``from X import y`` is an edge to ``X.y`` when that is a module, else to ``X``.
    A package's own ``__init__`` running first is Python's doing, not an edge.
    """
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not is_package:
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        else:
            continue
        edges.update(t for t in targets if t in modules and t != name)
    return edges


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _import_edges(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_cycle_finder_finds_cycles() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_has_no_cycle() -> None:
    graph = _import_graph()
    # The graph is read correctly: known edges, relative and late imports alike.
    core = "snakepit_telemetry.telemetry._internal.core"
    assert "snakepit_telemetry.telemetry.backends" in graph[core]
    assert "snakepit_telemetry.telemetry._internal.defaults" in graph[core]
    assert (
        "snakepit_telemetry.telemetry.backends.otel"
        in graph["snakepit_telemetry.telemetry.backends"]
    )
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph) or [])}"
    # The backends reach the default stream without the core.
    for name, edges in graph.items():
        if name.startswith("snakepit_telemetry.telemetry.backends"):
            assert core not in edges, f"{name} imports the core"


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    """Each module first in its own interpreter (random order, concurrently)."""
    names = sorted(_modules())
    seed = random.randrange(1 << 30)
    random.Random(seed).shuffle(names)
    env = dict(os.environ, PYTHONPATH=str(PY_ROOT))
    procs = [
        (
            name,
            subprocess.Popen(
                [sys.executable, "-c", f"import {name}"],
                env=env,
                cwd=PY_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
        for name in names
    ]
    failed = []
    for name, proc in procs:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failed.append(f"{name}:\n{out}")
    assert not failed, f"seed {seed}: " + "\n".join(failed)


_BUILD = "import sys; from setuptools import build_meta as b; print('BUILT', b.{hook}(sys.argv[1]))"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    """File lists of the wheel and the sdist, built offline from a copy of priv/python."""
    tmp = tmp_path_factory.mktemp("build")
    src, out = tmp / "src", tmp / "out"
    shutil.copytree(
        PY_ROOT,
        src,
        ignore=shutil.ignore_patterns(
            "__pycache__", ".pytest_cache", ".ruff_cache", "build", "*.egg-info"
        ),
    )
    names = []
    # One build per interpreter: setuptools keeps state between builds in one process.
    for hook in ("build_wheel", "build_sdist"):
        run = subprocess.run(
            [sys.executable, "-c", _BUILD.format(hook=hook), str(out)],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        built_lines = [line for line in run.stdout.splitlines() if line.startswith("BUILT ")]
        names.append(built_lines[-1].split()[1])
    wheel_name, sdist_name = names
    with zipfile.ZipFile(out / wheel_name) as wheel:
        wheel_files = wheel.namelist()
    with tarfile.open(out / sdist_name) as sdist:
        root = sdist_name.removesuffix(".tar.gz") + "/"
        sdist_files = [m.name.removeprefix(root) for m in sdist.getmembers() if m.isfile()]
    return wheel_files, sdist_files


def _package_files() -> set[str]:
    return {
        str(p.relative_to(PY_ROOT))
        for d in PACKAGE_DIRS
        for p in d.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix != ".pyc"
        # The native extension built in place (script/build-python-ext) is a local,
        # gitignored artifact: the setuptools wheel is the pure-Python package.
        and not (p.name.startswith("_native.") and p.suffix in (".so", ".pyd"))
    }


def test_the_command_worker_is_not_in_the_package() -> None:
    assert COMMAND_WORKER.is_file()
    assert not [p for d in PACKAGE_DIRS for p in d.rglob("worker.py")]
    assert not any("command_worker" in f or "hostile" in f for f in _package_files())


def test_wheel_and_sdist_ship_the_package_only(built: tuple[list[str], list[str]]) -> None:
    wheel_files, sdist_files = built
    package = _package_files()
    assert "snakepit_telemetry/telemetry/__init__.py" in package
    assert "snakepit_telemetry/snakepit_bridge_pb2.py" in package
    # The compatibility name is one module: no second copy of the code, no pb2.
    assert {f for f in package if f.startswith(f"{COMPAT}/")} == {f"{COMPAT}/__init__.py"}
    assert {f for f in wheel_files if not f.split("/")[0].endswith(".dist-info")} == package
    tops = (f"{PACKAGE}/", f"{COMPAT}/")
    shipped_sources = {f for f in sdist_files if f.startswith(tops)}
    assert shipped_sources == package
    extra = {f for f in sdist_files if not f.startswith(tops)}
    assert all(
        f in ("PKG-INFO", "pyproject.toml", "setup.cfg", "MANIFEST.in") or ".egg-info/" in f
        for f in extra
    ), extra
    for f in wheel_files + sdist_files:
        assert "worker" not in Path(f).name and not f.startswith("tests/"), f
