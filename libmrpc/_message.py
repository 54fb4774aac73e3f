"""Runtime base of the generated message classes: views over records in a heap.

How this works: a message object is a *view* ``(buf, base, off, owner)`` onto a
fixed-size record laid out by :mod:`libmrpc.wire.layout`; ``buf`` is a memoryview of a
whole heap (or of a received image's heap), references inside records are
``(offset, length)`` pairs relative to ``base``. Generated subclasses add one
property per field whose getter/setter is straight-line ``struct`` code.

Memory comes from an :class:`Arena`: a list of blocks from one :class:`Heap`.
Small allocations bump inside a chunk; large ones get their own block; when the
arena is garbage-collected every block goes back to the heap. Every view holds a
strong reference to its owner (arena, or the receive-side owner object), so the
memory lives as long as any view of it.

A view is in one of three states (``_w``): 0 writable, 1 read-only (a received
message: setters raise ``TypeError``), 2 lazy: a not-yet-present sub-message of a
writable parent. A lazy view reads from a shared all-zero record (so every field
reads as its default) and on its first write allocates its record and links it
into the parent (protobuf semantics: reading a sub-message does not set it).

Deviation from protobuf, on purpose: assigning to a message field copies the
value (``m.sub = other`` behaves like ``m.sub.CopyFrom(other)``), and assigning an
iterable to a repeated field (or a mapping to a map) replaces its contents.
"""

from __future__ import annotations

import math
import operator
import struct
import threading
from typing import Any, ClassVar

from libmrpc._arena import (
    Arena,
    ReadOnlyOwner,
    default_heap,
    set_default_heap,
    zeros,
)
from libmrpc._heap import Heap
from libmrpc.wire.layout import Kind, MessageLayout, OneofLayout

__all__ = [
    "Arena",
    "Message",
    "ReadOnlyOwner",
    "copy_message",
    "default_heap",
    "set_default_heap",
    "zeros",
]

REF = struct.Struct("<II")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

# --- value checks (shared by generated setters) -------------------------------------


def as_int(v: Any, where: str) -> int:
    if isinstance(v, bool):
        raise TypeError(f"field {where}: expected an int, got a boolean")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"field {where}: expected an int, got {type(v).__name__}") from None


def out_of_range(v: int, where: str) -> None:
    raise ValueError(f"field {where}: value out of range: {v}")


def as_float(v: Any, where: str) -> float:
    if isinstance(v, (str, bytes, bytearray)) or not hasattr(v, "__float__"):
        raise TypeError(f"field {where}: expected a number, got {type(v).__name__}")
    return float(v)


def f32_overflow(v: float) -> float:
    """What protobuf stores for a double too large for a float: a signed infinity."""
    return math.copysign(math.inf, v)


def as_bool(v: Any, where: str) -> bool:
    if isinstance(v, float):
        raise TypeError(f"field {where}: expected a bool, got float")
    try:
        return bool(operator.index(v))
    except TypeError:
        raise TypeError(f"field {where}: expected a bool, got {type(v).__name__}") from None


def as_str(v: Any, where: str) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"field {where}: bytes are not valid UTF-8") from None
    if isinstance(v, str):
        return v
    raise TypeError(f"field {where}: expected str, got {type(v).__name__}")


def as_bytes(v: Any, where: str) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return v
    if isinstance(v, memoryview):
        return v if v.format == "B" and v.ndim == 1 and v.c_contiguous else v.tobytes()
    raise TypeError(f"field {where}: expected bytes, got {type(v).__name__}")


def scalar_checker(scalar: str, fmt: str, where: str) -> Any:
    """A per-element check-and-convert function for repeated/map scalar values."""
    if fmt in "iIqQ":
        bits = {"i": 31, "I": 32, "q": 63, "Q": 64}[fmt]
        lo, hi = (0, (1 << bits) - 1) if fmt in "IQ" else (-(1 << bits), (1 << bits) - 1)

        def check_int(v: Any) -> int:
            if v.__class__ is not int:
                v = as_int(v, where)
            if not lo <= v <= hi:
                out_of_range(v, where)
            return v

        return check_int
    if fmt == "?":
        return lambda v: v if v.__class__ is bool else as_bool(v, where)
    if fmt == "f":

        def check_f32(v: Any) -> float:
            v = v if v.__class__ is float else as_float(v, where)
            return v if abs(v) <= 3.4028234663852886e38 or math.isnan(v) else f32_overflow(v)

        return check_f32
    return lambda v: v if v.__class__ is float else as_float(v, where)


# --- write helpers used by generated setters ----------------------------------------


