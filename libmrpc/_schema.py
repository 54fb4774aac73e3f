"""Reading and compiling ``.proto`` schemas into a :class:`SchemaBundle`.

How this works: :func:`read_proto` collects the text of a file and of every file it
imports (transitively), keyed by the import path protoc sees. Those texts are what
an application sends to the daemon at bind time. :func:`compile_texts` writes them
into a private temporary directory, runs protoc (``grpcio-tools``, in a child
process whose stderr is its own, so its messages never mix with other threads'
output) to get a ``FileDescriptorSet``, then checks the result: proto3 only, file
names are plain relative ``.proto`` paths (never protoc options), and every name
that generated code will use is a plain identifier that no generated name takes
(no code injection through a schema, no crash of the generator). Two hashes come out: ``schema_hash`` (what the wire layout depends on,
insensitive to comments and whitespace) and ``cache_key`` (what the generated code
depends on: the exact texts plus layout and generator versions).
"""

from __future__ import annotations

import hashlib
import json
import keyword
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

from libmrpc.status import SchemaError
from libmrpc.wire.layout import LAYOUT_VERSION, all_messages, attr_name, compute_layouts

GENERATOR_VERSION = "2"  # 2: generated code imports libmrpc.wire.* and libmrpc._message*

WELL_KNOWN_PREFIX = "google/protobuf/"
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Names a generated module defines itself (plus the per-service names the stub
# layer adds): a top-level schema type may not take them.
MODULE_NAMES = frozenset(
    {
        "SCHEMA_HASH",
        "CACHE_KEY",
        "LAYOUT_VERSION",
        "GENERATOR_VERSION",
        "TEXTS",
        "FDS",
        "MESSAGES",
        "ENUMS",
        "METHODS",
        "SERVICES",
        "MARSHAL",
        "VALIDATE",
    }
)
# Attributes the generator and the runtime set on every generated message class
# (besides the methods of libmrpc._message.Message): no field, nested type or
# nested enum value may take them.
CLASS_NAMES = frozenset({"_FULL_NAME", "_SIZE", "_LAYOUT", "_PB", "_SPECS", "_ATTRS", "_MEMBERS"})
# Attributes of generated servicer/stub classes: no method may take them.
SERVICE_NAMES = frozenset({"_MRPC_SCHEMA", "_MRPC_SERVICE"})
# File names: relative paths of plain components ending in .proto; a component
# never starts with '-' or '@' (protoc would read it as an option or a response file).
FILE_NAME = re.compile(
    r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}(?:/[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}){0,15}"
)
MAX_FILES = 1024
PROTOC_TIMEOUT = 120.0  # seconds; the daemon bounds its compiles more tightly


@dataclass(frozen=True)
class SchemaBundle:
    texts: dict[str, str]  # import path -> source text (never google/protobuf/*)
    fds: bytes  # serialized FileDescriptorSet, imports included, no source info
    schema_hash: str  # wire compatibility: sha256(canonical descriptors + layout version)[:16]
    cache_key: str  # generated-code identity: sha256(texts, layout and generator versions)


# --- reading -------------------------------------------------------------------------

_TOKENS = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.DOTALL)
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


def check_file_names(names: list[str] | set[str] | dict[str, str]) -> None:
    """Refuse schema file names protoc or the file system would misread.

    Each name is a relative path of at most 16 components of letters, digits and
    ``_ . + -`` (not starting with ``-``, ``.`` or ``@``), at most 100 characters
    each, ending in ``.proto``; no name is also the directory of another.
    Raises :class:`SchemaError` naming the file.
    """
    if len(names) > MAX_FILES:
        raise SchemaError(f"schema bundle has {len(names)} files; at most {MAX_FILES} are allowed")
    for k in names:
        if (
            not isinstance(k, str)
            or not FILE_NAME.fullmatch(k)
            or not k.endswith(".proto")
            or any(p in (".", "..") for p in k.split("/"))
        ):
            raise SchemaError(
                f"schema file name {str(k)[:120]!r} is not a plain relative path ending in .proto "
                "(components of letters, digits, '_', '.', '+', '-', not starting with '-' or '.'); "
                "rename the file"
            )
        if k.startswith(WELL_KNOWN_PREFIX):
            raise SchemaError(f"{k}: google/protobuf/* files are supplied by the compiler")
    dirs = {"/".join(k.split("/")[:i]) for k in names for i in range(1, k.count("/") + 1)}
    clash = sorted(set(names) & dirs)
    if clash:
        raise SchemaError(
            f"schema file name {clash[0]!r} is also the directory of another file; rename one"
        )


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


def _wkt_include() -> str:
    import importlib.resources

    return str(importlib.resources.files("grpc_tools") / "_proto")


_PROTOC_MAIN = (
    "import sys\nfrom grpc_tools import _protoc_compiler as c\n"
    "sys.exit(c.run_main([a.encode() for a in sys.argv[1:]]))"
)


