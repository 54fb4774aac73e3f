"""The generated module: contents, caching, mrpc-protoc, MARSHAL and VALIDATE specifics."""

from __future__ import annotations

import ast
import importlib
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner

from libmrpc import _codegen as codegen
from libmrpc import _schema as schema
from libmrpc._codegen import generate_source, load_cached, load_module
from libmrpc._heap import Heap
from libmrpc._schema import GENERATOR_VERSION, compile_texts, read_proto
from libmrpc.loader import load_proto
from libmrpc.status import StatusCode
from libmrpc.wire.errors import WireError
from libmrpc.wire.layout import LAYOUT_VERSION, MethodInfo

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
REF = struct.Struct("<II")


@pytest.fixture(scope="module")
def bundle() -> schema.SchemaBundle:
    return compile_texts(read_proto(SCHEMAS / "alltypes.proto"))


@pytest.fixture(scope="module")
def mod(bundle: schema.SchemaBundle) -> ModuleType:
    return load_module(bundle)


def test_generated_imports_name_modules_of_this_version(bundle: schema.SchemaBundle) -> None:
    """Generated code imports libmrpc modules by name: every one must exist, and a
    change of those names bumps GENERATOR_VERSION (the cache key) so a module cached
    by an older version is regenerated, not imported with stale names."""
    tree = ast.parse(generate_source(bundle))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("libmrpc"):
            names.update(f"{node.module}.{a.name}" for a in node.names)
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("libmrpc"))
    assert "libmrpc.wire.marshal" in names and "libmrpc._message" in names
    for name in sorted(names):
        try:
            importlib.import_module(name)
        except ImportError:  # `from libmrpc.wire.errors import WireError`: an attribute
            parent, _, attr = name.rpartition(".")
            assert hasattr(importlib.import_module(parent), attr), (
                f"generated code imports {name}, which does not exist"
            )
    assert GENERATOR_VERSION != "1"  # version 1 imported libmrpc.marshal_rt, libmrpc.message


def test_module_contents(mod: ModuleType, bundle: schema.SchemaBundle) -> None:
    assert mod.SCHEMA_HASH == bundle.schema_hash and len(mod.SCHEMA_HASH) == 16
    assert mod.CACHE_KEY == bundle.cache_key
    assert (mod.LAYOUT_VERSION, mod.GENERATOR_VERSION) == (LAYOUT_VERSION, GENERATOR_VERSION)
    assert mod.TEXTS == bundle.texts and mod.FDS == bundle.fds
    assert set(mod.MESSAGES) == set(mod.MARSHAL) == set(mod.VALIDATE)
    assert mod.MESSAGES["alltypes.AllTypes.Inner"] is mod.AllTypes.Inner
    assert mod.MESSAGES["alltypes.Node"] is mod.Node
    assert mod.AllTypes.Inner.__qualname__ == "AllTypes.Inner"
    assert not hasattr(mod, "Inner")  # nested types live on their parent only
    assert mod.Color.RED == mod.RED == 1 and mod.BLUE == -3
    assert mod.AllTypes.Mode.FAST == mod.AllTypes.FAST == 1
    assert mod.ENUMS["alltypes.AllTypes.Mode"] is mod.AllTypes.Mode
    assert mod.METHODS == [
        MethodInfo(
            0,
            "alltypes.AllTypesService",
            "Roundtrip",
            "/alltypes.AllTypesService/Roundtrip",
            "alltypes.AllTypes",
            "alltypes.AllTypes",
            False,
            False,
        ),
        MethodInfo(
            1,
            "alltypes.AllTypesService",
            "Ping",
            "/alltypes.AllTypesService/Ping",
            "alltypes.Empty",
            "alltypes.Empty",
            False,
            False,
        ),
        MethodInfo(
            2,
            "alltypes.AllTypesService",
            "Watch",
            "/alltypes.AllTypesService/Watch",
            "alltypes.Empty",
            "alltypes.Node",
            False,
            True,
        ),
    ]
    assert mod.SERVICES == {"alltypes.AllTypesService": (0, 1, 2)}