def put_blob(msg: Message, slot: int, data: Any) -> None:
    """Copy ``data`` into ``msg``'s arena and point the ref at record offset ``slot``."""
    n = len(data)
    if not n:
        REF.pack_into(msg._buf, msg._off + slot, 0, 0)
        return
    a = msg._owner.alloc(n, zero=False)
    buf = msg._buf
    buf[a : a + n] = data
    REF.pack_into(buf, msg._off + slot, a, n)


def set_case(msg: Message, case_off: int, number: int, members: dict[int, tuple[int, int]]) -> None:
    """Make field ``number`` the active member of a oneof, clearing the previous one."""
    buf, off = msg._buf, msg._off
    cur = U32.unpack_from(buf, off + case_off)[0]
    if cur != number:
        prev = members.get(cur)
        if prev is not None:
            buf[off + prev[0] : off + prev[0] + prev[1]] = zeros(prev[1])
        U32.pack_into(buf, off + case_off, number)


class FieldSpec:
    """Per-field runtime facts for the generic paths (repeated/map views, copies)."""

    __slots__ = (
        "attr",
        "check",
        "cls",
        "es",
        "fmt",
        "key",
        "kind",
        "name",
        "number",
        "off",
        "oneof",
        "pmask",
        "pword",
        "scalar",
        "st",
        "value",
        "where",
    )

    def __init__(self, f: Any, owner: type[Message], classes: dict[str, type[Message]]) -> None:
        self.name: str = f.name
        self.attr: str = f.attr_name
        self.where = f"{owner._FULL_NAME}.{f.name}"
        self.kind: str = f.kind
        self.off: int = f.offset
        self.es: int = f.elem_size
        self.fmt: str = f.fmt
        self.number: int = f.number
        self.scalar: str = f.scalar
        self.st = struct.Struct("<" + f.fmt) if f.fmt else None
        self.check = scalar_checker(f.scalar, f.fmt, self.where) if f.fmt else None
        self.cls: type[Message] | None = classes.get(f.type_name) if f.type_name else None
        self.oneof: OneofLayout | None = None
        for o in owner._LAYOUT.oneofs:
            if f.number in o.members:
                self.oneof = o
        self.pword = self.pmask = 0
        if f.presence_bit is not None:
            self.pword, self.pmask = 8 * (f.presence_bit // 64), 1 << (f.presence_bit % 64)
        self.key: FieldSpec | None = None
        self.value: FieldSpec | None = None


# --- the base class -----------------------------------------------------------------

_RO = "{} is read-only (received message); build a new message to reply"


class Message:
    """Base of generated message classes; see the module docstring."""

    __slots__ = ("__weakref__", "_base", "_buf", "_off", "_owner", "_parent", "_w")
    _FULL_NAME: ClassVar[str] = ""
    _SIZE: ClassVar[int] = 8
    _LAYOUT: ClassVar[MessageLayout]
    _SPECS: ClassVar[dict[str, FieldSpec]] = {}  # by proto field name
    _ATTRS: ClassVar[dict[str, FieldSpec]] = {}  # by Python attribute name
    _MEMBERS: ClassVar[dict[str, dict[int, tuple[int, int]]]] = {}  # oneof -> slots
    _PB: ClassVar[Any] = None  # PbFactory of the generated module

    _buf: memoryview
    _base: int
    _off: int
    _owner: Any
    _w: int
    _parent: Any

    def __init__(self, **fields: Any) -> None:
        arena = Arena(default_heap())
        self._buf, self._base, self._owner, self._w, self._parent = arena.buf, 0, arena, 0, None
        self._off = arena.alloc(self._SIZE)
        if fields:
            self._init_fields(fields)

    @classmethod
    def new(cls, heap: Heap, **fields: Any) -> Any:
        """A new message in a new arena on ``heap`` (instead of the default heap)."""
        arena = Arena(heap)
        m = object.__new__(cls)
        m._buf, m._base, m._owner, m._w, m._parent = arena.buf, 0, arena, 0, None
        m._off = arena.alloc(cls._SIZE)
        if fields:
            m._init_fields(fields)
        return m

    @classmethod
    def _from_image(cls, buf: memoryview, base: int, owner: object) -> Any:
        """A read-only view of a received image whose root record is at ``buf[base:]``."""
        m = object.__new__(cls)
        m._buf, m._base, m._off, m._owner, m._w, m._parent = (
            buf.toreadonly(),
            base,
            base,
            owner,
            1,
            None,
        )
        return m

    @classmethod
    def _view(cls, buf: memoryview, base: int, off: int, owner: Any, w: int) -> Any:
        m = object.__new__(cls)
        m._buf, m._base, m._off, m._owner, m._w, m._parent = buf, base, off, owner, w, None
        return m

    @classmethod
    def _lazy(cls, parent: Message, spec: FieldSpec) -> Any:
        m = object.__new__(cls)
        m._buf, m._base, m._off, m._owner = zeros(cls._SIZE), 0, 0, parent._owner
        if parent._w == 1:
            m._w, m._parent = 1, None
        else:
            m._w, m._parent = 2, (parent, spec)
        return m

    def _wprep(self) -> None:
        """Called by setters when ``_w`` is not 0: refuse, or materialize a lazy view."""
        if self._w == 1:
            raise TypeError(_RO.format(self._FULL_NAME))
        parent, spec = self._parent
        if parent._w:
            parent._wprep()
        self._off = link_message(parent, spec)
        self._buf, self._base, self._w, self._parent = parent._buf, 0, 0, None

    def _init_fields(self, fields: dict[str, Any]) -> None:
        attrs = self._ATTRS
        for k, v in fields.items():
            if k not in attrs:
                raise ValueError(f'Protocol message {self._FULL_NAME} has no "{k}" field.')
            setattr(self, k, v)

    @property
    def _heap(self) -> Heap | None:
        return None if self._w == 1 else self._owner.heap

    # --- protobuf-like API -----------------------------------------------------------

    def SetInParent(self) -> None:
        """Mark this (sub-)message present without setting any field."""
        if self._w:
            self._wprep()

    def HasField(self, name: str) -> bool:
        buf, off = self._buf, self._off
        spec = self._SPECS.get(name)
        if spec is None:
            for o in self._LAYOUT.oneofs:
                if o.name == name:
                    return U32.unpack_from(buf, off + o.offset)[0] in o.members
            raise ValueError(f'Protocol message {self._FULL_NAME} has no field "{name}".')
        if spec.oneof is not None:
            return U32.unpack_from(buf, off + spec.oneof.offset)[0] == spec.number
        if spec.pmask:
            return bool(U64.unpack_from(buf, off + spec.pword)[0] & spec.pmask)
        if spec.kind == Kind.MESSAGE:
            return REF.unpack_from(buf, off + spec.off)[1] != 0
        raise ValueError(f"Field {spec.where} does not have presence; use its value instead.")

    def ClearField(self, name: str) -> None:
        spec = self._SPECS.get(name)
        oneof = next((o for o in self._LAYOUT.oneofs if o.name == name), None)
        if spec is None and oneof is None:
            raise ValueError(f'Protocol message {self._FULL_NAME} has no field "{name}".')
        if self._w == 1:
            raise TypeError(_RO.format(self._FULL_NAME))
        if self._w == 2:
            return  # a lazy view has nothing set
        buf, off = self._buf, self._off
        if oneof is not None:
            cur = U32.unpack_from(buf, off + oneof.offset)[0]
            spec = next((s for s in self._SPECS.values() if s.number == cur), None)
            U32.pack_into(buf, off + oneof.offset, 0)
            if spec is None:
                return
        assert spec is not None
        size = spec.st.size if spec.kind == Kind.SCALAR else 8  # type: ignore[union-attr]
        buf[off + spec.off : off + spec.off + size] = zeros(size)
        if spec.pmask:
            w = U64.unpack_from(buf, off + spec.pword)[0]
            U64.pack_into(buf, off + spec.pword, w & ~spec.pmask)
        if spec.oneof is not None:
            case = off + spec.oneof.offset
            if U32.unpack_from(buf, case)[0] == spec.number:
                U32.pack_into(buf, case, 0)

    def WhichOneof(self, oneof_group: str) -> str | None:
        for o in self._LAYOUT.oneofs:
            if o.name == oneof_group:
                cur = U32.unpack_from(self._buf, self._off + o.offset)[0]
                for s in self._SPECS.values():
                    if s.number == cur and s.oneof is o:
                        return s.name
                return None
        raise ValueError(f'Protocol message {self._FULL_NAME} has no oneof "{oneof_group}".')

    def Clear(self) -> None:
        """Reset every field (the record is zeroed; old sub-views become detached)."""
        if self._w:
            if self._w == 2:
                return
            raise TypeError(_RO.format(self._FULL_NAME))
        self._buf[self._off : self._off + self._SIZE] = zeros(self._SIZE)

    def CopyFrom(self, other: Any) -> None:
        """Replace this message's contents with a deep copy of ``other``.

        ``other`` may be a message of this type, the official protobuf message, or a
        dict of field values.
        """
        if isinstance(other, Message) and other._buf is self._buf and other._off == self._off:
            return
        from libmrpc._message_views import fill

        if self._w:
            self._wprep()
        self.Clear()
        fill(self, other)

    def to_pb(self) -> Any:
        """This message as an instance of the official protobuf class (a copy)."""
        from libmrpc._message_views import to_pb

        return to_pb(self)

    @classmethod
    def from_pb(cls, pb: Any, heap: Heap | None = None) -> Any:
        """A new message (new arena on ``heap`` or the default heap) copied from ``pb``."""
        from libmrpc._message_views import fill

        m = cls.new(heap if heap is not None else default_heap())
        fill(m, pb)
        return m

    @classmethod
    def pb_class(cls) -> Any:
        """The official protobuf message class of this type (built from the schema)."""
        return cls._PB.get(cls._FULL_NAME)

    def SerializeToString(self) -> bytes:
        """Protobuf wire encoding (via :meth:`to_pb`; for interop, not the mrpc wire)."""
        return self.to_pb().SerializeToString()

    @classmethod
    def FromString(cls, data: bytes, heap: Heap | None = None) -> Any:
        return cls.from_pb(cls.pb_class().FromString(data), heap)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Message):
            return type(other) is type(self) and self.to_pb() == other.to_pb()
        if hasattr(other, "DESCRIPTOR") and hasattr(other, "ListFields"):
            return self.to_pb() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        from google.protobuf import text_format

        text = text_format.MessageToString(self.to_pb(), as_one_line=True)
        return f"{type(self).__qualname__}({text})"