def _run_protoc(args: list[str], cwd: str) -> tuple[int, str]:
    """Run protoc (grpcio-tools) in a child process; return (exit code, its stderr).

    The child's stderr is a pipe of its own: the messages are protoc's alone, and
    nothing this process's other threads write to fd 2 is captured or lost.
    """
    try:
        r = subprocess.run(
            [sys.executable, "-c", _PROTOC_MAIN, *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=PROTOC_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SchemaError(
            f"protoc did not finish within {PROTOC_TIMEOUT:g}s; simplify the schema"
        ) from None
    return r.returncode, r.stderr.decode("utf-8", "replace")


def compile_texts(texts: dict[str, str]) -> SchemaBundle:
    """Compile schema texts with protoc and validate them for code generation.

    Raises :class:`SchemaError` with protoc's messages (file:line:column) for
    syntax errors, and for proto2/editions files, bad identifiers and names that
    collide in the generated module. Nothing is left on disk.
    """
    if not texts:
        raise SchemaError("no schema texts to compile")
    check_file_names(texts)
    with tempfile.TemporaryDirectory(prefix="mrpc-protoc-") as d:
        src = Path(d, "src")
        for k, t in texts.items():
            p = Path(src, k)
            p.parent.mkdir(parents=True, exist_ok=True)
            try:
                p.write_bytes(t.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise SchemaError(
                    f"{k}: schema text is not valid Unicode ({e.reason} at {e.start})"
                ) from None
        out = Path(d, "out.pb")
        args = [
            "protoc",
            "-I.",
            f"-I{_wkt_include()}",
            "--descriptor_set_out=../out.pb",
            "--include_imports",
            *sorted(texts),
        ]
        rc, err = _run_protoc(args, str(src))
        if rc != 0 or not out.exists():
            err = err.replace(str(src) + "/", "")
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
    from libmrpc._message import Message

    return frozenset(dir(Message)) | CLASS_NAMES


def _class_attr(name: str, what: str, full: str, file: str, reserved: frozenset[str]) -> None:
    """``name`` becomes an attribute of the generated class of ``full``."""
    if name in reserved:
        raise SchemaError(
            f"{file}: {what} {full}.{name} collides with the generated message "
            f"method/attribute {name!r}; rename it"
        )


def _enum_member(name: str, full: str, file: str) -> None:
    """Python's enum module reserves ``_sunder_`` names and ``mro``."""
    if name == "mro" or (len(name) > 2 and name[0] == name[-1] == "_"):
        raise SchemaError(
            f"{file}: value {name!r} of enum {full} is a name Python enums reserve; rename it"
        )


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
        _class_attr(e.name, "nested enum", full, file, reserved)
        scope.append((e.name, "enum"))
        for v in e.value:
            _class_attr(v.name, "enum value", full, file, reserved)
        scope.extend((v.name, "enum value") for v in e.value)
    for n in m.nested_type:
        _check_message(n, f"{full}.{n.name}", file, reserved)
        if not n.options.map_entry:
            _class_attr(n.name, "nested message", full, file, reserved)
            scope.append((n.name, "message"))
    _check_scope(scope, full, file)


def _check_enum(e: descriptor_pb2.EnumDescriptorProto, full: str, file: str) -> None:
    _ident(e.name, "enum", file)
    for v in e.value:
        _ident(v.name, f"value of enum {full}", file)
        _enum_member(v.name, full, file)


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
                if meth.name in SERVICE_NAMES:
                    raise SchemaError(
                        f"{f.name}: method {prefix}{s.name}.{meth.name} collides with an "
                        "attribute of the generated stub and servicer classes; rename it"
                    )
        if not user:
            continue
        names = [(m.name, "message") for m in f.message_type]
        for e in f.enum_type:
            names.append((e.name, "enum"))
            names.extend((v.name, "enum value") for v in e.value)
        for s in f.service:
            names.extend(
                [
                    (s.name, "service"),
                    (s.name + "Stub", "stub"),
                    (s.name + "Servicer", "servicer"),
                    (f"add_{s.name}Servicer_to_server", "servicer registration"),
                ]
            )
        for n, what in names:
            if n.startswith("_"):
                raise SchemaError(f"{f.name}: top-level {what} {n!r} may not start with '_'")
        top.extend(names)
        for m in f.message_type:
            _check_fields_proto3(m, prefix + m.name, f.name, syntax, type_file)
        for s in f.service:
            for meth in s.method:
                for t in (meth.input_type, meth.output_type):
                    _require_proto3(
                        t.lstrip("."), f"method {s.name}.{meth.name}", f.name, syntax, type_file
                    )
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
    m: descriptor_pb2.DescriptorProto,
    full: str,
    file: str,
    syntax: dict[str, str],
    type_file: dict[str, str],
) -> None:
    for f in m.field:
        if f.type == f.TYPE_MESSAGE:
            _require_proto3(
                f.type_name.lstrip("."), f"field {full}.{f.name}", file, syntax, type_file
            )
    for n in m.nested_type:
        _check_fields_proto3(n, f"{full}.{n.name}", file, syntax, type_file)
