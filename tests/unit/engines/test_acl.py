"""ACL: rule validation, method and field matching, failure policy, shadow mode, state."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from engines.acl import ENGINE, Acl
from libmrpc.status import ConfigError, StatusCode
from mrpcd.engine import MockClock, Rpc, Side, validate_engine_class
from tests.unit.engines import GET, PUT, call, make_ctx, reply, wire

DENY_ADMIN = {
    "rules": [{"name": "block-admin", "action": "deny", "field": "key", "equals": "admin"}]
}


def make(config: dict[str, Any], side: Side = Side.SEND) -> tuple[Acl, Any, MockClock]:
    clock = MockClock()
    engine = Acl(make_ctx(clock, side=side, engine_id="kv/acl-1"), config)
    return engine, wire(engine), clock


def msg(**fields: Any) -> Any:
    return SimpleNamespace(**fields)


def const(m: Any) -> Callable[[], Any]:
    return lambda: m


def run(engine: Acl, w: Any, clock: MockClock, *messages: Any, method: Any = GET) -> list[Rpc]:
    """Send one call per message; return the error replies produced."""
    start = len(w.rx_out)
    for i, m in enumerate(messages):
        w.tx_in.append(call(i, clock, method=method, view=const(m)))
    engine.do_work()
    return list(w.rx_out)[start:]


# ---------------------------------------------------------------------- config


def test_valid_engine_and_normalized_config() -> None:
    assert validate_engine_class(ENGINE, "engines.acl") is Acl and Acl.READS_CONTENT
    assert Acl.validate_config({}) == {"enforce": True, "default": "allow", "rules": []}
    cfg = Acl.validate_config(
        {
            "default": "deny",
            "rules": [
                {"name": "ok", "action": "allow", "method": "/kv.KV/*"},
                {"name": "users", "action": "allow", "field": "user.name", "in": ["a", 1, True]},
            ],
        }
    )
    assert cfg["rules"][0] == {"name": "ok", "action": "allow", "method": "/kv.KV/*", "field": None}
    assert cfg["rules"][1]["in"] == ["a", 1, True]


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"mode": "x"}, "acl: unknown config key.*mode"),
        ({"default": "maybe"}, "acl: default: expected allow or deny"),
        ({"rules": {"name": "x"}}, "acl: rules: expected a list"),
        ({"rules": ["deny"]}, r"acl: rules\[0\]: expected a mapping"),
        ({"rules": [{"action": "deny"}]}, r"acl: rules\[0\].name: required"),
        ({"rules": [{"name": "r", "action": "block"}]}, "rule 'r': action: expected allow or deny"),
        ({"rules": [{"name": "r", "action": "deny", "fields": "x"}]}, "rule.*unknown key.*fields"),
        (
            {"rules": [{"name": "r", "action": "deny"}, {"name": "r", "action": "allow"}]},
            "used twice",
        ),
        ({"rules": [{"name": "r", "action": "deny", "method": ""}]}, "method: expected"),
        ({"rules": [{"name": "r", "action": "deny", "field": "a..b", "equals": 1}]}, "field:"),
        ({"rules": [{"name": "r", "action": "deny", "field": "1x", "equals": 1}]}, "field:"),
        (
            {"rules": [{"name": "r", "action": "deny", "field": "a;import os", "equals": 1}]},
            "field",
        ),
        ({"rules": [{"name": "r", "action": "deny", "equals": "x"}]}, "equals: needs a field"),
        ({"rules": [{"name": "r", "action": "deny", "field": "k"}]}, "exactly one of"),
        (
            {"rules": [{"name": "r", "action": "deny", "field": "k", "equals": 1, "prefix": "a"}]},
            "exactly one of",
        ),
        (
            {"rules": [{"name": "r", "action": "deny", "field": "k", "equals": [1]}]},
            "equals: expected",
        ),
        (
            {"rules": [{"name": "r", "action": "deny", "field": "k", "prefix": 3}]},
            "prefix: expected",
        ),
        (
            {"rules": [{"name": "r", "action": "deny", "field": "k", "regex": "a("}]},
            "regex: 'a\\(' is not a valid regular expression",
        ),
        ({"rules": [{"name": "r", "action": "deny", "field": "k", "in": []}]}, "in: expected"),
        ({"enforce": 1}, "enforce"),
    ],
)
def test_bad_config(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        Acl.validate_config(config)


# ---------------------------------------------------------------------- matching


def test_deny_on_string_field_with_clear_message() -> None:
    engine, w, clock = make(DENY_ADMIN)
    errors = run(engine, w, clock, msg(key="admin"), msg(key="alice"), msg(key=""))
    assert [e.call_id for e in errors] == [0] and w.ids("tx_out") == [1, 2]
    assert errors[0].status is StatusCode.PERMISSION_DENIED
    assert errors[0].details.startswith(
        "denied by policy kv/acl-1 rule 'block-admin': /kv.KV/Get key='admin'; ask the operator"
    )
    stats = engine.statistics()
    assert stats["denied"] == 1 and stats["allowed"] == 2 and stats["rule:block-admin"] == 1


def test_bytes_fields_compare_as_utf8_text() -> None:
    engine, w, clock = make(DENY_ADMIN)
    errors = run(engine, w, clock, msg(key=memoryview(b"admin")), msg(key=b"admin\xff"))
    assert [e.call_id for e in errors] == [0]


@pytest.mark.parametrize(
    ("matcher", "hits", "misses"),
    [
        ({"equals": 42}, [42, "42"], [41, "x"]),
        ({"equals": True}, [True, "true"], [False, 1]),
        ({"prefix": "tmp/"}, ["tmp/a", b"tmp/b"], ["a/tmp/", ""]),
        ({"regex": "^[0-9]+$"}, ["123", 7], ["12a", ""]),
        ({"regex": "secret"}, ["my-secret-key"], ["public"]),
        ({"in": ["a", "b", 3]}, ["a", b"b", 3, "3"], ["c", 4]),
    ],
)
def test_matchers(matcher: dict[str, Any], hits: list[Any], misses: list[Any]) -> None:
    engine, w, clock = make({"rules": [{"name": "r", "action": "deny", "field": "key", **matcher}]})
    errors = run(engine, w, clock, *(msg(key=v) for v in [*hits, *misses]))
    assert [e.call_id for e in errors] == list(range(len(hits)))


def test_nested_field_and_long_values_are_truncated() -> None:
    engine, w, clock = make(
        {"rules": [{"name": "n", "action": "deny", "field": "user.name", "prefix": "x"}]}
    )
    errors = run(engine, w, clock, msg(user=msg(name="x" * 500)), msg(user=msg(name="y")))
    assert [e.call_id for e in errors] == [0]
    assert "user.name='" + "x" * 64 + "...'" in errors[0].details


def test_method_patterns_and_first_match_wins() -> None:
    engine, w, clock = make(
        {
            "default": "deny",
            "rules": [
                {"name": "vip", "action": "allow", "field": "key", "equals": "vip"},
                {"name": "no-puts", "action": "deny", "method": "/kv.KV/Put"},
                {"name": "gets", "action": "allow", "method": "Get"},
                {"name": "all-kv", "action": "allow", "method": "kv.KV/*"},
            ],
        }
    )
    assert len(run(engine, w, clock, msg(key="vip"), method=PUT)) == 0
    errors = run(engine, w, clock, msg(key="joe"), method=PUT)
    assert "rule 'no-puts': /kv.KV/Put;" in errors[0].details
    assert len(run(engine, w, clock, msg(key="joe"), method=GET)) == 0
    assert engine.handle_request({"op": "rules"})["rules"][2]["hits"] == 1


def test_default_deny_and_unknown_method() -> None:
    engine, w, clock = make(
        {"default": "deny", "rules": [{"name": "gets", "action": "allow", "method": "/kv.KV/G*"}]}
    )
    errors = run(engine, w, clock, msg(), msg(), method=PUT)
    assert (
        len(errors) == 2 and "(default deny): /kv.KV/Put matched no allow rule" in errors[0].details
    )
    errors = run(engine, w, clock, msg(), method=None)
    assert "<unknown method>" in errors[0].details


def test_missing_field_does_not_match_and_is_counted() -> None:
    engine, w, clock = make(DENY_ADMIN)
    errors = run(engine, w, clock, msg(other="admin"), msg(key=msg(x=1)))
    assert not errors and engine.statistics()["field_missing"] == 2
    w.tx_in.append(call(9, clock))  # a call with no private view: never passes unchecked
    engine.do_work()
    assert 9 not in w.ids("tx_out") and engine.statistics()["read_errors"] == 1


def test_unreadable_field_fails_closed() -> None:
    class Broken:
        @property
        def key(self) -> str:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    engine, w, clock = make(DENY_ADMIN)
    errors = run(engine, w, clock, Broken())
    assert errors[0].status is StatusCode.INVALID_ARGUMENT
    assert "could not read field key of /kv.KV/Get" in errors[0].details
    assert engine.statistics()["read_errors"] == 1


def test_each_field_is_read_once_per_call() -> None:
    reads = []

    class Counting:
        @property
        def key(self) -> str:
            reads.append(1)
            return "bob"

    engine, w, clock = make(
        {
            "rules": [
                {"name": "a", "action": "deny", "field": "key", "equals": "x"},
                {"name": "b", "action": "deny", "field": "key", "prefix": "y"},
                {"name": "c", "action": "allow", "field": "key", "regex": "o"},
            ]
        }
    )
    run(engine, w, clock, Counting())
    assert len(reads) == 1 and engine.statistics()["rule:c"] == 1


def test_receive_side_and_replies() -> None:
    engine, w, clock = make(DENY_ADMIN, side=Side.RECEIVE)
    w.rx_in.extend(
        [call(1, clock, view=lambda: msg(key="admin")), call(2, clock, view=lambda: msg(key="ok"))]
    )
    w.tx_in.append(reply(call(3, clock)))
    engine.do_work()
    assert w.ids("rx_out") == [2]
    assert w.ids("tx_out") == [3, 1]  # the rejection goes back to the remote caller
    assert w.tx_out[1].status is StatusCode.PERMISSION_DENIED


def test_shadow_mode_passes_and_counts() -> None:
    engine, w, clock = make({**DENY_ADMIN, "enforce": False})
    assert not run(engine, w, clock, msg(key="admin"))
    assert w.ids("tx_out") == [0]
    assert engine.statistics()["would_reject"] == 1


# ---------------------------------------------------------------------- updates, upgrade


def test_update_config_is_all_or_nothing() -> None:
    engine, w, clock = make(DENY_ADMIN)
    before = engine.config
    bad = {"rules": [{"name": "x", "action": "deny", "field": "key", "regex": "(("}]}
    with pytest.raises(ConfigError, match="regex"):
        engine.update_config(bad)
    assert engine.config == before
    assert len(run(engine, w, clock, msg(key="admin"))) == 1
    engine.update_config(
        {"rules": [{"name": "x", "action": "deny", "field": "key", "regex": "^b"}]}
    )
    assert len(run(engine, w, clock, msg(key="admin"), msg(key="bob"))) == 1
    assert engine.statistics()["rule:x"] == 1 and "rule:block-admin" not in engine.statistics()


def test_decompose_restore_carries_counters_and_hits() -> None:
    engine, w, clock = make(DENY_ADMIN)
    run(engine, w, clock, msg(key="admin"), msg(key="a"))
    fresh = Acl.restore(engine.ctx, engine.config, engine.decompose(), prev_version=1)
    stats = fresh.handle_request({"op": "stats"})["stats"]
    assert stats["rule:block-admin"] == 1 and stats["calls"] == 2 and stats["rejected"] == 1
