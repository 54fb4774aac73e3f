"""Generate, cache and load the one Python module of a schema bundle.

How this works: :func:`generate_source` turns a :class:`SchemaBundle` into the
source of a module with one class per message type (accessors from
:mod:`libmrpc._codegen_access`), an ``IntEnum`` per enum type, the daemon's
MARSHAL/VALIDATE tables (:mod:`libmrpc._codegen_wire`) and the METHODS/SERVICES
tables; its last statement hands the namespace to ``libmrpc.stubs``. The module
embeds its schema texts and descriptor set, so it imports without protoc.

:func:`load_module` imports generated source under a unique module name, writing
it first (atomically) to ``cache_dir/<cache_key>.py`` when a cache directory is
given; :func:`load_cached` is the hit path that never runs protoc: hash the texts,
import the file. Loaded modules are memoized per cache key in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import linecache
import logging
import marshal
import os
import re
import stat
import sys
import tempfile
import threading
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

from google.protobuf import descriptor_pb2

from libmrpc._codegen_access import accessors, spec_bindings, struct_helpers
from libmrpc._codegen_wire import marshal_code, validate_code
from libmrpc._schema import GENERATOR_VERSION, SchemaBundle, cache_key_for
from libmrpc.wire.layout import LAYOUT_VERSION, MessageLayout, MethodInfo, compute_layouts

__all__ = [
    "MethodInfo",
    "compile_source",
    "exec_codes",
    "generate_source",
    "load_cached",
    "load_module",
]

log = logging.getLogger(__name__)

_LOADED: dict[str, ModuleType] = {}
_LOCK = threading.RLock()


def _lit(v: Any) -> str:
    """A Python literal for layout records (validated names, ints, tuples)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        short = {
            "FieldLayout": "_FL",
            "MessageLayout": "_ML",
            "OneofLayout": "_OL",
            "MethodInfo": "_MI",
        }[type(v).__name__]
        args = ", ".join(_lit(getattr(v, f.name)) for f in dataclasses.fields(v))
        return f"{short}({args})"
    if isinstance(v, tuple):
        return "(" + "".join(_lit(x) + ", " for x in v) + ")"
    if v is None or isinstance(v, (bool, int, str)):
        return repr(v)
    raise TypeError(f"no literal for {type(v).__name__}")


class _Types:
    """Message and enum types of the bundle, in a deterministic order."""

    def __init__(self, fds: descriptor_pb2.FileDescriptorSet, user: set[str]) -> None:
        self.messages: list[tuple[str, str | None, str, bool]] = []  # full, parent, name, user
        self.enums: list[tuple[str, str | None, str, bool, list[tuple[str, int]]]] = []
        for f in fds.file:
            if f.syntax != "proto3":
                continue  # only reachable as an unused import (checked by schema)
            prefix = f.package + "." if f.package else ""
            for e in f.enum_type:
                self._enum(prefix + e.name, None, e, f.name in user)
            for m in f.message_type:
                self._msg(prefix + m.name, None, m, f.name in user)

    def _enum(self, full: str, parent: str | None, e: Any, user: bool) -> None:
        self.enums.append((full, parent, e.name, user, [(v.name, v.number) for v in e.value]))

    def _msg(self, full: str, parent: str | None, m: Any, user: bool) -> None:
        self.messages.append((full, parent, m.name, user))
        for e in m.enum_type:
            self._enum(f"{full}.{e.name}", full, e, user)
        for n in m.nested_type:
            self._msg(f"{full}.{n.name}", full, n, user)


def _methods(fds: descriptor_pb2.FileDescriptorSet, user: set[str]) -> list[MethodInfo]:
    services = []
    for f in fds.file:
        if f.name not in user:
            continue
        prefix = f.package + "." if f.package else ""
        services += [(prefix + s.name, s) for s in f.service]
    out: list[MethodInfo] = []
    for full, s in sorted(services, key=lambda x: x[0]):
        for m in s.method:
            out.append(
                MethodInfo(
                    len(out),
                    full,
                    m.name,
                    f"/{full}/{m.name}",
                    m.input_type.lstrip("."),
                    m.output_type.lstrip("."),
                    m.client_streaming,
                    m.server_streaming,
                )
            )
    return out


