"""The deterministic shared-memory layout of protobuf messages.

How this works: every message type becomes a fixed-size little-endian *record*.
Scalars live inline, naturally aligned; every ``string``, ``bytes``, singular
message, repeated field and map is an 8-byte *reference* ``(u32 offset, u32
length)`` to memory elsewhere (offsets relative to the message's base). proto3
``optional`` fields get a bit in a bitmap of u64 words at the start of the record;
each real ``oneof`` gets a u32 *case* slot holding the active member's field
number. The rules are spelled out, with a worked example, in ``docs/LAYOUT.md``.

This module is pure: descriptors in, :class:`MessageLayout` records out. The app
side stubs and the daemon's generated marshallers both use it, and
``LAYOUT_VERSION`` is part of every schema hash, so a change of these rules must
bump it.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, replace

from google.protobuf import descriptor_pb2

LAYOUT_VERSION = 1

REF_SIZE = 8  # (u32 offset, u32 length)
REF_ALIGN = 4
MAX_DEPTH = 64  # nesting limit enforced by marshal/validate


class Kind:
    """Field kinds (plain strings so that layouts have a readable, evaluable repr)."""

    SCALAR = "scalar"
    STRING = "string"
    BYTES = "bytes"
    MESSAGE = "message"
    REPEATED_SCALAR = "repeated_scalar"
    REPEATED_STRING = "repeated_string"
    REPEATED_BYTES = "repeated_bytes"
    REPEATED_MESSAGE = "repeated_message"
    MAP = "map"

    REFS = frozenset(
        {
            STRING,
            BYTES,
            MESSAGE,
            REPEATED_SCALAR,
            REPEATED_STRING,
            REPEATED_BYTES,
            REPEATED_MESSAGE,
            MAP,
        }
    )
    REPEATED = frozenset({REPEATED_SCALAR, REPEATED_STRING, REPEATED_BYTES, REPEATED_MESSAGE, MAP})


_T = descriptor_pb2.FieldDescriptorProto
# proto type -> (scalar name, struct format char, size)
SCALARS: dict[int, tuple[str, str, int]] = {
    _T.TYPE_DOUBLE: ("double", "d", 8),
    _T.TYPE_FLOAT: ("float", "f", 4),
    _T.TYPE_INT32: ("int32", "i", 4),
    _T.TYPE_SINT32: ("sint32", "i", 4),
    _T.TYPE_SFIXED32: ("sfixed32", "i", 4),
    _T.TYPE_UINT32: ("uint32", "I", 4),
    _T.TYPE_FIXED32: ("fixed32", "I", 4),
    _T.TYPE_INT64: ("int64", "q", 8),
    _T.TYPE_SINT64: ("sint64", "q", 8),
    _T.TYPE_SFIXED64: ("sfixed64", "q", 8),
    _T.TYPE_UINT64: ("uint64", "Q", 8),
    _T.TYPE_FIXED64: ("fixed64", "Q", 8),
    _T.TYPE_BOOL: ("bool", "?", 1),
    _T.TYPE_ENUM: ("enum", "i", 4),
}
SCALARS_BY_FMT = {fmt: size for _n, fmt, size in SCALARS.values()}


@dataclass(frozen=True, slots=True)
class FieldLayout:
    name: str  # proto field name
    attr_name: str  # Python attribute: the name, plus "_" when it is a Python keyword
    number: int
    kind: str  # a Kind constant
    offset: int  # slot offset inside the record
    fmt: str  # struct char of the scalar / repeated element; "" otherwise
    size: int  # slot size: scalar size, or REF_SIZE for references
    type_name: str | None  # full name of the message / enum type (no leading dot)
    presence_bit: int | None  # proto3 optional: bit index in the presence bitmap
    oneof_name: str | None  # real oneof this field belongs to
    scalar: str = ""  # "int32", "enum", "string", "bytes", "message", ...
    elem_size: int = 0  # stride of repeated/map arrays (element / entry record size)
    map_key: FieldLayout | None = None  # MAP: the entry's key field (number 1)
    map_value: FieldLayout | None = None  # MAP: the entry's value field (number 2)


@dataclass(frozen=True, slots=True)
class OneofLayout:
    name: str
    offset: int  # of the u32 case slot
    members: tuple[int, ...]  # field numbers, declaration order


@dataclass(frozen=True, slots=True)
class MessageLayout:
    full_name: str
    size: int  # record size: a multiple of 8, at least 8
    fields: tuple[FieldLayout, ...]  # in field-number order
    presence_words: int  # u64 words of presence bitmap at offset 0
    oneofs: tuple[OneofLayout, ...] = ()
    map_entry: bool = False

    def field(self, name: str) -> FieldLayout:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.full_name} has no field {name!r}")


@dataclass(frozen=True, slots=True)
class MethodInfo:
    id: int  # index in the schema's METHODS (services by full name, declaration order)
    service: str  # full service name, e.g. "echo.Echo"
    name: str  # method name, e.g. "Echo"
    path: str  # gRPC path, e.g. "/echo.Echo/Echo"
    request: str  # full request message name
    response: str  # full response message name
    client_streaming: bool
    server_streaming: bool


def attr_name(name: str) -> str:
    """The Python attribute for a proto field name (keywords get a trailing ``_``)."""
    return name + "_" if keyword.iskeyword(name) else name


def _align(n: int, a: int) -> int:
    return (n + a - 1) & -a


def _iter_messages(
    prefix: str, msgs: list[descriptor_pb2.DescriptorProto]
) -> list[tuple[str, descriptor_pb2.DescriptorProto]]:
    out = []
    for m in msgs:
        full = f"{prefix}.{m.name}" if prefix else m.name
        out.append((full, m))
        out.extend(_iter_messages(full, list(m.nested_type)))
    return out


def all_messages(
    fds: descriptor_pb2.FileDescriptorSet,
) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message type of ``fds`` (nested ones included) by full name."""
    out: dict[str, descriptor_pb2.DescriptorProto] = {}
    for f in fds.file:
        out.update(_iter_messages(f.package, list(f.message_type)))
    return out


