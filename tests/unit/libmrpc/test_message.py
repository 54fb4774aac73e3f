"""Generated message classes: field access, presence, containers, read-only views, arenas."""

from __future__ import annotations

import gc
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from libmrpc import _message as rt
from libmrpc._heap import Heap
from libmrpc.loader import load_proto

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"


@pytest.fixture(scope="module")
def mod() -> ModuleType:
    return load_proto(SCHEMAS / "alltypes.proto")


@pytest.fixture
def heap() -> Heap:
    return Heap.private(1 << 20, name="test heap")


def received(msg: Any) -> Any:
    """A read-only view of ``msg`` as a receiver sees it (marshal, validate, land)."""
    mod = type(msg)
    name = mod._FULL_NAME
    module = __import__(mod.__module__, fromlist=["MARSHAL"])
    head, segs = module.MARSHAL[name](msg._owner.buf, msg._off, 32, 1 << 24)
    img = bytes(head) + b"".join(bytes(s) for s in segs)
    module.VALIDATE[name](memoryview(img))
    buf = bytearray(24) + img
    return mod._from_image(memoryview(buf), 24, rt.ReadOnlyOwner(buf))


INT_FIELDS = [
    ("f_int32", -(1 << 31), (1 << 31) - 1),
    ("f_sint32", -(1 << 31), (1 << 31) - 1),
    ("f_sfixed32", -(1 << 31), (1 << 31) - 1),
    ("f_uint32", 0, (1 << 32) - 1),
    ("f_fixed32", 0, (1 << 32) - 1),
    ("f_int64", -(1 << 63), (1 << 63) - 1),
    ("f_sint64", -(1 << 63), (1 << 63) - 1),
    ("f_sfixed64", -(1 << 63), (1 << 63) - 1),
    ("f_uint64", 0, (1 << 64) - 1),
    ("f_fixed64", 0, (1 << 64) - 1),
    ("f_enum", -(1 << 31), (1 << 31) - 1),
]


@pytest.mark.parametrize(("name", "lo", "hi"), INT_FIELDS)
def test_integer_fields(mod: ModuleType, name: str, lo: int, hi: int) -> None:
    s = mod.Scalars()
    assert getattr(s, name) == 0
    for v in (lo, hi, 1):
        setattr(s, name, v)
        assert getattr(s, name) == v
    with pytest.raises(ValueError, match="out of range"):
        setattr(s, name, hi + 1)
    with pytest.raises(ValueError, match="out of range"):
        setattr(s, name, lo - 1)
    for bad in (1.0, "1", True, None):
        with pytest.raises(TypeError):
            setattr(s, name, bad)
    assert getattr(s, name) == 1
    assert getattr(s.to_pb(), name) == 1


def test_float_double_bool(mod: ModuleType) -> None:
    s = mod.Scalars()
    assert (s.f_double, s.f_float, s.f_bool) == (0.0, 0.0, False)
    s.f_double, s.f_float, s.f_bool = 1.5, 3, True
    assert (s.f_double, s.f_float, s.f_bool) == (1.5, 3.0, True)
    s.f_float = 0.1
    assert s.f_float == pytest.approx(0.1) and s.f_float != 0.1  # stored as float32
    s.f_float = 1e40  # like protobuf: too large for float32 -> inf
    assert s.f_float == math.inf
    s.f_bool = 0
    assert s.f_bool is False
    for name, bad in (("f_double", "x"), ("f_float", b"1"), ("f_bool", 1.0), ("f_bool", "x")):
        with pytest.raises(TypeError):
            setattr(s, name, bad)


def test_string_and_bytes(mod: ModuleType) -> None:
    s = mod.Scalars()
    assert s.f_string == "" and bytes(s.f_bytes) == b""
    s.f_string = "héllo"
    s.f_bytes = b"\x00\x01"
    assert s.f_string == "héllo"
    b = s.f_bytes
    assert isinstance(b, memoryview) and b == b"\x00\x01"
    assert b.obj is s._owner.buf.obj  # zero-copy: a view of the heap itself
    s.f_bytes = bytearray(b"ab")
    assert s.f_bytes == b"ab"
    s.f_bytes = memoryview(b"abcd")[1:3]
    assert s.f_bytes == b"bc"
    s.f_string = b"bytes ok"  # like protobuf: UTF-8 bytes are accepted for strings
    assert s.f_string == "bytes ok"
    with pytest.raises(TypeError):
        s.f_bytes = "text"
    with pytest.raises(TypeError):
        s.f_string = 5
    with pytest.raises(ValueError):
        s.f_string = b"\xff"
    s.f_string = ""
    assert s.f_string == ""


