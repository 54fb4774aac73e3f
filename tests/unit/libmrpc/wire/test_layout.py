"""The layout function against hand-computed offsets (see docs/LAYOUT.md)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from libmrpc._codegen import load_module
from libmrpc._heap import Heap
from libmrpc._schema import compile_texts, read_proto
from libmrpc.wire.layout import LAYOUT_VERSION, Kind, MessageLayout, compute_layouts

SCHEMAS = Path(__file__).resolve().parents[4] / "schemas"


@pytest.fixture(scope="module")
def alltypes() -> dict[str, MessageLayout]:
    return compute_layouts(compile_texts(read_proto(SCHEMAS / "alltypes.proto")).fds)


def layout_of(body: str, name: str = "t.M") -> MessageLayout:
    text = f'syntax = "proto3";\npackage t;\n{body}\n'
    return compute_layouts(compile_texts({"t.proto": text}).fds)[name]


def slots(ml: MessageLayout) -> dict[str, tuple[str, int, str, int]]:
    return {f.name: (f.kind, f.offset, f.fmt, f.size) for f in ml.fields}


def test_version() -> None:
    assert LAYOUT_VERSION == 1


def test_scalars_sorted_by_alignment_then_number(alltypes: dict[str, MessageLayout]) -> None:
    ml = alltypes["alltypes.Scalars"]
    assert ml.size == 96 and ml.presence_words == 0 and ml.oneofs == ()
    assert slots(ml) == {
        # 8-byte slots first, by field number
        "f_double": ("scalar", 0, "d", 8),
        "f_int64": ("scalar", 8, "q", 8),
        "f_uint64": ("scalar", 16, "Q", 8),
        "f_sint64": ("scalar", 24, "q", 8),
        "f_fixed64": ("scalar", 32, "Q", 8),
        "f_sfixed64": ("scalar", 40, "q", 8),
        # then 4-byte scalars and references (align 4), by field number
        "f_float": ("scalar", 48, "f", 4),
        "f_int32": ("scalar", 52, "i", 4),
        "f_uint32": ("scalar", 56, "I", 4),
        "f_sint32": ("scalar", 60, "i", 4),
        "f_fixed32": ("scalar", 64, "I", 4),
        "f_sfixed32": ("scalar", 68, "i", 4),
        "f_enum": ("scalar", 72, "i", 4),
        "f_string": ("string", 76, "", 8),
        "f_bytes": ("bytes", 84, "", 8),
        # then bytes; 93 rounds up to 96
        "f_bool": ("scalar", 92, "?", 1),
    }
    assert ml.field("f_enum").type_name == "alltypes.Color"
    assert ml.field("f_enum").scalar == "enum"


def test_recursive_node(alltypes: dict[str, MessageLayout]) -> None:
    ml = alltypes["alltypes.Node"]
    assert ml.size == 32
    assert slots(ml) == {
        "weight": ("scalar", 0, "q", 8),
        "label": ("string", 8, "", 8),
        "children": ("repeated_message", 16, "", 8),
        "parent_hint": ("message", 24, "", 8),
    }
    assert ml.field("children").elem_size == 32
    assert ml.field("parent_hint").type_name == "alltypes.Node"


def test_alltypes_presence_oneofs_and_refs(alltypes: dict[str, MessageLayout]) -> None:
    ml = alltypes["alltypes.AllTypes"]
    assert ml.size == 320
    assert ml.presence_words == 1
    assert [(o.name, o.offset, o.members) for o in ml.oneofs] == [
        ("choice", 8, (50, 51, 52, 53)),
        ("other", 12, (54, 55)),
    ]
    f = {x.name: x for x in ml.fields}
    # 8-aligned after the case slots: o_double (45), c_int (50)
    assert (f["o_double"].offset, f["c_int"].offset) == (16, 24)
    assert f["scalars"].offset == 32 and f["inner"].offset == 40
    assert (f["mode"].offset, f["tree"].offset) == (48, 52)
    for i, num in enumerate(range(10, 27)):  # repeated fields 10..26, 8 bytes apart
        assert next(x for x in ml.fields if x.number == num).offset == 60 + 8 * i
    assert [
        f[n].offset
        for n in (
            "m_str_int",
            "m_int_str",
            "m_uint_bytes",
            "m_str_msg",
            "m_bool_double",
            "m_sint_enum",
        )
    ] == list(range(196, 244, 8))
    assert [
        (f[n].offset, f[n].presence_bit)
        for n in ("o_int32", "o_string", "o_bytes", "o_inner", "o_bool", "o_double")
    ] == [(244, 0), (248, 1), (256, 2), (264, 3), (316, 4), (16, 5)]
    assert [
        (f[n].offset, f[n].oneof_name)
        for n in ("c_string", "c_inner", "c_bytes", "x_float", "x_flag")
    ] == [(272, "choice"), (280, "choice"), (288, "choice"), (296, "other"), (317, "other")]
    assert (f["class"].offset, f["class"].attr_name) == (300, "class_")
    assert f["payload"].offset == 308
    assert f["r_bool"].elem_size == 1 and f["r_double"].elem_size == 8
    assert f["r_string"].kind == Kind.REPEATED_STRING and f["r_string"].elem_size == 8
    assert f["r_bytes"].kind == Kind.REPEATED_BYTES
    assert f["r_inner"].kind == Kind.REPEATED_MESSAGE and f["r_inner"].elem_size == 24
    assert f["c_inner"].presence_bit is None and f["o_inner"].oneof_name is None


def test_maps(alltypes: dict[str, MessageLayout]) -> None:
    f = {x.name: x for x in alltypes["alltypes.AllTypes"].fields}
    m = f["m_str_msg"]
    assert m.kind == Kind.MAP and m.type_name == "alltypes.AllTypes.MStrMsgEntry"
    assert m.elem_size == 16
    assert (m.map_key.kind, m.map_key.offset) == (Kind.STRING, 0)  # type: ignore[union-attr]
    assert (m.map_value.kind, m.map_value.offset) == (Kind.MESSAGE, 8)  # type: ignore[union-attr]
    entry = alltypes["alltypes.AllTypes.MBoolDoubleEntry"]
    assert entry.map_entry and slots(entry) == {
        "key": ("scalar", 8, "?", 1),
        "value": ("scalar", 0, "d", 8),
    }
    assert alltypes["alltypes.AllTypes.MSintEnumEntry"].size == 8


def test_inner_and_empty(alltypes: dict[str, MessageLayout]) -> None:
    assert slots(alltypes["alltypes.AllTypes.Inner"]) == {
        "a": ("scalar", 0, "i", 4),
        "s": ("string", 4, "", 8),
        "nums": ("repeated_scalar", 12, "i", 8),
    }
    assert alltypes["alltypes.AllTypes.Inner"].size == 24
    assert alltypes["alltypes.Empty"].size == 8  # minimum record size
    assert alltypes["alltypes.Empty"].fields == ()


def test_single_bool_is_8_bytes() -> None:
    ml = layout_of("message M { bool b = 7; }")
    assert ml.size == 8 and slots(ml) == {"b": ("scalar", 0, "?", 1)}


def test_worked_example_layout() -> None:
    ml = layout_of(EX, "t.Ex")
    assert ml.presence_words == 1 and ml.oneofs[0].offset == 8
    assert {n: o for n, (_k, o, _f, _s) in slots(ml).items()} == {
        "n": 16,
        "a": 24,
        "s": 28,
        "sub": 36,
        "flags": 44,
    }
    assert ml.size == 56


EX = """message Ex {
  optional int32 a = 1;
  string s = 2;
  oneof pick { int64 n = 3; Ex sub = 4; }
  repeated bool flags = 5;
}"""


@pytest.mark.parametrize("zc", [1 << 30, 2])
def test_worked_example_image(zc: int) -> None:
    mod = load_module(compile_texts({"t.proto": f'syntax = "proto3";\npackage t;\n{EX}\n'}))
    heap = Heap.private(1 << 16)
    m = mod.Ex.new(heap, a=7, s="hi", sub={}, flags=[True, False])
    head, segs = mod.MARSHAL["t.Ex"](heap.buf, m._off, zc, 1 << 20)
    ref = struct.Struct("<II").unpack_from
    assert struct.unpack_from("<QI", head, 0) == (1, 4)
    assert struct.unpack_from("<i", head, 24)[0] == 7
    if zc > 2:
        assert len(head) == 128 and segs == []
        assert (ref(head, 28), ref(head, 36), ref(head, 44)) == ((56, 2), (64, 56), (120, 2))
        assert head[56:58] == b"hi" and head[120:122] == b"\x01\x00"
    else:
        assert len(head) == 120 and [bytes(s) for s in segs] == [b"hi"]
        assert (ref(head, 28), ref(head, 36), ref(head, 44)) == ((120, 2), (56, 56), (112, 2))


def test_presence_words_grow_past_64() -> None:
    fields = "\n".join(f"  optional int32 f{i} = {i};" for i in range(1, 67))
    ml = layout_of(f"message M {{\n{fields}\n}}")
    assert ml.presence_words == 2
    f = {x.name: x for x in ml.fields}
    assert (f["f1"].presence_bit, f["f65"].presence_bit, f["f66"].presence_bit) == (0, 64, 65)
    assert f["f1"].offset == 16 and ml.size == 16 + 66 * 4


def test_oneof_case_pads_before_8_byte_fields() -> None:
    ml = layout_of("message M { oneof o { double d = 1; int32 i = 2; } fixed64 x = 3; }")
    assert ml.oneofs[0].offset == 0
    assert slots(ml) == {
        "d": ("scalar", 8, "d", 8),
        "x": ("scalar", 16, "Q", 8),
        "i": ("scalar", 24, "i", 4),
    }
    assert ml.size == 32


def test_layout_depends_on_numbers_not_declaration_order() -> None:
    a = layout_of("message M { int32 a = 1; bytes b = 2; double c = 3; }")
    b = layout_of("message M { double c = 3; bytes b = 2; int32 a = 1; }")
    assert a == b
    assert compute_layouts(compile_texts({"t.proto": 'syntax = "proto3"; message M {}'}).fds)


def test_accepts_parsed_descriptor_set(alltypes: dict[str, MessageLayout]) -> None:
    from google.protobuf import descriptor_pb2

    fds = compile_texts(read_proto(SCHEMAS / "alltypes.proto")).fds
    assert compute_layouts(descriptor_pb2.FileDescriptorSet.FromString(fds)) == alltypes
