"""Reading and compiling ``.proto`` schemas into a :class:`SchemaBundle`.

How this works: :func:`read_proto` collects the text of a file and of every file it
imports (transitively), keyed by the import path protoc sees. Those texts are what
an application sends to the daemon at bind time. :func:`compile_texts` writes them
into a private temporary directory, runs protoc (``grpcio-tools``, in-process) to
get a ``FileDescriptorSet``, then checks the result: proto3 only, and every name
that generated code will use is a plain identifier (no code injection through a
schema). Two hashes come out: ``schema_hash`` (what the wire layout depends on,
insensitive to comments and whitespace) and ``cache_key`` (what the generated code
depends on: the exact texts plus layout and generator versions).
"""

from __future__ import annotations

import hashlib
import json
import keyword
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

from libmrpc.layout import LAYOUT_VERSION, all_messages, attr_name, compute_layouts
from libmrpc.status import SchemaError

GENERATOR_VERSION = "1"

WELL_KNOWN_PREFIX = "google/protobuf/"
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Names a generated module defines itself (plus the per-service names the stub
# layer adds): a top-level schema type may not take them.
MODULE_NAMES = frozenset(
    {"SCHEMA_HASH", "CACHE_KEY", "LAYOUT_VERSION", "GENERATOR_VERSION", "TEXTS", "FDS",
     "MESSAGES", "ENUMS", "METHODS", "SERVICES", "MARSHAL", "VALIDATE"}
)


@dataclass(frozen=True)
class SchemaBundle:
    texts: dict[str, str]  # import path -> source text (never google/protobuf/*)
    fds: bytes  # serialized FileDescriptorSet, imports included, no source info
    schema_hash: str  # wire compatibility: sha256(canonical descriptors + layout version)[:16]
    cache_key: str  # generated-code identity: sha256(texts, layout and generator versions)


# --- reading -------------------------------------------------------------------------

_TOKENS = re.compile(
    r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.DOTALL
)
_IMPORT = re.compile(r'\bimport\s+(?:public\s+|weak\s+)?"((?:\\.|[^"\\\n])*)"\s*;')


def _strip_comments(text: str) -> str:
    return _TOKENS.sub(lambda m: m.group(0) if m.group(0)[0] in "\"'" else " ", text)


def imports_of(text: str) -> list[str]:
    """Import paths named by a proto text (comments ignored)."""
    return _IMPORT.findall(_strip_comments(text))


def _check_import_path(path: str, where: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise SchemaError(f"{where}: import path {path!r} must be relative, without '..'")


def read_proto(path: str | os.PathLike[str], include_dirs: tuple | list = ()) -> dict[str, str]:
    """Read ``path`` and its transitive imports; return ``{import path: text}``.

    Imports resolve against ``include_dirs`` in order, then the file's own
    directory (like ``protoc -I``). ``google/protobuf/*`` imports are skipped (the
    compiler supplies them). Raises :class:`SchemaError` for a missing file.
    """
    top = Path(path).resolve()
    if not top.is_file():
        raise SchemaError(f"{path}: no such schema file")
    roots = [Path(d).resolve() for d in include_dirs] + [top.parent]
    key = top.name
    for r in roots:
        if top.is_relative_to(r):
            key = top.relative_to(r).as_posix()
            break
    texts: dict[str, str] = {}
    todo = [(key, top)]
    while todo:
        k, p = todo.pop()
        if k in texts:
            continue
        try:
            texts[k] = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SchemaError(f"{p}: cannot read schema: {e}") from None
        for imp in imports_of(texts[k]):
            if imp.startswith(WELL_KNOWN_PREFIX) or imp in texts:
                continue
            _check_import_path(imp, k)
            found = next((r / imp for r in roots if (r / imp).is_file()), None)
            if found is None:
                dirs = ", ".join(str(r) for r in roots)
                raise SchemaError(f"{k}: import {imp!r} not found in {dirs}; add -I DIR")
            todo.append((imp, found))
    return texts


def cache_key_for(texts: dict[str, str]) -> str:
    """The generated-code cache key for ``texts`` (cheap: no protoc)."""
    blob = json.dumps([sorted(texts.items()), LAYOUT_VERSION, GENERATOR_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()


# --- compiling -----------------------------------------------------------------------

_PROTOC_LOCK = threading.Lock()


def _wkt_include() -> str:
    import importlib.resources

    return str(importlib.resources.files("grpc_tools") / "_proto")


def _run_protoc(args: list[str]) -> tuple[int, str]:
    """Run protoc in-process; return (exit code, what it wrote to stderr).

    protoc writes errors to file descriptor 2, so fd 2 is redirected to a temporary
    file for the duration (serialized by a lock; other threads' stderr output in
    that window lands in the captured text).
    """
    from grpc_tools import protoc

    with _PROTOC_LOCK, tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        try:
            os.dup2(err.fileno(), 2)
            rc = protoc.main(args)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return rc, err.read().decode("utf-8", "replace")


def compile_texts(texts: dict[str, str]) -> SchemaBundle:
    """Compile schema texts with protoc and validate them for code generation.

    Raises :class:`SchemaError` with protoc's messages (file:line:column) for
    syntax errors, and for proto2/editions files, bad identifiers and names that
    collide in the generated module. Nothing is left on disk.
    """
    if not texts:
        raise SchemaError("no schema texts to compile")
    for k in texts:
        _check_import_path(k, "schema bundle")
        if k.startswith(WELL_KNOWN_PREFIX):
            raise SchemaError(f"{k}: google/protobuf/* files are supplied by the compiler")
    with tempfile.TemporaryDirectory(prefix="mrpc-protoc-") as d:
        for k, t in texts.items():
            p = Path(d, "src", k)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(t, encoding="utf-8")
        out = Path(d, "out.pb")
        args = ["protoc", f"-I{Path(d, 'src')}", f"-I{_wkt_include()}",
                f"--descriptor_set_out={out}", "--include_imports", *sorted(texts)]
        rc, err = _run_protoc(args)
        if rc != 0 or not out.exists():
            raise SchemaError(f"protoc rejected the schema:\n{err.strip() or f'exit code {rc}'}")
        raw = out.read_bytes()
    fds = descriptor_pb2.FileDescriptorSet.FromString(raw)
    check_descriptors(fds, set(texts))
    canonical = fds.SerializeToString(deterministic=True)
    schema_hash = hashlib.sha256(canonical + f"|layout={LAYOUT_VERSION}".encode()).hexdigest()
    return SchemaBundle(dict(texts), canonical, schema_hash[:16], cache_key_for(texts))


# --- validation ----------------------------------------------------------------------


def _ident(name: str, what: str, file: str, *, allow_keyword: bool = False) -> None:
    if not IDENT.fullmatch(name) or name.startswith("__"):
        raise SchemaError(
            f"{file}: {what} {name!r} is not a plain identifier "
            "(letters, digits, '_'; not starting with a digit or '__')"
        )
    if not allow_keyword and keyword.iskeyword(name):
        raise SchemaError(f"{file}: {what} {name!r} is a Python keyword; rename it")


def _reserved_attrs() -> frozenset[str]:
    from libmrpc.message import Message

    return frozenset(dir(Message))


def _check_scope(names: list[tuple[str, str]], where: str, file: str) -> None:
    seen: dict[str, str] = {}
    for n, what in names:
        if n in seen:
            raise SchemaError(
                f"{file}: {what} {n!r} collides with {seen[n]} {n!r} in {where} "
                "(one Python namespace); rename one"
            )
        seen[n] = what


def _check_message(
    m: descriptor_pb2.DescriptorProto, full: str, file: str, reserved: frozenset[str]
) -> None:
    _ident(m.name, "message", file)
    scope: list[tuple[str, str]] = []
    for f in m.field:
        _ident(f.name, f"field of {full}", file, allow_keyword=True)
        a = attr_name(f.name)
        if a in reserved:
            raise SchemaError(
                f"{file}: field {full}.{f.name} collides with the generated message "
                f"method/attribute {a!r}; rename the field"
            )
        scope.append((a, "field"))
        if f.type == f.TYPE_GROUP:
            raise SchemaError(f"{file}: field {full}.{f.name}: groups are not supported")
    for od in m.oneof_decl:
        _ident(od.name, f"oneof of {full}", file, allow_keyword=True)
    for e in m.enum_type:
        _check_enum(e, f"{full}.{e.name}", file)
        scope.append((e.name, "enum"))
        scope.extend((v.name, "enum value") for v in e.value)
    for n in m.nested_type:
        _check_message(n, f"{full}.{n.name}", file, reserved)
        if not n.options.map_entry:
            scope.append((n.name, "message"))
    _check_scope(scope, full, file)


def _check_enum(e: descriptor_pb2.EnumDescriptorProto, full: str, file: str) -> None:
    _ident(e.name, "enum", file)
    for v in e.value:
        _ident(v.name, f"value of enum {full}", file)


def check_descriptors(fds: descriptor_pb2.FileDescriptorSet, user_files: set[str]) -> None:
    """Validate a compiled descriptor set; raise :class:`SchemaError` naming file and name."""
    reserved = _reserved_attrs()
    syntax = {f.name: f.syntax for f in fds.file}
    type_file: dict[str, str] = {}
    for f in fds.file:
        for full in all_messages(descriptor_pb2.FileDescriptorSet(file=[f])):
            type_file[full] = f.name
    top: list[tuple[str, str]] = [(n, "generated module name") for n in MODULE_NAMES]
    for f in fds.file:
        user = f.name in user_files
        if user and f.syntax != "proto3":
            kind = f.syntax or "proto2"
            raise SchemaError(
                f"{f.name}: {kind} syntax is not supported; mrpc schemas must declare "
                'syntax = "proto3";'
            )
        for part in f.package.split(".") if f.package else []:
            _ident(part, "package component", f.name, allow_keyword=True)
        prefix = f.package + "." if f.package else ""
        for m in f.message_type:
            _check_message(m, prefix + m.name, f.name, reserved)
        for e in f.enum_type:
            _check_enum(e, prefix + e.name, f.name)
        for s in f.service:
            _ident(s.name, "service", f.name)
            for meth in s.method:
                _ident(meth.name, f"method of {prefix}{s.name}", f.name)
        if not user:
            continue
        names = [(m.name, "message") for m in f.message_type]
        for e in f.enum_type:
            names.append((e.name, "enum"))
            names.extend((v.name, "enum value") for v in e.value)
        for s in f.service:
            names.extend([(s.name, "service"), (s.name + "Stub", "stub"),
                          (s.name + "Servicer", "servicer"),
                          (f"add_{s.name}Servicer_to_server", "servicer registration")])
        for n, what in names:
            if n.startswith("_"):
                raise SchemaError(f"{f.name}: top-level {what} {n!r} may not start with '_'")
        top.extend(names)
        for m in f.message_type:
            _check_fields_proto3(m, prefix + m.name, f.name, syntax, type_file)
        for s in f.service:
            for meth in s.method:
                for t in (meth.input_type, meth.output_type):
                    _require_proto3(t.lstrip("."), f"method {s.name}.{meth.name}", f.name,
                                    syntax, type_file)
    _check_scope(top, "the generated module", "schema bundle")
    try:
        compute_layouts(fds)
    except ValueError as e:
        raise SchemaError(f"schema has no mrpc layout: {e}") from None


def _require_proto3(
    type_name: str, where: str, file: str, syntax: dict[str, str], type_file: dict[str, str]
) -> None:
    src = type_file.get(type_name)
    if src is not None and syntax.get(src) != "proto3":
        raise SchemaError(f"{file}: {where} uses {type_name} from non-proto3 file {src}")


def _check_fields_proto3(
    m: descriptor_pb2.DescriptorProto, full: str, file: str,
    syntax: dict[str, str], type_file: dict[str, str],
) -> None:
    for f in m.field:
        if f.type == f.TYPE_MESSAGE:
            _require_proto3(f.type_name.lstrip("."), f"field {full}.{f.name}", file, syntax,
                            type_file)
    for n in m.nested_type:
        _check_fields_proto3(n, f"{full}.{n.name}", file, syntax, type_file)