def test_keyword_field(mod: ModuleType) -> None:
    a = mod.AllTypes(class_="c")
    assert a.class_ == "c"
    assert getattr(a.to_pb(), "class") == "c"
    assert mod.AllTypes.from_pb(a.to_pb()).class_ == "c"


def test_lazy_nested_presence(mod: ModuleType) -> None:
    a = mod.AllTypes()
    assert a.inner.a == 0 and a.inner.s == "" and list(a.inner.nums) == []
    assert not a.HasField("inner")  # reading does not set presence
    assert a.tree.parent_hint.parent_hint.label == ""
    assert not a.HasField("tree")
    a.tree.parent_hint.parent_hint.label = "deep"  # a write links the whole chain
    assert a.HasField("tree") and a.tree.HasField("parent_hint")
    assert a.tree.parent_hint.parent_hint.label == "deep"
    x, y = a.inner, a.inner  # two lazy views of one field end up sharing a record
    x.a = 1
    y.s = "s"
    assert (a.inner.a, a.inner.s) == (1, "s")
    a.scalars.SetInParent()
    assert a.HasField("scalars") and a.to_pb().HasField("scalars")
    a.inner.nums.append(5)  # a container write through a lazy view links it too
    assert list(a.inner.nums) == [5]
    b = mod.AllTypes()
    b.o_inner.nums.extend([1, 2])
    assert b.HasField("o_inner")


def test_message_assignment_copies(mod: ModuleType) -> None:
    a = mod.AllTypes()
    inner = mod.AllTypes.Inner(a=3, s="x", nums=[1, 2])
    a.inner = inner
    inner.a = 99  # a copy, not an alias
    assert a.inner.a == 3 and list(a.inner.nums) == [1, 2]
    a.inner = {"s": "from dict"}
    assert a.inner.a == 0 and a.inner.s == "from dict"
    a.inner = inner.to_pb()
    assert a.inner.a == 99
    b = mod.AllTypes()
    b.CopyFrom(a)
    assert b == a and b.inner.a == 99
    with pytest.raises(TypeError):
        a.inner = mod.Node()
    with pytest.raises(TypeError):
        a.inner = None


def test_constructor_kwargs(mod: ModuleType) -> None:
    a = mod.AllTypes(
        inner={"a": 1, "nums": [1]},
        r_inner=[{"a": 2}, mod.AllTypes.Inner(a=3)],
        m_str_msg={"k": {"s": "v"}},
        r_string=["a", "b"],
        mode=mod.AllTypes.SAFE,
    )
    assert a.inner.a == 1 and [x.a for x in a.r_inner] == [2, 3]
    assert a.m_str_msg["k"].s == "v" and list(a.r_string) == ["a", "b"]
    assert a.mode == mod.AllTypes.Mode.SAFE == 2
    with pytest.raises(ValueError, match='no "nope" field'):
        mod.AllTypes(nope=1)
    with pytest.raises(ValueError):
        mod.AllTypes(_buf=1)


def test_repeated_scalars(mod: ModuleType) -> None:
    a = mod.AllTypes()
    r = a.r_int32
    assert len(r) == 0 and list(r) == [] and r == []
    r.append(1)
    r.extend([2, 3])
    for i in range(100):  # growth keeps earlier values
        r.append(i)
    assert len(r) == 103 and r[0] == 1 and r[-1] == 99 and r[2] == 3
    assert r[1:3] == [2, 3]
    r[0] = -5
    assert a.r_int32[0] == -5
    with pytest.raises(IndexError):
        r[103]
    with pytest.raises(ValueError):
        r.append(1 << 40)
    with pytest.raises(TypeError):
        r.append(1.5)
    with pytest.raises(TypeError):
        r.extend(5)
    del r[0]
    assert r[0] == 2 and len(r) == 102
    assert r.pop() == 99
    a.r_int32 = [7, 8]  # assignment replaces
    assert a.r_int32 == [7, 8] and a.r_int32 == (7, 8)
    a.r_bool = [True, 0, 1]
    assert list(a.r_bool) == [True, False, True]
    a.r_float = [1.5, 1e40]
    assert list(a.r_float) == [1.5, math.inf]
    a.r_uint64 = [(1 << 64) - 1]
    assert a.r_uint64[0] == (1 << 64) - 1
    with pytest.raises(ValueError):
        a.r_uint32 = [-1]
    a.r_enum.append(mod.BLUE)
    assert a.r_enum == [-3]
    a.r_int32.clear()
    assert len(a.r_int32) == 0


