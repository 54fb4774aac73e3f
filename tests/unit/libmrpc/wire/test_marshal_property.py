"""Property tests: pb → heap → MARSHAL → VALIDATE → land → pb is the identity,
and MARSHAL/VALIDATE raise nothing but WireError on garbage."""

from __future__ import annotations

import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libmrpc._heap import Heap
from libmrpc._message import ReadOnlyOwner
from libmrpc.loader import load_proto
from libmrpc.wire.errors import WireError

SCHEMAS = Path(__file__).resolve().parents[4] / "schemas"
MOD: ModuleType = load_proto(SCHEMAS / "alltypes.proto")
ZC = 48  # zero_copy_min: blobs of at least this many bytes become segments
HEAP = Heap.private(8 << 20, name="property heap")
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

_F = FieldDescriptor
INT_RANGES = {
    _F.TYPE_INT32: 32,
    _F.TYPE_SINT32: 32,
    _F.TYPE_SFIXED32: 32,
    _F.TYPE_ENUM: 32,
    _F.TYPE_INT64: 64,
    _F.TYPE_SINT64: 64,
    _F.TYPE_SFIXED64: 64,
}
UINT_RANGES = {_F.TYPE_UINT32: 32, _F.TYPE_FIXED32: 32, _F.TYPE_UINT64: 64, _F.TYPE_FIXED64: 64}


def scalar_strategy(fd: Any) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == _F.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        return st.sampled_from(known) | st.integers(-(1 << 31), (1 << 31) - 1)
    if t in INT_RANGES:
        b = INT_RANGES[t]
        return st.integers(-(1 << (b - 1)), (1 << (b - 1)) - 1)
    if t in UINT_RANGES:
        return st.integers(0, (1 << UINT_RANGES[t]) - 1)
    if t == _F.TYPE_BOOL:
        return st.booleans()
    if t == _F.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=False)
    if t == _F.TYPE_DOUBLE:
        return st.floats(allow_nan=False)
    if t == _F.TYPE_STRING:
        return st.text(max_size=12) | st.text(min_size=ZC, max_size=ZC + 40)
    if t == _F.TYPE_BYTES:
        return st.binary(max_size=ZC - 1) | st.binary(min_size=ZC, max_size=3 * ZC)
    raise AssertionError(f"unhandled type {t}")


def message_strategy(desc: Any, depth: int) -> st.SearchStrategy[Any]:
    """Random instances of the official pb class of ``desc``; recursion bounded by depth."""
    cls = MOD.MESSAGES[desc.full_name].pb_class()
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for fd in desc.fields:
        is_msg = fd.type == _F.TYPE_MESSAGE
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            k, v = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            if v.type == _F.TYPE_MESSAGE:
                if depth <= 0:
                    continue
                vs = message_strategy(v.message_type, depth - 1)
            else:
                vs = scalar_strategy(v)
            optional[fd.name] = st.dictionaries(scalar_strategy(k), vs, max_size=3)
            continue
        if is_msg:
            if depth <= 0:
                continue
            elem = message_strategy(fd.message_type, depth - 1)
        else:
            elem = scalar_strategy(fd)
        if fd.is_repeated:
            optional[fd.name] = st.lists(elem, max_size=3 if is_msg else 5)
        else:
            optional[fd.name] = elem

    def build(kw: dict[str, Any]) -> Any:
        pb = cls()
        for name, value in kw.items():
            fd = desc.fields_by_name[name]
            target = getattr(pb, name) if fd.type == _F.TYPE_MESSAGE or fd.is_repeated else None
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                for k, v in value.items():
                    if hasattr(v, "DESCRIPTOR"):
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif fd.is_repeated:
                if fd.type == _F.TYPE_MESSAGE:
                    for v in value:
                        target.add().CopyFrom(v)
                else:
                    target.extend(value)
            elif fd.type == _F.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(pb, name, value)
        return pb

    return st.fixed_dictionaries({}, optional=optional).map(build)  # type: ignore[arg-type]


ALLTYPES = MOD.AllTypes.pb_class().DESCRIPTOR
NODE = MOD.Node.pb_class().DESCRIPTOR


def roundtrip(pb: Any, base: int) -> None:
    name = pb.DESCRIPTOR.full_name
    cls = MOD.MESSAGES[name]
    used = HEAP.statistics().used
    msg = cls.from_pb(pb, HEAP)
    assert msg == pb
    head, segs = MOD.MARSHAL[name](HEAP.buf, msg._off, ZC, 1 << 24)
    assert len(head) % 8 == 0
    assert all(len(s) >= ZC for s in segs)
    img = bytes(head) + b"".join(segs)
    MOD.VALIDATE[name](memoryview(img))
    recv = bytearray(base + len(img) + 16)
    recv[base : base + len(img)] = img
    view = cls._from_image(memoryview(recv), base, ReadOnlyOwner(recv))
    assert view.to_pb() == pb
    del msg, view
    assert HEAP.statistics().used == used


@SETTINGS
@given(pb=message_strategy(ALLTYPES, depth=2), base=st.sampled_from([8, 24, 4096 + 8, 13]))
def test_alltypes_roundtrip(pb: Any, base: int) -> None:
    roundtrip(pb, base)


@SETTINGS
@given(pb=message_strategy(NODE, depth=4))
def test_recursive_node_roundtrip(pb: Any) -> None:
    roundtrip(pb, 64)


# --- garbage in: only WireError out --------------------------------------------------

NAMES = sorted(MOD.MESSAGES)