def _as_fds(fds: bytes | descriptor_pb2.FileDescriptorSet) -> descriptor_pb2.FileDescriptorSet:
    if isinstance(fds, descriptor_pb2.FileDescriptorSet):
        return fds
    return descriptor_pb2.FileDescriptorSet.FromString(bytes(fds))


def _slot(
    fd: descriptor_pb2.FieldDescriptorProto, msgs: dict[str, descriptor_pb2.DescriptorProto]
) -> tuple[str, str, int, str, str | None]:
    """(kind, fmt, slot size, scalar name, type name) of one field."""
    type_name = fd.type_name.lstrip(".") or None
    repeated = fd.label == _T.LABEL_REPEATED
    if fd.type in SCALARS:
        scalar, fmt, size = SCALARS[fd.type]
        if repeated:
            return Kind.REPEATED_SCALAR, fmt, REF_SIZE, scalar, type_name
        return Kind.SCALAR, fmt, size, scalar, type_name
    if fd.type == _T.TYPE_STRING:
        return (Kind.REPEATED_STRING if repeated else Kind.STRING), "", REF_SIZE, "string", None
    if fd.type == _T.TYPE_BYTES:
        return (Kind.REPEATED_BYTES if repeated else Kind.BYTES), "", REF_SIZE, "bytes", None
    if fd.type == _T.TYPE_MESSAGE:
        assert type_name is not None
        if repeated:
            entry = msgs.get(type_name)
            if entry is not None and entry.options.map_entry:
                return Kind.MAP, "", REF_SIZE, "message", type_name
            return Kind.REPEATED_MESSAGE, "", REF_SIZE, "message", type_name
        return Kind.MESSAGE, "", REF_SIZE, "message", type_name
    raise ValueError(f"field {fd.name!r}: unsupported field type {fd.type} (groups are proto2)")