def test_repeated_strings_and_bytes(mod: ModuleType) -> None:
    a = mod.AllTypes(r_string=["x", "", "ü"], r_bytes=[b"a", bytearray(b"bc")])
    assert list(a.r_string) == ["x", "", "ü"]
    assert [bytes(b) for b in a.r_bytes] == [b"a", b"bc"]
    a.r_string.append("y")
    a.r_string[0] = "z"
    assert a.r_string == ["z", "", "ü", "y"]
    assert a.r_bytes == [b"a", b"bc"]
    with pytest.raises(TypeError):
        a.r_bytes.append("str")
    with pytest.raises(TypeError):
        a.r_string = "abc"  # a str is not a list of strings


def test_repeated_messages_keep_views_across_growth(mod: ModuleType) -> None:
    a = mod.AllTypes()
    first = a.r_inner.add(a=1)
    views = [a.r_inner.add(a=i) for i in range(2, 40)]  # several reallocations
    first.s = "still attached"
    views[0].nums.append(7)
    assert a.r_inner[0].s == "still attached" and a.r_inner[1].nums == [7]
    assert [x.a for x in a.r_inner] == list(range(1, 40))
    a.r_inner.append(mod.AllTypes.Inner(a=100))
    a.r_inner.append({"a": 101})
    assert a.r_inner[-1].a == 101 and len(a.r_inner) == 41
    removed = a.r_inner[1]
    later = a.r_inner[2]
    del a.r_inner[1]
    assert removed.a == 2  # detached, still readable
    assert later.a == 3 and a.r_inner[1].a == 3
    later.a = 33
    assert a.r_inner[1].a == 33
    assert a.r_inner == [x.to_pb() for x in a.r_inner]
    a.r_inner = [{"a": 5}]
    assert len(a.r_inner) == 1 and a.r_inner[0].a == 5


def test_recursive_tree(mod: ModuleType) -> None:
    root = mod.Node(label="root")
    child = root.children.add(label="c")
    child.children.add(label="gc", weight=3)
    root.children.add(label="c2")
    assert root.children[0].children[0].weight == 3
    pb = root.to_pb()
    assert pb.children[0].children[0].label == "gc" and len(pb.children) == 2
    assert mod.Node.from_pb(pb) == root


def test_maps(mod: ModuleType) -> None:
    a = mod.AllTypes()
    m = a.m_str_int
    assert len(m) == 0 and "x" not in m and m.get("x") is None and m.get("x", 5) == 5
    m["x"] = 1
    m["y"] = 2
    m["x"] = 3
    assert len(m) == 2 and m["x"] == 3 and "y" in m and sorted(m) == ["x", "y"]
    assert dict(m.items()) == {"x": 3, "y": 2} and sorted(m.values()) == [2, 3]
    assert m == {"x": 3, "y": 2} and sorted(m.keys()) == ["x", "y"]
    other = a.m_str_int  # a second view sees writes made through the first
    m["z"] = 0
    assert other["z"] == 0 and len(other) == 3
    assert m["missing"] == 0 and "missing" in m  # protobuf: reading inserts the default
    del m["missing"]
    assert "missing" not in m
    with pytest.raises(KeyError):
        del m["missing"]
    with pytest.raises(TypeError):
        m[1] = 1
    with pytest.raises(ValueError):
        m["big"] = 1 << 40
    a.m_int_str[-5] = "neg"
    a.m_uint_bytes[7] = b"\x00"
    a.m_bool_double[True] = 0.5
    a.m_sint_enum[-1] = mod.GREEN
    assert a.m_int_str[-5] == "neg" and a.m_uint_bytes[7] == b"\x00"
    assert a.m_bool_double[True] == 0.5 and a.m_sint_enum[-1] == 2
    with pytest.raises(ValueError):
        a.m_uint_bytes[-1] = b""
    a.m_str_msg["k"].a = 5  # a message-valued map creates the entry on access
    a.m_str_msg["k"].nums.append(1)
    assert a.m_str_msg["k"].a == 5 and a.m_str_msg["k"].nums == [1]
    a.m_str_msg["j"] = {"s": "copied"}
    assert a.m_str_msg["j"].s == "copied"
    a.m_str_int = {"only": 1}
    assert a.m_str_int == {"only": 1}
    pb = a.to_pb()
    assert dict(pb.m_str_int) == {"only": 1} and pb.m_str_msg["k"].a == 5
    assert mod.AllTypes.from_pb(pb) == pb


