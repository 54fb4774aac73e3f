"""Repeated-field and map views, and the generic deep-copy / protobuf conversion.

How this works: a repeated field is a reference ``(offset, count)`` to a contiguous
array (packed scalars, refs to blobs, or records). A view object holds the message
and the field's :class:`~libmrpc._message.FieldSpec` and re-reads the reference on
every operation, so views never go stale when another view grows the array.
Growing reallocates with doubling capacity (capacities are remembered by the
arena); element views of repeated *messages* are registered with the arena, which
moves them along when their array moves (protobuf semantics: ``a = r.add();
r.add(); a.x = 1`` changes ``r[0]``). Removed elements keep their old memory and
become detached, again like protobuf. Superseded arrays are reclaimed when the
arena is.

A map is a repeated field of its entry message (key = field 1, value = field 2);
the view builds a ``key -> index`` dict on first lookup and rebuilds it when the
array reference changes. On duplicate keys (from a peer) the last entry wins.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from libmrpc._message import (
    REF,
    U32,
    U64,
    FieldSpec,
    Message,
    as_bytes,
    as_str,
    iter_or_raise,
    put_blob,
    zeros,
)
from libmrpc.wire.layout import Kind

_EMPTY = memoryview(b"").toreadonly()


def _writable(msg: Message) -> None:
    if msg._w:
        msg._wprep()


def reserve(msg: Message, spec: FieldSpec, extra: int) -> tuple[int, int]:
    """Make room for ``extra`` more elements; return (array offset, current count)."""
    buf, slot, es = msg._buf, msg._off + spec.off, spec.es
    o, n = REF.unpack_from(buf, slot)
    arena = msg._owner
    cap = arena.caps.get(o, n * es) if o else 0
    need = (n + extra) * es
    if need <= cap:
        return o, n
    new_cap = max(need, 2 * n * es, 4 * es)
    a = arena.alloc(new_cap)
    if n:
        buf[a : a + n * es] = buf[o : o + n * es]
        if spec.kind in (Kind.REPEATED_MESSAGE, Kind.MAP):
            arena.moved(o, a)
    arena.caps[a] = new_cap
    REF.pack_into(buf, slot, a, n)
    return a, n


class _Repeated:
    __slots__ = ("_msg", "_spec")

    def __init__(self, msg: Message, spec: FieldSpec) -> None:
        self._msg = msg
        self._spec = spec

    def _ref(self) -> tuple[int, int]:
        m = self._msg
        o, n = REF.unpack_from(m._buf, m._off + self._spec.off)
        return m._base + o, n

    def __len__(self) -> int:
        m = self._msg
        return REF.unpack_from(m._buf, m._off + self._spec.off)[1]

    def _index(self, i: int, n: int) -> int:
        i = i.__index__()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self._spec.where}: index {i} out of range for {n} elements")
        return i

    def _get(self, a: int, i: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, i: Any) -> Any:
        a, n = self._ref()
        if isinstance(i, slice):
            return [self._get(a, j) for j in range(*i.indices(n))]
        return self._get(a, self._index(i, n))

    def __iter__(self) -> Iterator[Any]:
        a, n = self._ref()
        return (self._get(a, i) for i in range(n))

    def clear(self) -> None:
        """Remove every element (element views obtained before become detached)."""
        _writable(self._msg)
        REF.pack_into(self._msg._buf, self._msg._off + self._spec.off, 0, 0)

    def _assign(self, values: Any) -> None:
        values = iter_or_raise(values, self._spec.where)
        _writable(self._msg)
        self.clear()
        self.extend(values)

    def extend(self, values: Any) -> None:
        for v in iter_or_raise(values, self._spec.where):
            self.append(v)

    def append(self, v: Any) -> None:
        raise NotImplementedError

    def __delitem__(self, i: int) -> None:
        vals = list(self)
        del vals[i]
        self._assign(vals)

    def pop(self, i: int = -1) -> Any:
        v = self[i]
        if isinstance(v, memoryview):
            v = bytes(v)
        del self[i]
        return v

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (_Repeated, list, tuple)) or (
            hasattr(other, "__len__")
            and hasattr(other, "__getitem__")
            and not isinstance(other, (str, bytes, dict))
        ):
            return list(self) == list(other)  # type: ignore[call-overload]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))


class RepeatedScalar(_Repeated):
    """A packed array of numbers/bools/enums."""

    __slots__ = ()

    def _get(self, a: int, i: int) -> Any:
        s = self._spec
        return s.st.unpack_from(self._msg._buf, a + i * s.es)[0]  # type: ignore[union-attr]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    def tolist(self) -> list[Any]:
        a, n = self._ref()
        return list(struct.unpack_from(f"<{n}{self._spec.fmt}", self._msg._buf, a))

    def __setitem__(self, i: int, v: Any) -> None:
        _writable(self._msg)
        a, n = self._ref()
        s = self._spec
        s.st.pack_into(self._msg._buf, a + self._index(i, n) * s.es, s.check(v))  # type: ignore

    def append(self, v: Any) -> None:
        self.extend((v,))

    def extend(self, values: Any) -> None:
        s = self._spec
        values = iter_or_raise(values, s.where)
        if not values:
            return
        try:
            if s.fmt in "?f":
                raise struct.error
            data = struct.pack(f"<{len(values)}{s.fmt}", *values)
            if any(v.__class__ is bool for v in values):
                raise struct.error
        except (struct.error, OverflowError, TypeError):
            data = struct.pack(f"<{len(values)}{s.fmt}", *map(s.check, values))  # type: ignore
        m = self._msg
        _writable(m)
        a, n = reserve(m, s, len(values))
        m._buf[a + n * s.es : a + n * s.es + len(data)] = data
        REF.pack_into(m._buf, m._off + s.off, a, n + len(values))


class RepeatedBlob(_Repeated):
    """An array of refs to strings (``str``) or bytes (zero-copy ``memoryview``)."""

    __slots__ = ()

    def _get(self, a: int, i: int) -> Any:
        m = self._msg
        o, n = REF.unpack_from(m._buf, a + 8 * i)
        if self._spec.kind == Kind.REPEATED_STRING:
            return str(m._buf[m._base + o : m._base + o + n], "utf-8") if n else ""
        return m._buf[m._base + o : m._base + o + n] if n else _EMPTY

    def _encode(self, v: Any) -> Any:
        if self._spec.kind == Kind.REPEATED_STRING:
            return (v if v.__class__ is str else as_str(v, self._spec.where)).encode()
        return as_bytes(v, self._spec.where)

    def __setitem__(self, i: int, v: Any) -> None:
        _writable(self._msg)
        data = self._encode(v)
        a, n = self._ref()
        put_blob(self._msg, a + 8 * self._index(i, n) - self._msg._off, data)

    def append(self, v: Any) -> None:
        data = self._encode(v)
        m = self._msg
        _writable(m)
        a, n = reserve(m, self._spec, 1)
        put_blob(m, a + 8 * n - m._off, data)
        REF.pack_into(m._buf, m._off + self._spec.off, a, n + 1)


def _to_pbish(v: Any) -> Any:
    return v.to_pb() if isinstance(v, Message) else v


class RepeatedMessage(_Repeated):
    """A contiguous array of records; elements are message views."""

    __slots__ = ()

    def _get(self, a: int, i: int) -> Any:
        m, s = self._msg, self._spec
        v = s.cls._view(m._buf, m._base, a + i * s.es, m._owner, m._w & 1)  # type: ignore
        if m._w == 0:
            m._owner.track(a, v)
        return v

    def add(self, **fields: Any) -> Any:
        """Append a new element and return it (fields set from keyword arguments)."""
        m, s = self._msg, self._spec
        _writable(m)
        a, n = reserve(m, s, 1)
        pos = a + n * s.es
        m._buf[pos : pos + s.es] = zeros(s.es)
        REF.pack_into(m._buf, m._off + s.off, a, n + 1)
        v = self._get(a, n)
        if fields:
            v._init_fields(fields)
        return v

    def append(self, value: Any) -> None:
        """Append a deep copy of ``value`` (a message, protobuf message or dict)."""
        fill(self.add(), value)

    def __delitem__(self, i: int) -> None:
        m, s = self._msg, self._spec
        _writable(m)
        a, n = self._ref()
        i = self._index(i, n)
        es, buf = s.es, m._buf
        new = m._owner.alloc(max(n - 1, 1) * es) if n > 1 else 0
        if n > 1:
            buf[new : new + i * es] = buf[a : a + i * es]
            buf[new + i * es : new + (n - 1) * es] = buf[a + (i + 1) * es : a + n * es]
            m._owner.caps[new] = (n - 1) * es
        m._owner.moved(a, new, i, es)
        REF.pack_into(buf, m._off + s.off, new, n - 1)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (str, bytes, dict)) or not hasattr(other, "__iter__"):
            return NotImplemented
        mine = [x.to_pb() for x in self]
        return mine == [_to_pbish(x) for x in other]


class MapView:
    """A dict-like view of a map field (entries are records of the entry message)."""

    __slots__ = ("_idx", "_msg", "_spec", "_ver")

    def __init__(self, msg: Message, spec: FieldSpec) -> None:
        self._msg, self._spec = msg, spec
        self._idx: dict[Any, int] = {}
        self._ver: tuple[int, int] | None = None

    def _entry(self, a: int, i: int) -> Any:
        m, s = self._msg, self._spec
        return s.cls._view(m._buf, m._base, a + i * s.es, m._owner, m._w & 1)  # type: ignore

    def _index(self) -> tuple[int, dict[Any, int]]:
        m = self._msg
        o, n = REF.unpack_from(m._buf, m._off + self._spec.off)
        a = m._base + o
        if self._ver != (a, n):
            self._idx = {self._entry(a, i).key: i for i in range(n)}
            self._ver = (a, n)
        return a, self._idx

    def _check_key(self, k: Any) -> Any:
        ks = self._spec.key
        assert ks is not None
        if ks.kind == Kind.STRING:
            return k if k.__class__ is str else as_str(k, ks.where)
        return ks.check(k)  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._index()[1])

    def __contains__(self, k: object) -> bool:
        return k in self._index()[1]

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._index()[1]))

    def keys(self) -> list[Any]:
        return list(self._index()[1])

    def values(self) -> list[Any]:
        a, idx = self._index()
        return [self._entry(a, i).value for i in idx.values()]

    def items(self) -> list[tuple[Any, Any]]:
        a, idx = self._index()
        return [(k, self._entry(a, i).value) for k, i in idx.items()]

    def get(self, k: Any, default: Any = None) -> Any:
        a, idx = self._index()
        i = idx.get(k)
        return default if i is None else self._entry(a, i).value

    def __getitem__(self, k: Any) -> Any:
        a, idx = self._index()
        i = idx.get(k)
        if i is not None:
            return self._entry(a, i).value
        vs = self._spec.value
        assert vs is not None
        if self._msg._w == 1:
            if vs.kind == Kind.MESSAGE:
                return vs.cls._lazy(self._msg, vs)  # type: ignore[union-attr]
            return _default(vs)
        return self._insert(self._check_key(k)).value  # protobuf: inserts the default

    def _insert(self, k: Any) -> Any:
        m, s = self._msg, self._spec
        _writable(m)
        a, n = reserve(m, s, 1)
        pos = a + n * s.es
        m._buf[pos : pos + s.es] = zeros(s.es)
        REF.pack_into(m._buf, m._off + s.off, a, n + 1)
        e = self._entry(a, n)
        e.key = k
        if s.value.kind == Kind.MESSAGE:  # type: ignore[union-attr]
            e.value.SetInParent()  # message values are always present
        return e

    def __setitem__(self, k: Any, v: Any) -> None:
        k = self._check_key(k)
        a, idx = self._index()
        i = idx.get(k)
        e = self._insert(k) if i is None else self._entry(a, i)
        if self._spec.value.kind == Kind.MESSAGE:  # type: ignore[union-attr]
            e.value.CopyFrom(v)
        else:
            e.value = v

    def __delitem__(self, k: Any) -> None:
        items = [(kk, _plain(v)) for kk, v in self.items() if kk != k]
        if len(items) == len(self):
            raise KeyError(k)
        self._assign(dict(items))

    def clear(self) -> None:
        _writable(self._msg)
        REF.pack_into(self._msg._buf, self._msg._off + self._spec.off, 0, 0)

    def _assign(self, mapping: Any) -> None:
        if not hasattr(mapping, "items"):
            raise TypeError(
                f"field {self._spec.where}: expected a mapping, got {type(mapping).__name__}"
            )
        items = list(mapping.items())
        self.clear()
        for k, v in items:
            self[k] = v

    def update(self, mapping: Any) -> None:
        for k, v in dict(mapping).items():
            self[k] = v

    def __eq__(self, other: object) -> bool:
        if not hasattr(other, "items"):
            return NotImplemented
        return {k: _plainpb(v) for k, v in self.items()} == {
            k: _plainpb(v) for k, v in other.items()
        }

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr({k: _plain(v) for k, v in self.items()})


def _plain(v: Any) -> Any:
    return bytes(v) if isinstance(v, memoryview) else v


def _plainpb(v: Any) -> Any:
    return v.to_pb() if isinstance(v, Message) else _plain(v)


def _default(s: FieldSpec) -> Any:
    if s.kind == Kind.STRING:
        return ""
    if s.kind == Kind.BYTES:
        return _EMPTY
    return {"?": False, "f": 0.0, "d": 0.0}.get(s.fmt, 0)


# --- generic copy and conversion ----------------------------------------------------


def set_message(msg: Message, spec: FieldSpec, value: Any) -> None:
    """Setter of a singular message field: deep-copy ``value`` into the field."""
    if value is None:
        raise TypeError(f"field {spec.where}: use ClearField() to unset a message field")
    _writable(msg)
    getattr(msg, spec.attr).CopyFrom(value)


def present_items(src: Any, cls: type[Message]) -> list[tuple[FieldSpec, Any]]:
    """(spec, value) of the fields of ``src`` that are set (message, pb or dict)."""
    if isinstance(src, Message):
        if type(src) is not cls:
            raise TypeError(f"expected {cls._FULL_NAME}, got {type(src)._FULL_NAME}")
        return [(s, getattr(src, s.attr)) for s in cls._SPECS.values() if _is_set(src, s)]
    if isinstance(src, dict):
        out = []
        for k, v in src.items():
            s = cls._ATTRS.get(k) or cls._SPECS.get(k)
            if s is None:
                raise ValueError(f'Protocol message {cls._FULL_NAME} has no "{k}" field.')
            out.append((s, v))
        return out
    desc = getattr(src, "DESCRIPTOR", None)
    if desc is None or desc.full_name != cls._FULL_NAME:
        raise TypeError(
            f"expected {cls._FULL_NAME} (message, protobuf message or dict), "
            f"got {type(src).__name__}"
        )
    return [(cls._SPECS[fd.name], v) for fd, v in src.ListFields()]


def _is_set(m: Message, s: FieldSpec) -> bool:
    buf, off = m._buf, m._off
    if s.oneof is not None:
        return U32.unpack_from(buf, off + s.oneof.offset)[0] == s.number
    if s.pmask:
        return bool(U64.unpack_from(buf, off + s.pword)[0] & s.pmask)
    if s.kind == Kind.SCALAR:
        return any(buf[off + s.off : off + s.off + s.st.size])  # type: ignore[union-attr]
    return REF.unpack_from(buf, off + s.off)[1] != 0


def fill(dst: Message, src: Any) -> None:
    """Set every field that is set in ``src`` on the (empty) message ``dst``."""
    items = present_items(src, type(dst))
    dst.SetInParent()
    for s, v in items:
        kind = s.kind
        if kind == Kind.MESSAGE:
            fill(getattr(dst, s.attr), v)
        elif kind == Kind.REPEATED_MESSAGE:
            rep = getattr(dst, s.attr)
            for x in v:
                fill(rep.add(), x)
        elif kind == Kind.MAP:
            mp = getattr(dst, s.attr)
            msg_values = s.value.kind == Kind.MESSAGE  # type: ignore[union-attr]
            for k, x in v.items():
                if msg_values:
                    fill(mp[k], x)
                else:
                    mp[k] = x
        else:
            setattr(dst, s.attr, v)


def to_pb(msg: Message, pb: Any = None) -> Any:
    """Fill (or create) the official protobuf message from ``msg``."""
    if pb is None:
        pb = msg.pb_class()()
    for s in msg._SPECS.values():
        if not _is_set(msg, s):
            continue
        v = getattr(msg, s.attr)
        kind = s.kind
        if kind == Kind.MESSAGE:
            sub = getattr(pb, s.name)
            sub.SetInParent()
            to_pb(v, sub)
        elif kind == Kind.BYTES:
            setattr(pb, s.name, bytes(v))
        elif kind in (Kind.SCALAR, Kind.STRING):
            setattr(pb, s.name, v)
        elif kind == Kind.REPEATED_BYTES:
            getattr(pb, s.name).extend([bytes(x) for x in v])
        elif kind in (Kind.REPEATED_SCALAR, Kind.REPEATED_STRING):
            getattr(pb, s.name).extend(list(v))
        elif kind == Kind.REPEATED_MESSAGE:
            rc = getattr(pb, s.name)
            for x in v:
                to_pb(x, rc.add())
        else:
            mc = getattr(pb, s.name)
            for k, x in v.items():
                if isinstance(x, Message):
                    to_pb(x, mc[k])
                else:
                    mc[k] = _plain(x)
    return pb