def _layout_one(
    full: str, m: descriptor_pb2.DescriptorProto, msgs: dict[str, descriptor_pb2.DescriptorProto]
) -> MessageLayout:
    by_number = sorted(m.field, key=lambda f: f.number)
    optional = [f.number for f in by_number if f.proto3_optional]
    presence_bit = {num: i for i, num in enumerate(optional)}
    presence_words = (len(optional) + 63) // 64
    pos = 8 * presence_words

    real_oneofs = []  # (decl index, name)
    synthetic = {f.oneof_index for f in m.field if f.HasField("oneof_index") and f.proto3_optional}
    for i, od in enumerate(m.oneof_decl):
        if i not in synthetic:
            real_oneofs.append((i, od.name))
    oneof_off = {}
    for i, _name in real_oneofs:
        oneof_off[i] = pos
        pos += 4

    slots = []
    for f in by_number:
        kind, fmt, size, scalar, type_name = _slot(f, msgs)
        align = size if kind == Kind.SCALAR else REF_ALIGN
        slots.append((align, f, kind, fmt, size, scalar, type_name))
    slots.sort(key=lambda s: (-s[0], s[1].number))

    offsets: dict[int, int] = {}
    for align, f, _kind, _fmt, size, _scalar, _tn in slots:
        pos = _align(pos, align)
        offsets[f.number] = pos
        pos += size
    size = max(8, _align(pos, 8))

    fields = []
    for align, f, kind, fmt, slot_size, scalar, type_name in sorted(
        slots, key=lambda s: s[1].number
    ):
        oneof_name = None
        if f.HasField("oneof_index") and not f.proto3_optional:
            oneof_name = m.oneof_decl[f.oneof_index].name
        fields.append(
            FieldLayout(
                name=f.name,
                attr_name=attr_name(f.name),
                number=f.number,
                kind=kind,
                offset=offsets[f.number],
                fmt=fmt,
                size=slot_size,
                type_name=type_name,
                presence_bit=presence_bit.get(f.number),
                oneof_name=oneof_name,
                scalar=scalar,
            )
        )
    oneofs = tuple(
        OneofLayout(
            name=name,
            offset=oneof_off[i],
            members=tuple(
                f.number for f in m.field if f.HasField("oneof_index") and f.oneof_index == i
            ),
        )
        for i, name in real_oneofs
    )
    return MessageLayout(full, size, tuple(fields), presence_words, oneofs, m.options.map_entry)


def _elem_size(f: FieldLayout, layouts: dict[str, MessageLayout]) -> int:
    if f.kind == Kind.REPEATED_SCALAR:
        return SCALARS_BY_FMT[f.fmt]
    if f.kind in (Kind.REPEATED_STRING, Kind.REPEATED_BYTES):
        return REF_SIZE
    if f.kind in (Kind.REPEATED_MESSAGE, Kind.MAP):
        assert f.type_name is not None
        return layouts[f.type_name].size
    return 0


def compute_layouts(fds: bytes | descriptor_pb2.FileDescriptorSet) -> dict[str, MessageLayout]:
    """Layouts of every message type in a serialized or parsed FileDescriptorSet.

    Keyed by full proto name without the leading dot. Deterministic: depends only
    on the descriptors and LAYOUT_VERSION. Raises ``ValueError`` for proto2 groups.
    """
    msgs = all_messages(_as_fds(fds))
    base = {full: _layout_one(full, m, msgs) for full, m in msgs.items()}
    out: dict[str, MessageLayout] = {}
    for full, ml in base.items():
        fields = []
        for f in ml.fields:
            extra: dict[str, object] = {"elem_size": _elem_size(f, base)}
            if f.kind == Kind.MAP:
                assert f.type_name is not None
                entry = base[f.type_name]
                extra["map_key"] = entry.field("key")
                extra["map_value"] = entry.field("value")
            fields.append(replace(f, **extra))  # type: ignore[arg-type]
        out[full] = MessageLayout(
            ml.full_name, ml.size, tuple(fields), ml.presence_words, ml.oneofs, ml.map_entry
        )
    return out