def test_oneofs(mod: ModuleType) -> None:
    a = mod.AllTypes()
    assert a.WhichOneof("choice") is None and not a.HasField("choice")
    a.c_int = 0
    assert a.WhichOneof("choice") == "c_int" and a.HasField("c_int") and a.HasField("choice")
    a.c_string = "s"
    assert a.WhichOneof("choice") == "c_string" and a.c_int == 0 and not a.HasField("c_int")
    assert a.c_inner.a == 0 and a.WhichOneof("choice") == "c_string"  # reading: no switch
    a.c_inner.a = 4
    assert a.WhichOneof("choice") == "c_inner" and a.c_string == ""
    a.c_bytes = b"b"
    assert a.WhichOneof("choice") == "c_bytes" and not a.HasField("c_inner")
    assert a.c_inner.a == 0
    a.x_flag = True
    assert (a.WhichOneof("choice"), a.WhichOneof("other")) == ("c_bytes", "x_flag")
    a.x_float = 2.5
    assert a.x_flag is False and a.WhichOneof("other") == "x_float"
    a.ClearField("choice")
    assert a.WhichOneof("choice") is None and a.c_bytes == b""
    a.c_string = "again"
    a.ClearField("c_string")
    assert a.WhichOneof("choice") is None
    pb = a.to_pb()
    assert pb.WhichOneof("other") == "x_float" and pb.WhichOneof("choice") is None
    with pytest.raises(ValueError):
        a.WhichOneof("nope")


def test_optional_presence_and_clear(mod: ModuleType) -> None:
    a = mod.AllTypes()
    for name in ("o_int32", "o_string", "o_bytes", "o_inner", "o_bool", "o_double"):
        assert not a.HasField(name)
    a.o_int32 = 0
    a.o_string = ""
    a.o_bool = False
    a.o_double = 0.0
    a.o_bytes = b""
    assert all(a.HasField(n) for n in ("o_int32", "o_string", "o_bool", "o_double", "o_bytes"))
    pb = a.to_pb()
    assert pb.HasField("o_int32") and pb.HasField("o_string") and not pb.HasField("o_inner")
    a.o_int32 = 5
    a.ClearField("o_int32")
    assert not a.HasField("o_int32") and a.o_int32 == 0
    a.inner.a = 1
    a.ClearField("inner")
    assert not a.HasField("inner") and a.inner.a == 0
    a.r_int32 = [1]
    a.ClearField("r_int32")
    assert len(a.r_int32) == 0
    with pytest.raises(ValueError, match="presence"):
        a.HasField("payload")
    with pytest.raises(ValueError):
        a.HasField("nope")
    with pytest.raises(ValueError):
        a.ClearField("nope")
    a.payload = b"x"
    a.Clear()
    assert a == mod.AllTypes()


def full_message(mod: ModuleType) -> Any:
    a = mod.AllTypes(
        scalars={
            "f_double": 1.5,
            "f_int64": -2,
            "f_string": "s",
            "f_bytes": b"b" * 100,
            "f_bool": True,
            "f_enum": mod.BLUE,
        },
        inner={"a": 1, "s": "in", "nums": [1, 2]},
        mode=mod.AllTypes.FAST,
        r_double=[0.5],
        r_int32=[1, -1],
        r_string=["a", "b" * 50],
        r_bytes=[b"x", b"y" * 64],
        r_inner=[{"a": 9}],
        m_str_int={"k": 1},
        m_int_str={3: "three"},
        m_str_msg={"m": {"s": "v"}},
        m_bool_double={False: 2.0},
        o_int32=0,
        o_inner={},
        c_inner={"a": 2},
        x_flag=True,
        class_="kw",
        payload=b"p" * 200,
    )
    a.tree.label = "root"
    a.tree.children.add(label="leaf").parent_hint.label = "hint"
    return a


