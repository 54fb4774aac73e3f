"""Who may import whom: the layering rules of issue 8, checked on the source.

Every ``.py`` under libmrpc/, mrpcd/ and engines/ is parsed with :mod:`ast`; every
import counts wherever it is written (module level, inside a function, under
``if TYPE_CHECKING:``), and so does ``importlib.import_module("x")`` /
``__import__("x")`` with a literal name. A failure names ``file:line``, the arrow
``importer -> imported`` and the rule it breaks.

The rules:

- ``libmrpc`` never imports ``mrpcd`` or ``engines`` (the library is the bottom).
- ``mrpcd`` never imports ``engines``: it loads them by configured module path.
- ``engines`` import only the engine API (``mrpcd.engine``, ``mrpcd.engine.*``),
  other engines, libmrpc's pure layers and the standard library / third-party
  packages -- exactly what a third-party engine could use.
- The pure layers do no I/O: they import none of :data:`IO_MODULES` and nothing
  first-party outside the pure set.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("libmrpc", "mrpcd", "engines")
FIRST_PARTY = ("libmrpc", "mrpcd", "engines", "tests", "bench", "examples")

# libmrpc's pure layers: bytes/memoryviews in, values out. Engines may import them;
# they import no I/O module and nothing first-party outside this set.
PURE = (
    # ring slots, frames, layouts, marshal runtime, metadata codec, buddy allocator
    # and wire errors: the package exists to be pure (see libmrpc/wire/__init__.py)
    "libmrpc.wire",
    # StatusCode and the exception hierarchy (RpcError, MrpcError, LocalError,
    # ConfigError, SchemaError): an enum and exception classes, nothing else
    "libmrpc.status",
)

# The engine API: the one door from an engine into the daemon.
ENGINE_API = ("mrpcd.engine",)

# Modules that reach outside the process or its single thread of pure computation:
# sockets, files, memory maps, processes, threads and locks, signals, the clock,
# dynamic loading, logging handlers, and the third-party I/O packages we use.
IO_MODULES = (
    "_thread",
    "asyncio",
    "concurrent",
    "ctypes",
    "datetime",
    "fcntl",
    "glob",
    "http",
    "importlib",
    "io",
    "logging",
    "mmap",
    "multiprocessing",
    "os",
    "pathlib",
    "posix_ipc",
    "prometheus_client",
    "pwd",
    "pyverbs",
    "select",
    "selectors",
    "shutil",
    "signal",
    "socket",
    "socketserver",
    "ssl",
    "subprocess",
    "tempfile",
    "threading",
    "time",
    "urllib",
)


@dataclass(frozen=True)
class Arrow:
    where: str  # the importing file, relative to the repository
    line: int
    importer: str  # dotted name of the importing module
    imported: str  # dotted name of what it imports

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.importer} -> {self.imported}"


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_pure(name: str) -> bool:
    return _within(name, PURE)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str, root: Path) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, root: Path = ROOT) -> Iterator[Arrow]:
    """Every import in ``path``, at any nesting level, as arrows to dotted names.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module
    of the tree, else ``pkg``; relative imports are resolved against the file.
    """
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    where = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Arrow(where, node.lineno, me, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            for alias in node.names:
                sub = f"{parent}.{alias.name}"
                target = sub if alias.name != "*" and _is_module(sub, root) else parent
                yield Arrow(where, node.lineno, me, target)
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            dynamic = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
                isinstance(f, ast.Name) and f.id in ("import_module", "__import__")
            )
            arg = node.args[0]
            if dynamic and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield Arrow(where, node.lineno, me, arg.value)


def all_arrows(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Arrow]:
    arrows: list[Arrow] = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            arrows.extend(imports_of(path, root))
    return list(dict.fromkeys(arrows))  # `from m import a, b` is one arrow


def libmrpc_violations(arrows: list[Arrow]) -> list[str]:
    return [
        f"{a}  (libmrpc never imports the daemon or engines)"
        for a in arrows
        if _within(a.importer, ("libmrpc",)) and _within(a.imported, ("mrpcd", "engines"))
    ]


def mrpcd_violations(arrows: list[Arrow]) -> list[str]:
    return [
        f"{a}  (mrpcd loads engines by configured module path, never imports them)"
        for a in arrows
        if _within(a.importer, ("mrpcd",)) and _within(a.imported, ("engines",))
    ]


def engines_violations(arrows: list[Arrow]) -> list[str]:
    out = []
    for a in arrows:
        if not _within(a.importer, ("engines",)) or not _within(a.imported, FIRST_PARTY):
            continue
        if _within(a.imported, ENGINE_API + ("engines",)) or is_pure(a.imported):
            continue
        out.append(f"{a}  (engines use only mrpcd.engine and libmrpc's pure layers)")
    return out


def pure_violations(arrows: list[Arrow]) -> list[str]:
    out = []
    for a in arrows:
        if not is_pure(a.importer):
            continue
        if _within(a.imported, IO_MODULES):
            out.append(f"{a}  (a pure layer does no I/O)")
        elif _within(a.imported, FIRST_PARTY) and not is_pure(a.imported):
            out.append(f"{a}  (a pure layer imports only other pure layers)")
    return out


@pytest.fixture(scope="module")
def arrows() -> list[Arrow]:
    return all_arrows()


def _check(violations: list[str]) -> None:
    assert not violations, "forbidden imports:\n" + "\n".join(violations)


def test_libmrpc_never_imports_the_daemon_or_engines(arrows: list[Arrow]) -> None:
    _check(libmrpc_violations(arrows))


def test_pure_layers_do_no_io(arrows: list[Arrow]) -> None:
    assert any(is_pure(a.importer) for a in arrows)  # the walk saw the pure layers
    _check(pure_violations(arrows))


def test_mrpcd_never_imports_engines(arrows: list[Arrow]) -> None:
    _check(mrpcd_violations(arrows))


def test_engines_import_only_the_engine_api_and_pure_layers(arrows: list[Arrow]) -> None:
    _check(engines_violations(arrows))


def test_every_pure_name_is_a_module() -> None:
    for name in PURE + ENGINE_API:
        assert _is_module(name, ROOT), f"{name} is listed in test_layering but does not exist"


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Nested, TYPE_CHECKING, relative and literal dynamic imports all count."""
    (tmp_path / "libmrpc" / "wire").mkdir(parents=True)
    (tmp_path / "libmrpc" / "__init__.py").write_text("")
    (tmp_path / "libmrpc" / "_session.py").write_text("")
    (tmp_path / "libmrpc" / "wire" / "__init__.py").write_text("")
    (tmp_path / "libmrpc" / "wire" / "ring.py").write_text("")
    (tmp_path / "libmrpc" / "wire" / "bad.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import importlib\n"
        "from . import ring\n"  # 3: pure -> pure, allowed
        "from .. import _session\n"  # 4: pure -> impure libmrpc
        "if TYPE_CHECKING:\n"
        "    from mrpcd.daemon import Daemon\n"  # 6: libmrpc -> mrpcd
        "def f(name):\n"
        "    import socket\n"  # 8: I/O in a pure layer
        "    importlib.import_module('engines.tcp')\n"  # 9: literal: counts
        "    importlib.import_module(name)\n"  # 10: not literal: cannot count
    )
    arrows = all_arrows(tmp_path, ("libmrpc",))
    got = {(a.line, a.imported) for a in arrows if a.importer == "libmrpc.wire.bad"}
    assert got == {
        (1, "typing"),
        (2, "importlib"),
        (3, "libmrpc.wire.ring"),
        (4, "libmrpc._session"),
        (6, "mrpcd.daemon"),
        (8, "socket"),
        (9, "engines.tcp"),
    }
    lib = libmrpc_violations(arrows)
    assert [v.split("  ")[0] for v in lib] == [
        "libmrpc/wire/bad.py:6: libmrpc.wire.bad -> mrpcd.daemon",
        "libmrpc/wire/bad.py:9: libmrpc.wire.bad -> engines.tcp",
    ]
    pure = {v.split("  ")[0].split(" -> ")[1] for v in pure_violations(arrows)}
    assert pure == {"importlib", "libmrpc._session", "mrpcd.daemon", "socket", "engines.tcp"}