def link_message(parent: Message, spec: FieldSpec) -> int:
    """Record offset of ``parent``'s sub-message ``spec``, allocating and linking it."""
    buf, off = parent._buf, parent._off
    slot = off + spec.off
    o, n = REF.unpack_from(buf, slot)
    oneof = spec.oneof
    if n and (oneof is None or U32.unpack_from(buf, off + oneof.offset)[0] == spec.number):
        return parent._base + o  # another view linked it meanwhile: share it
    assert spec.cls is not None
    size = spec.cls._SIZE
    rec = parent._owner.alloc(size)
    if oneof is not None:
        set_case(parent, oneof.offset, spec.number, parent._MEMBERS[oneof.name])
    if spec.pmask:
        w = U64.unpack_from(buf, off + spec.pword)[0]
        U64.pack_into(buf, off + spec.pword, w | spec.pmask)
    REF.pack_into(buf, slot, rec - parent._base, size)
    return rec


def copy_message(msg: Message, heap: Heap) -> Any:
    """A deep copy of ``msg`` in a new arena on ``heap`` (e.g. the app's send heap)."""
    from libmrpc._message_views import fill

    m = type(msg).new(heap)
    fill(m, msg)
    return m


class PbFactory:
    """Lazily builds the official protobuf classes of one schema bundle."""

    def __init__(self, fds: bytes) -> None:
        self._fds = fds
        self._pool: Any = None
        self._classes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, full_name: str) -> Any:
        c = self._classes.get(full_name)
        if c is None:
            from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

            with self._lock:
                if self._pool is None:
                    pool = descriptor_pool.DescriptorPool()
                    for f in descriptor_pb2.FileDescriptorSet.FromString(self._fds).file:
                        pool.Add(f)
                    self._pool = pool
                desc = self._pool.FindMessageTypeByName(full_name)
                c = self._classes[full_name] = message_factory.GetMessageClass(desc)
        return c