def generate_source(bundle: SchemaBundle) -> str:
    """The generated module's source for ``bundle`` (deterministic)."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(bundle.fds)
    user = set(bundle.texts)
    layouts: dict[str, MessageLayout] = compute_layouts(fds)
    types = _Types(fds, user)
    ids = {full: k for k, (full, *_r) in enumerate(types.messages)}
    qual: dict[str, str] = {}
    for full, parent, name, _u in types.messages:
        qual[full] = f"{qual[parent]}.{name}" if parent else name

    files = ", ".join(sorted(bundle.texts))
    o: list[str] = [
        ascii(f"mrpc generated module for schema {bundle.schema_hash} ({files}). DO NOT EDIT."),
        "import enum as _enum",
        "import struct as _struct",
        "from libmrpc.wire import marshal as _mr",
        "from libmrpc import _message as _rt",
        "from libmrpc import _message_views as _rv",
        "from libmrpc.wire.layout import FieldLayout as _FL, MessageLayout as _ML",
        "from libmrpc.wire.layout import MethodInfo as _MI, OneofLayout as _OL",
        "from libmrpc.wire.errors import WireError as _WireError",
        "",
        f"SCHEMA_HASH = {bundle.schema_hash!r}",
        f"CACHE_KEY = {bundle.cache_key!r}",
        f"LAYOUT_VERSION = {LAYOUT_VERSION!r}",
        f"GENERATOR_VERSION = {GENERATOR_VERSION!r}",
        f"TEXTS = {dict(sorted(bundle.texts.items()))!a}",
        f"FDS = {bundle.fds!r}",
        "",
        struct_helpers(),
        "_EMPTY = _rv._EMPTY",
        "",
    ]
    bodies: dict[int, list[str]] = {}
    for full, *_r in types.messages:
        k = ids[full]
        src, props = accessors(k, layouts[full], ids)
        o.append(src)
        bodies[k] = props
    for full, parent, name, _u in types.messages:
        k, ml = ids[full], layouts[full]
        o += [
            f"class _C{k}(_rt.Message):",
            "    __slots__ = ()",
            f"    _FULL_NAME = {full!r}",
            f"    _SIZE = {ml.size}",
            f"    _LAYOUT = {_lit(ml)}",
            *bodies[k],
            f"_C{k}.__name__ = {name!r}",
            f"_C{k}.__qualname__ = {qual[full]!r}",
            "",
        ]
    for full, parent, name, user_type in types.messages:
        if parent is not None:
            o.append(f"_C{ids[parent]}.{name} = _C{ids[full]}")
        elif user_type:
            o.append(f"{name} = _C{ids[full]}")
    o += ["", "ENUMS = {}"]
    for j, (full, parent, name, user_type, values) in enumerate(types.enums):
        qn = f"{qual[parent]}.{name}" if parent else name
        o.append(f"_E{j} = _enum.IntEnum({name!r}, {values!r}, module=__name__, qualname={qn!r})")
        o.append(f"ENUMS[{full!r}] = _E{j}")
        target = f"_C{ids[parent]}." if parent else ("" if user_type else None)
        if target is not None:
            o.append(f"{target}{name} = _E{j}")
            o += [f"{target}{vn} = {vnum!r}" for vn, vnum in values]
    o += [
        "",
        "MESSAGES = {" + ", ".join(f"{f!r}: _C{ids[f]}" for f, *_r in types.messages) + "}",
        "_rt.finish_classes(MESSAGES, FDS)",
    ]
    for full, *_r in types.messages:
        o += spec_bindings(ids[full], layouts[full])
    o.append("")
    for full, *_r in types.messages:
        k = ids[full]
        o.append(marshal_code(k, layouts[full], ids, layouts))
        o.append(validate_code(k, layouts[full], ids, layouts))
    names = [f for f, *_r in types.messages]
    o += [
        "MARSHAL = {" + ", ".join(f"{f!r}: _marshal{ids[f]}" for f in names) + "}",
        "VALIDATE = {" + ", ".join(f"{f!r}: _validate{ids[f]}" for f in names) + "}",
        "",
    ]
    methods = _methods(fds, user)
    o.append("METHODS = [" + "".join("\n    " + _lit(m) + "," for m in methods) + "\n]")
    services: dict[str, list[int]] = {}
    for m in methods:
        services.setdefault(m.service, []).append(m.id)
    o.append(
        "SERVICES = {" + ", ".join(f"{s!r}: {tuple(ids_)!r}" for s, ids_ in services.items()) + "}"
    )
    o += [
        "",
        "from libmrpc import stubs as _stubs  # noqa: E402",
        "_stubs.install_services(globals())",
        "",
    ]
    return "\n".join(o)


# --- loading ------------------------------------------------------------------------


def _module_name(key: str) -> str:
    return f"_mrpc_schema_{key[:24]}"


# A top-level statement of generated code starts at column 0 with a name
# (continuation lines are indented or close a bracket).
_STATEMENT = re.compile(r"^(?=[A-Za-z_])", re.MULTILINE)
_CHUNK = 64 * 1024


def compile_source(src: str, filename: str) -> tuple[CodeType, ...]:
    """Compile generated source in chunks of whole top-level statements.

    Compiling one huge module costs memory in proportion to its whole syntax
    tree (a 200 KB schema's 9 MB of code took 1 GB); chunks of ~64 KB keep that
    small. Line numbers stay those of ``src``. Run the chunks in order with
    :func:`exec_codes`.
    """
    codes: list[CodeType] = []
    start, line = 0, 0
    for m in _STATEMENT.finditer(src, 1):
        if m.start() - start >= _CHUNK:
            chunk = src[start : m.start()]
            codes.append(compile("\n" * line + chunk, filename, "exec"))
            line += chunk.count("\n")
            start = m.start()
    if src[start:].strip():
        codes.append(compile("\n" * line + src[start:], filename, "exec"))
    return tuple(codes)


def exec_codes(
    codes: tuple[CodeType, ...], key: str, filename: str, *, register: bool = True
) -> ModuleType:
    """A new module from compiled chunks; in ``sys.modules`` only if ``register``."""
    name = _module_name(key)
    mod = ModuleType(name)
    mod.__file__ = filename
    if register:
        sys.modules[name] = mod
    try:
        for code in codes:
            exec(code, mod.__dict__)  # noqa: S102 - our generated code
    except BaseException:
        if register:
            sys.modules.pop(name, None)
        raise
    return mod


def _exec_source(src: str, key: str) -> ModuleType:
    filename = f"<mrpc schema {key[:16]}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    return exec_codes(compile_source(src, filename), key, filename)


def _read_own(path: Path) -> bytes:
    """A file's bytes if it is a regular file of ours (or root's) that others cannot write.

    Raises OSError otherwise (the caller treats it as a cache miss).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise PermissionError(
                f"{path} is not a regular file of uid {os.geteuid()} or root closed to "
                f"others (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
            )
        return f.read()