def only_wire_errors(fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
    except WireError as e:
        assert "internal" not in str(e), f"escaped the generated checks: {e}"
        return False
    return True


def marshal_garbage(
    name: str, heap: memoryview, off: int, zc: int, max_size: int, read: bool = True
) -> None:
    """Garbage heap: a WireError, or an image that the receiver's VALIDATE accepts."""
    try:
        head, segs = MOD.MARSHAL[name](heap, off, zc, max_size)
    except WireError as e:
        assert "internal" not in str(e), f"escaped the generated checks: {e}"
        return
    img = bytes(head) + b"".join(segs)
    assert len(img) <= max_size
    MOD.VALIDATE[name](memoryview(img))
    if read:
        land(img, name)


@SETTINGS
@given(
    data=st.binary(max_size=600),
    off=st.integers(-16, 700),
    name=st.sampled_from(NAMES),
    zc=st.sampled_from([0, 8, 1 << 40]),
    max_size=st.sampled_from([64, 1 << 20]),
)
def test_marshal_random_heap(data: bytes, off: int, name: str, zc: int, max_size: int) -> None:
    marshal_garbage(name, memoryview(data), off, zc, max_size)


def small_u32s(n: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    """(position, value) pairs that plant plausible offsets/lengths into a buffer."""
    return st.lists(
        st.tuples(
            st.integers(0, n - 4), st.integers(0, 400) | st.sampled_from([0xFFFFFFFF, 1 << 31])
        ),
        min_size=1,
        max_size=8,
    )


SAMPLE_HEAP = Heap.private(1 << 12)
SAMPLE = MOD.AllTypes.new(
    SAMPLE_HEAP,
    inner={"s": "x", "nums": [1, 2]},
    r_inner=[{"a": 1, "s": "y"}],
    r_string=["a", "b"],
    m_str_msg={"k": {"a": 1}},
    c_inner={"a": 3},
    payload=b"p" * 20,
    tree={"children": [{"label": "c"}], "parent_hint": {"label": "h"}},
)


@SETTINGS
@given(pokes=small_u32s(SAMPLE_HEAP.size))
def test_marshal_corrupted_heap(pokes: list[tuple[int, int]]) -> None:
    buf = bytearray(SAMPLE_HEAP.buf)
    for pos, value in pokes:
        struct.pack_into("<I", buf, pos, value)
    marshal_garbage("alltypes.AllTypes", memoryview(buf), SAMPLE._off, 8, 1 << 20)


def test_marshal_every_word_poke() -> None:
    n = SAMPLE_HEAP.size
    for pos in range(0, n - 3, 4):
        for value in (1, 24, n - 8, 0xFFFFFFFF):
            buf = bytearray(SAMPLE_HEAP.buf)
            struct.pack_into("<I", buf, pos, value)
            marshal_garbage(
                "alltypes.AllTypes", memoryview(buf), SAMPLE._off, 8, 1 << 20, read=False
            )


def sample_image() -> bytes:
    head, segs = MOD.MARSHAL["alltypes.AllTypes"](SAMPLE_HEAP.buf, SAMPLE._off, 8, 1 << 20)
    return bytes(head) + b"".join(segs)


IMAGE = sample_image()


def land(img: bytes, name: str) -> None:
    """After VALIDATE accepted ``img``, reading it may only fail on bad UTF-8, and what
    is read never depends on the bytes around the image in the receive buffer."""
    seen = []
    for fill in (b"\xaa", b"\x55"):
        recv = bytearray(fill * 8 + img + fill * 64)
        view = MOD.MESSAGES[name]._from_image(memoryview(recv), 8, None)
        try:
            seen.append(view.to_pb().SerializeToString(deterministic=True))
            repr(view)
        except UnicodeDecodeError:
            seen.append(None)
    assert seen[0] == seen[1], "a validated image reads outside itself"


@SETTINGS
@given(
    cut=st.integers(0, len(IMAGE)),
    flips=st.lists(st.integers(0, 8 * len(IMAGE) - 1), max_size=6),
    pokes=small_u32s(len(IMAGE)) | st.just([]),
)
def test_validate_mangled_images(cut: int, flips: list[int], pokes: list[tuple[int, int]]) -> None:
    img = bytearray(IMAGE)
    for bit in flips:
        img[bit // 8] ^= 1 << (bit % 8)
    for pos, value in pokes:
        struct.pack_into("<I", img, pos, value)
    img = img[:cut] if cut < len(img) else img
    if only_wire_errors(MOD.VALIDATE["alltypes.AllTypes"], memoryview(img)):
        land(bytes(img), "alltypes.AllTypes")


def test_validate_every_truncation() -> None:
    for cut in range(len(IMAGE)):
        if only_wire_errors(MOD.VALIDATE["alltypes.AllTypes"], memoryview(IMAGE[:cut])):
            land(IMAGE[:cut], "alltypes.AllTypes")


def test_validate_every_word_poke() -> None:
    n = len(IMAGE)
    for pos in range(0, n - 3, 4):
        for value in (0, 1, 8, 24, n - 8, n - 1, n, 1 << 31, 0xFFFFFFFF):
            img = bytearray(IMAGE)
            struct.pack_into("<I", img, pos, value)
            if only_wire_errors(MOD.VALIDATE["alltypes.AllTypes"], memoryview(img)):
                land(bytes(img), "alltypes.AllTypes")


@SETTINGS
@given(data=st.binary(max_size=400), name=st.sampled_from(NAMES))
def test_validate_random_bytes(data: bytes, name: str) -> None:
    if only_wire_errors(MOD.VALIDATE[name], memoryview(data)):
        land(data, name)


def test_heap_back_to_baseline() -> None:
    import gc

    gc.collect()
    assert HEAP.statistics().used == 0


@pytest.mark.parametrize("name", NAMES)
def test_default_message_roundtrip(name: str) -> None:
    roundtrip(MOD.MESSAGES[name].pb_class()(), 8)
