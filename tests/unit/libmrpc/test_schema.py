"""Reading, compiling and validating schemas; the two hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from libmrpc import _schema as schema
from libmrpc._codegen import load_module
from libmrpc._schema import cache_key_for, compile_texts, imports_of, read_proto
from libmrpc.status import SchemaError

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
P3 = 'syntax = "proto3";\n'


def compile1(body: str, name: str = "t.proto") -> schema.SchemaBundle:
    return compile_texts({name: P3 + body})


def test_read_proto_follows_imports(tmp_path: Path) -> None:
    (tmp_path / "inc" / "lib").mkdir(parents=True)
    (tmp_path / "app").mkdir()
    (tmp_path / "inc" / "lib" / "base.proto").write_text(
        P3 + 'package lib;\nimport "google/protobuf/timestamp.proto";\n'
        "message Base { google.protobuf.Timestamp at = 1; }\n"
    )
    (tmp_path / "inc" / "lib" / "mid.proto").write_text(
        P3 + 'package lib;\nimport public "lib/base.proto";\nmessage Mid { Base b = 1; }\n'
    )
    (tmp_path / "app" / "main.proto").write_text(
        P3 + '// import "commented/out.proto";\n/* import "also/not.proto"; */\n'
        'import "lib/mid.proto";\npackage app;\nmessage Top { lib.Mid m = 1; }\n'
        "service S { rpc Go(Top) returns (Top); }\n"
    )
    texts = read_proto(tmp_path / "app" / "main.proto", [tmp_path / "inc"])
    assert sorted(texts) == ["lib/base.proto", "lib/mid.proto", "main.proto"]
    mod = load_module(compile_texts(texts))
    t = mod.Top()
    t.m.b.at.seconds = 5
    assert t.to_pb().m.b.at.seconds == 5
    assert "google.protobuf.Timestamp" in mod.MESSAGES and not hasattr(mod, "Timestamp")
    # the file's key is relative to the include dir that contains it
    texts2 = read_proto(tmp_path / "inc" / "lib" / "mid.proto", [tmp_path / "inc"])
    assert sorted(texts2) == ["lib/base.proto", "lib/mid.proto"]


def test_read_proto_errors(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="no such schema"):
        read_proto(tmp_path / "missing.proto")
    (tmp_path / "a.proto").write_text(P3 + 'import "nowhere/b.proto";\n')
    with pytest.raises(SchemaError, match="nowhere/b.proto.*not found"):
        read_proto(tmp_path / "a.proto")
    (tmp_path / "c.proto").write_text(P3 + 'import "../etc/passwd";\n')
    with pytest.raises(SchemaError, match="relative"):
        read_proto(tmp_path / "c.proto")


def test_imports_of_ignores_comments_and_strings() -> None:
    text = 'import "a.proto"; // import "b.proto";\n/* import "c.proto"; */ import weak "d.proto";'
    assert imports_of(text) == ["a.proto", "d.proto"]


def test_syntax_error_names_file_and_line() -> None:
    with pytest.raises(SchemaError) as e:
        compile_texts({"bad.proto": P3 + "message M {\n  int32 x = 1\n}\n"})
    assert "bad.proto:4" in str(e.value)  # protoc: expected ";" at line 4 col 1


def test_proto2_and_editions_rejected() -> None:
    with pytest.raises(SchemaError, match="proto2 syntax is not supported"):
        compile_texts({"p2.proto": 'syntax = "proto2";\nmessage M { optional int32 x = 1; }'})
    with pytest.raises(SchemaError, match="proto2"):
        compile_texts({"p.proto": "message M { optional int32 x = 1; }"})  # no syntax: proto2
    with pytest.raises(SchemaError, match="editions"):
        compile_texts({"e.proto": 'edition = "2023";\nmessage M { int32 x = 1; }'})


@pytest.mark.parametrize(
    "body",
    [
        "message M { int32 __class__ = 1; }",
        "message M { int32 __init__ = 1; }",
        "message __M { int32 x = 1; }",
        "message M { int32 to_pb = 1; }",
        "message M { int32 HasField = 1; }",
        "message M { int32 _buf = 1; }",
        "message M { int32 _w = 1; }",
        "message None { int32 x = 1; }",
        "enum E { True = 0; }",
        "message M {} service class { rpc Go(M) returns (M); }",
        "message M {} service S { rpc import(M) returns (M); }",
        "message M { int32 from = 1; int32 from_ = 2; }",
        "message MESSAGES {}",
        "message EchoStub {} service Echo { rpc Go(EchoStub) returns (EchoStub); }",
        "message _Private {}",
        "message M { oneof __o { int32 x = 1; } }",
    ],
)
def test_dangerous_or_colliding_identifiers_rejected(body: str) -> None:
    with pytest.raises(SchemaError, match="t.proto|schema bundle"):
        compile1(body)


@pytest.mark.parametrize(
    "body",
    [
        'message M { int32 x" = 1; }',
        "message M { int32 x\n = 1; }\nmessage 'q' {}",
        "message M { int32 x; = 1; }",
        "message M\u00e9 { int32 x = 1; }",
    ],
)
def test_names_protoc_rejects_are_schema_errors(body: str) -> None:
    with pytest.raises(SchemaError):
        compile1(body)


def test_check_identifiers_directly() -> None:
    """Names protoc would not produce are still refused by our own check."""
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    f = fds.file.add(name="x.proto", syntax="proto3", package="p")
    m = f.message_type.add(name="M")
    m.field.add(name="x'); import os; ('", number=1, type=5, label=1)
    with pytest.raises(SchemaError, match="not a plain identifier"):
        schema.check_descriptors(fds, {"x.proto"})
    m.field[0].name = "ok"
    f.package = "p.bad-name"
    with pytest.raises(SchemaError, match="package component"):
        schema.check_descriptors(fds, {"x.proto"})
    f.package = "p"
    f.enum_type.add(name="E").value.add(name="A\n", number=0)
    with pytest.raises(SchemaError, match="value of enum"):
        schema.check_descriptors(fds, {"x.proto"})


def test_keyword_fields_allowed_with_trailing_underscore() -> None:
    mod = load_module(compile1("package kw;\nmessage M { int32 from = 1; string lambda = 2; }"))
    m = mod.M(from_=3, lambda_="x")
    assert (m.from_, m.lambda_) == (3, "x")
    pb = m.to_pb()
    assert getattr(pb, "from") == 3 and mod.M.from_pb(pb).lambda_ == "x"


def test_top_level_collision_across_packages_rejected() -> None:
    with pytest.raises(SchemaError, match="collides"):
        compile_texts(
            {
                "a.proto": P3 + "package a; message Same {}",
                "b.proto": P3 + 'package b; import "a.proto"; message Same {}',
            }
        )


def test_schema_hash_ignores_comments_and_whitespace() -> None:
    base = compile1("package h;\nmessage M { int32 x = 1; string s = 2; }\n")
    pretty = compile1(
        "package h;\n\n// a comment\nmessage M {\n  int32 x = 1;  /* more */\n  string s = 2;\n}\n"
    )
    assert base.schema_hash == pretty.schema_hash
    assert base.cache_key != pretty.cache_key  # the generated module embeds the text
    changed = compile1("package h;\nmessage M { int64 x = 1; string s = 2; }\n")
    renumbered = compile1("package h;\nmessage M { int32 x = 3; string s = 2; }\n")
    assert len({base.schema_hash, changed.schema_hash, renumbered.schema_hash}) == 3
    assert len(base.schema_hash) == 16 and int(base.schema_hash, 16) >= 0


def test_cache_key_is_cheap_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = read_proto(SCHEMAS / "echo.proto")
    bundle = compile_texts(texts)
    assert cache_key_for(texts) == bundle.cache_key and len(bundle.cache_key) == 64
    monkeypatch.setattr(schema, "GENERATOR_VERSION", "other")
    assert cache_key_for(texts) != bundle.cache_key
    assert cache_key_for(dict(reversed(list(texts.items())))) == cache_key_for(texts)


def test_bundle_contents() -> None:
    from google.protobuf import descriptor_pb2

    texts = read_proto(SCHEMAS / "echo.proto")
    b = compile_texts(texts)
    assert b.texts == texts
    fds = descriptor_pb2.FileDescriptorSet.FromString(b.fds)
    assert [f.name for f in fds.file] == ["echo.proto"]
    assert not fds.file[0].HasField("source_code_info")
    with pytest.raises(SchemaError):
        compile_texts({})
    with pytest.raises(SchemaError, match="supplied by the compiler"):
        compile_texts({"google/protobuf/empty.proto": P3})


def test_streaming_methods_are_marked() -> None:
    mod = load_module(
        compile1(
            "package st;\nmessage M {}\nservice S {\n"
            "  rpc Up(stream M) returns (M);\n"
            "  rpc Both(stream M) returns (stream M);\n}\n"
        )
    )
    assert [(m.name, m.client_streaming, m.server_streaming) for m in mod.METHODS] == [
        ("Up", True, False),
        ("Both", True, True),
    ]