def _import_file(path: Path, key: str) -> ModuleType:
    """Import a cached module; its code is cached next to it as ``<key>.code``.

    (Our own bytecode cache, so a hit stays fast under PYTHONDONTWRITEBYTECODE.)
    Both files must be ours and closed to others' writes.
    """
    src = _read_own(path)
    stamp = importlib.util.MAGIC_NUMBER + hashlib.sha256(src).digest()[:12]
    code_path = path.with_suffix(".code")
    codes = None
    try:
        data = _read_own(code_path)
        if data[:16] == stamp:
            codes = marshal.loads(data[16:])
            if not isinstance(codes, tuple) or not all(isinstance(c, CodeType) for c in codes):
                codes = None
    except (OSError, ValueError, EOFError, TypeError):
        codes = None
    if codes is None:
        codes = compile_source(src.decode("utf-8"), str(path))
        with contextlib.suppress(OSError):
            write_atomic(code_path, stamp + marshal.dumps(codes))
    return exec_codes(codes, key, str(path))


def write_atomic(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename (no torn files).

    The file gets ``mode`` (default 0644) whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_module(bundle: SchemaBundle, cache_dir: Path | str | None = None) -> ModuleType:
    """Import the generated module of ``bundle`` (from/to ``cache_dir`` if given)."""
    key = bundle.cache_key
    with _LOCK:
        mod = _LOADED.get(key)
        if mod is not None:
            return mod
        if cache_dir is None:
            mod = _exec_source(generate_source(bundle), key)
        else:
            path = Path(cache_dir) / f"{key}.py"
            mod = _try_import(path, key, bundle.texts) if path.is_file() else None
            if mod is None:
                src = generate_source(bundle)
                try:
                    write_atomic(path, src)
                    mod = _import_file(path, key)
                except OSError as e:
                    log.warning("not caching schema module in %s: %s", cache_dir, e)
                    mod = _exec_source(src, key)
        _LOADED[key] = mod
        return mod


def _try_import(path: Path, key: str, texts: dict[str, str]) -> ModuleType | None:
    try:
        mod = _import_file(path, key)
    except OSError as e:
        log.warning("ignoring schema cache file %s: %s", path, e)
        return None
    except Exception:
        log.exception("ignoring unloadable schema cache file %s", path)
        return None
    if getattr(mod, "CACHE_KEY", None) != key or getattr(mod, "TEXTS", None) != texts:
        log.warning("ignoring schema cache file %s: it is for other texts", path)
        return None
    return mod


def load_cached(texts: dict[str, str], cache_dir: Path | str | None) -> ModuleType | None:
    """The module for ``texts`` from this process or ``cache_dir``; None on a miss.

    Never runs protoc. A cache file that fails to import is logged and ignored
    (the caller recompiles and overwrites it).
    """
    key = cache_key_for(texts)
    with _LOCK:
        mod = _LOADED.get(key)
        if mod is not None:
            return mod
        if cache_dir is None:
            return None
        path = Path(cache_dir) / f"{key}.py"
        mod = _try_import(path, key, texts) if path.is_file() else None
        if mod is not None:
            _LOADED[key] = mod
        return mod