def test_method_ids_sort_services_by_full_name() -> None:
    text = (
        'syntax = "proto3"; package p; message M {}\n'
        "service Zed { rpc B(M) returns (M); rpc A(M) returns (M); }\n"
        "service Alpha { rpc Z(stream M) returns (M); }\n"
    )
    m = load_module(compile_texts({"p.proto": text}))
    assert [(x.id, x.path, x.client_streaming) for x in m.METHODS] == [
        (0, "/p.Alpha/Z", True),
        (1, "/p.Zed/B", False),
        (2, "/p.Zed/A", False),
    ]
    assert m.SERVICES == {"p.Alpha": (0,), "p.Zed": (1, 2)}


def test_generation_is_deterministic(bundle: schema.SchemaBundle) -> None:
    assert generate_source(bundle) == generate_source(bundle)
    again = compile_texts(read_proto(SCHEMAS / "alltypes.proto"))
    assert generate_source(again) == generate_source(bundle)


def test_install_services_is_called_last(monkeypatch: pytest.MonkeyPatch) -> None:
    from libmrpc import stubs

    seen: list[dict[str, object]] = []
    monkeypatch.setattr(stubs, "install_services", lambda ns: seen.append(dict(ns)))
    b = compile_texts(
        {"svc.proto": 'syntax = "proto3"; message Q {} service S { rpc Go(Q) returns (Q); }'}
    )
    m = load_module(b)
    assert len(seen) == 1 and seen[0]["METHODS"] == m.METHODS and "MARSHAL" in seen[0]


def test_schema_text_only_in_texts_literal() -> None:
    text = (
        'syntax = "proto3";\n// MARKER_COMMENT import os\n'
        'message M { string f = 1 [json_name = "MARKER_JSON\\"); import os; #"]; }\n'
    )
    src = generate_source(compile_texts({"m.proto": text}))
    lines = [ln for ln in src.splitlines() if "MARKER" in ln]
    # only inside the repr()-ed data literals, never as code
    assert [ln.split(" = ")[0] for ln in lines] == ["TEXTS", "FDS"]
    compile(src, "<test>", "exec")


def test_cache_dir_roundtrip_without_protoc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle: schema.SchemaBundle
) -> None:
    key = bundle.cache_key
    codegen._LOADED.pop(key, None)
    m = load_module(bundle, tmp_path)
    assert (tmp_path / f"{key}.py").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    codegen._LOADED.pop(key, None)

    def no_protoc(*a: object, **k: object) -> None:
        raise AssertionError("protoc must not run on a cache hit")

    monkeypatch.setattr(schema, "compile_texts", no_protoc)
    monkeypatch.setattr(schema, "_run_protoc", no_protoc)
    monkeypatch.setattr("libmrpc.loader.compile_texts", no_protoc)
    texts = read_proto(SCHEMAS / "alltypes.proto")
    t0 = time.perf_counter()
    hit = load_cached(texts, tmp_path)
    elapsed = time.perf_counter() - t0
    assert hit is not None and hit is not m and hit.CACHE_KEY == key
    assert elapsed < 0.25, f"cache hit took {elapsed * 1000:.1f} ms"
    assert load_proto(SCHEMAS / "alltypes.proto", cache_dir=tmp_path) is hit  # memoized
    assert hit.AllTypes(payload=b"x").payload == b"x"
    assert load_cached({"other.proto": "x"}, tmp_path) is None
    assert load_cached(texts, None) is hit


def test_corrupt_cache_file_is_replaced(tmp_path: Path) -> None:
    texts = {"c.proto": 'syntax = "proto3"; message C { int32 x = 1; }'}
    key = schema.cache_key_for(texts)
    (tmp_path / f"{key}.py").write_text("raise RuntimeError('corrupt')\n")
    assert load_cached(texts, tmp_path) is None
    m = load_proto_texts(texts, tmp_path)
    assert m.C(x=1).x == 1
    assert "corrupt" not in (tmp_path / f"{key}.py").read_text()


def load_proto_texts(texts: dict[str, str], cache: Path) -> ModuleType:
    return load_module(compile_texts(texts), cache)