def test_read_only_received_view(mod: ModuleType) -> None:
    a = full_message(mod)
    v = received(a)
    assert v == a and v.to_pb() == a.to_pb()
    assert v._heap is None and v.scalars.f_bytes == b"b" * 100
    assert v.scalars.f_bytes.readonly
    assert v.WhichOneof("choice") == "c_inner" and v.c_inner.a == 2
    assert v.m_str_msg["m"].s == "v" and v.m_int_str[3] == "three"
    assert v.tree.children[0].parent_hint.label == "hint"
    assert not v.HasField("scalars") is False
    assert v.o_inner.a == 0 and v.HasField("o_inner")
    assert v.c_string == "" and v.m_str_int.get("nope") is None and v.m_str_msg["no"].a == 0
    assert "no" not in v.m_str_msg  # read-only lookups never insert
    for action in (
        lambda: setattr(v, "payload", b"x"),
        lambda: setattr(v.scalars, "f_int32", 1),
        lambda: v.r_int32.append(1),
        lambda: v.r_inner.add(),
        lambda: v.m_str_int.__setitem__("a", 1),
        lambda: v.inner.__setattr__("a", 1),
        lambda: v.ClearField("inner"),
        lambda: v.Clear(),
        lambda: setattr(v.r_inner[0], "a", 1),
        lambda: setattr(
            v.parent_hint if hasattr(v, "parent_hint") else v.tree.parent_hint, "label", "x"
        ),
    ):
        with pytest.raises(TypeError, match="read-only"):
            action()
    copy = rt.copy_message(v, Heap.private(1 << 20))
    copy.payload = b"writable now"
    assert copy.payload == b"writable now" and copy.inner == v.inner


def test_arena_frees_all_blocks(mod: ModuleType, heap: Heap) -> None:
    start = heap.statistics().used
    a = full_message(mod)
    b = mod.AllTypes.from_pb(a.to_pb(), heap)
    for i in range(50):
        b.r_inner.add(a=i, s="x" * i)
        b.r_bytes.append(b"y" * (i * 40))
    assert heap.statistics().used > start
    keep = b.r_inner[-1]
    del b
    gc.collect()
    assert heap.statistics().used > start  # a surviving element view keeps the arena
    assert keep.a == 49 and keep.s == "x" * 49
    del keep
    gc.collect()
    assert heap.statistics().used == start
    heap.closed = True  # a finalizer after the heap closed must not touch it
    c = mod.Node.new(heap, label="x")
    del c
    gc.collect()


def test_default_heap(mod: ModuleType, heap: Heap) -> None:
    assert rt.default_heap() is rt.default_heap()
    rt.set_default_heap(heap)
    try:
        m = mod.Node(label="on my heap")
        assert m._heap is heap and rt.default_heap() is heap
    finally:
        rt.set_default_heap(None)
    assert rt.default_heap() is not heap
    assert mod.Node()._heap is rt.default_heap()


def test_heap_exhaustion_is_memory_error(mod: ModuleType) -> None:
    small = Heap.private(4096)
    m = mod.Node.new(small)
    with pytest.raises(MemoryError):
        m.label = "x" * 10_000


def test_eq_repr_and_serialization(mod: ModuleType) -> None:
    a = mod.AllTypes.Inner(a=1, s="x")
    b = mod.AllTypes.Inner(a=1, s="x")
    assert a == b and a != mod.AllTypes.Inner() and a == a.to_pb()
    assert a != mod.Node() and (a == 5) is False
    assert repr(a) == 'AllTypes.Inner(a: 1 s: "x")'
    assert mod.AllTypes.Inner.FromString(a.SerializeToString()) == a
    assert mod.AllTypes.Inner.pb_class().DESCRIPTOR.full_name == "alltypes.AllTypes.Inner"
    with pytest.raises(TypeError):
        hash(a)


def test_copy_message_between_heaps(mod: ModuleType, heap: Heap) -> None:
    a = full_message(mod)
    c = rt.copy_message(a, heap)
    assert c == a and c._heap is heap and c._owner is not a._owner
    c.inner.a = 77
    assert a.inner.a == 1