def finish_classes(classes: dict[str, type[Message]], fds: bytes) -> None:
    """Attach per-field runtime specs to generated classes (called once per module)."""
    pb = PbFactory(fds)
    for cls in classes.values():
        cls._PB = pb
        specs = {f.name: FieldSpec(f, cls, classes) for f in cls._LAYOUT.fields}
        cls._SPECS = specs
        cls._ATTRS = {s.attr: s for s in specs.values()}
        members: dict[str, dict[int, tuple[int, int]]] = {}
        for o in cls._LAYOUT.oneofs:
            members[o.name] = {
                s.number: (s.off, s.st.size if s.kind == Kind.SCALAR else 8)  # type: ignore[union-attr]
                for s in specs.values()
                if s.oneof is o
            }
        cls._MEMBERS = members
    for cls in classes.values():
        for f in cls._LAYOUT.fields:
            if f.kind == Kind.MAP:
                entry = classes[f.type_name]  # type: ignore[index]
                cls._SPECS[f.name].key = entry._SPECS["key"]
                cls._SPECS[f.name].value = entry._SPECS["value"]


def iter_or_raise(v: Any, where: str) -> list[Any]:
    """``list(v)`` for an iterable of values; TypeError for str/bytes/non-iterables."""
    if not isinstance(v, (str, bytes, bytearray, memoryview, dict)):
        try:
            return list(v)
        except TypeError:
            pass
    raise TypeError(f"field {where}: expected an iterable of values, got {type(v).__name__}")