def test_mrpc_protoc_cli(tmp_path: Path) -> None:
    from libmrpc._protoc import main

    out = tmp_path / "out"
    res = CliRunner().invoke(
        main, [str(SCHEMAS / "echo.proto"), "--out", str(out), "-I", str(SCHEMAS)]
    )
    assert res.exit_code == 0, res.output
    target = out / "echo_mrpc.py"
    assert target.is_file()
    b = compile_texts(read_proto(SCHEMAS / "echo.proto"))
    assert target.read_text() == generate_source(b)
    # importable where grpc_tools is unavailable: the descriptors are embedded
    code = (
        "import sys; sys.modules['grpc_tools'] = None\n"
        f"sys.path.insert(0, {str(out)!r})\n"
        "import echo_mrpc as m\n"
        "r = m.EchoRequest(payload=b'hi')\n"
        "print(bytes(r.payload).decode(), r.to_pb().payload.decode(), m.SCHEMA_HASH)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["hi", "hi", b.schema_hash]


def test_mrpc_protoc_cli_reports_schema_errors(tmp_path: Path) -> None:
    from libmrpc._protoc import main

    bad = tmp_path / "bad.proto"
    bad.write_text('syntax = "proto3";\nmessage M { int32 x = 1 }\n')
    res = CliRunner().invoke(main, [str(bad), "--out", str(tmp_path)])
    assert res.exit_code != 0 and "bad.proto:2" in res.output


# --- MARSHAL / VALIDATE -------------------------------------------------------------


def marshal(
    mod: ModuleType, msg: object, zc: int = 64, max_size: int = 1 << 24
) -> tuple[bytearray, list[memoryview]]:
    name = type(msg)._FULL_NAME  # type: ignore[attr-defined]
    return mod.MARSHAL[name](msg._owner.buf, msg._off, zc, max_size)  # type: ignore


def test_marshal_zero_copy_segments(mod: ModuleType) -> None:
    heap = Heap.private(1 << 20)
    a = mod.AllTypes.new(
        heap, payload=b"P" * 100, class_="small", r_bytes=[b"B" * 64, b"b"], inner={"s": "S" * 70}
    )
    head, segs = marshal(mod, a, zc=64)
    assert len(head) % 8 == 0
    assert [bytes(s) for s in segs] == [b"S" * 70, b"B" * 64, b"P" * 100]
    assert all(s.obj is heap.buf.obj for s in segs)  # zero-copy slices of the heap
    img = bytes(head) + b"".join(segs)
    mod.VALIDATE["alltypes.AllTypes"](img)
    off = mod.AllTypes._LAYOUT.field("payload").offset
    r, n = REF.unpack_from(head, off)
    assert (n, img[r : r + n]) == (100, b"P" * 100) and r == len(head) + 134
    private, segs2 = marshal(mod, a, zc=sys.maxsize)
    assert segs2 == [] and bytes(private) != bytes(head)


def test_marshal_size_limit(mod: ModuleType) -> None:
    a = mod.AllTypes(payload=b"x" * 1000)
    with pytest.raises(WireError) as e:
        marshal(mod, a, zc=64, max_size=900)
    assert e.value.status == StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(WireError) as e:
        marshal(mod, mod.AllTypes(), max_size=100)
    assert e.value.status == StatusCode.RESOURCE_EXHAUSTED


def test_marshal_bad_refs_name_type_field_and_value(mod: ModuleType) -> None:
    heap = Heap.private(1 << 16)
    a = mod.AllTypes.new(heap, payload=b"x")
    off = a._off + mod.AllTypes._LAYOUT.field("payload").offset
    REF.pack_into(heap.buf, off, heap.size - 2, 5)
    with pytest.raises(WireError) as e:
        marshal(mod, a)
    assert e.value.status == StatusCode.INVALID_ARGUMENT
    assert "alltypes.AllTypes.payload" in str(e.value) and str(heap.size - 2) in str(e.value)
    REF.pack_into(heap.buf, off, 0, 0)
    inner = a._off + mod.AllTypes._LAYOUT.field("inner").offset
    REF.pack_into(heap.buf, inner, 64, 16)  # wrong record size
    with pytest.raises(WireError, match="record size 24"):
        marshal(mod, a)
    REF.pack_into(heap.buf, inner, 0, 0)
    for bad_off in (-1, heap.size, "7", None, 2**70):
        with pytest.raises(WireError):
            mod.MARSHAL["alltypes.AllTypes"](heap.buf, bad_off, 64, 1 << 20)


def test_marshal_cycles_and_depth_are_bounded(mod: ModuleType) -> None:
    heap = Heap.private(1 << 16)
    node = mod.Node.new(heap, label="loop")
    hint = node._off + mod.Node._LAYOUT.field("parent_hint").offset
    REF.pack_into(heap.buf, hint, node._off, mod.Node._SIZE)  # points at itself
    with pytest.raises(WireError) as e:
        marshal(mod, node)
    assert e.value.status == StatusCode.INVALID_ARGUMENT
    kids = node._off + mod.Node._LAYOUT.field("children").offset
    REF.pack_into(heap.buf, hint, 0, 0)
    REF.pack_into(heap.buf, kids, node._off, 1)  # a one-element array: itself
    with pytest.raises(WireError, match="deeper than 64|more records"):
        marshal(mod, node)
    chain = mod.Node(label="0")
    cur = chain
    for i in range(70):
        cur = cur.parent_hint
        cur.label = str(i + 1)
    with pytest.raises(WireError, match="deeper than 64"):
        marshal(mod, chain)
    ok = mod.Node()
    cur = ok
    for _ in range(63):
        cur = cur.parent_hint
        cur.weight = 1
    head, _segs = marshal(mod, ok)
    mod.VALIDATE["alltypes.Node"](head)


def test_validate_rejects_bad_images(mod: ModuleType) -> None:
    a = mod.AllTypes(inner={"s": "x"}, payload=b"p" * 10, r_inner=[{"a": 1}])
    head, _segs = marshal(mod, a, zc=1 << 30)
    img = bytearray(head)
    v = mod.VALIDATE["alltypes.AllTypes"]
    v(img)
    with pytest.raises(WireError, match="shorter than its root"):
        v(img[:100])
    with pytest.raises(WireError, match="alltypes.AllTypes.payload"):
        v(img[: len(img) - 8])  # payload at the end no longer fits
    bad = bytearray(img)
    REF.pack_into(bad, mod.AllTypes._LAYOUT.field("inner").offset, 320, 23)
    with pytest.raises(WireError, match="record size 24"):
        v(bad)
    bad = bytearray(img)
    REF.pack_into(bad, mod.AllTypes._LAYOUT.field("r_inner").offset, 0, 1 << 20)
    with pytest.raises(WireError, match="r_inner"):
        v(bad)
    loop = bytearray(64)
    REF.pack_into(loop, 24, 0, 32)  # Node.parent_hint -> the root itself
    with pytest.raises(WireError):
        mod.VALIDATE["alltypes.Node"](loop)


def test_inactive_oneof_refs_are_not_followed(mod: ModuleType) -> None:
    heap = Heap.private(1 << 16)
    a = mod.AllTypes.new(heap, c_int=5)
    off = a._off + mod.AllTypes._LAYOUT.field("c_string").offset
    REF.pack_into(heap.buf, off, 1 << 30, 9)  # stale garbage in an inactive member slot
    head, _ = marshal(mod, a)
    assert REF.unpack_from(head, mod.AllTypes._LAYOUT.field("c_string").offset) == (0, 0)
    mod.VALIDATE["alltypes.AllTypes"](head)


def test_many_tiny_blobs_fit_the_visit_budget(mod: ModuleType) -> None:
    a = mod.AllTypes(r_bytes=[b"x"] * 2000, r_string=["y"] * 2000)
    head, segs = marshal(mod, a, zc=0, max_size=1 << 24)
    size = len(head) + sum(len(s) for s in segs)
    head2, segs2 = marshal(mod, a, zc=0, max_size=size)  # exactly at the limit: still fine
    assert len(segs2) == 4000 and bytes(head2) == bytes(head)
    with pytest.raises(WireError):
        marshal(mod, a, zc=0, max_size=size - 1)
