"""Access log: one logfmt line per sampled RPC, safe quoting, files and reconfiguration."""

from __future__ import annotations

import logging as stdlib_logging
import shlex
from pathlib import Path
from typing import Any

import pytest

import engines.logging as access
from engines.logging import ENGINE, AccessLog, sampled
from libmrpc.status import ConfigError, StatusCode
from mrpcd.engine import MockClock, Side, validate_engine_class
from tests.unit.engines import call, make_ctx, reply, wire


def make(
    tmp_path: Path, side: Side = Side.SEND, **config: Any
) -> tuple[AccessLog, Any, MockClock, Path]:
    clock = MockClock()
    path = tmp_path / "access.log"
    engine = AccessLog(make_ctx(clock, side=side), {"file": str(path), **config})
    return engine, wire(engine), clock, path


def parse(line: str) -> dict[str, str]:
    """logfmt -> dict (values JSON-quoted by the engine are shell-compatible here)."""
    return dict(part.split("=", 1) for part in shlex.split(line))


def lines(path: Path) -> list[dict[str, str]]:
    return [parse(x) for x in path.read_text().splitlines()]


def test_module_uses_the_standard_logging_package() -> None:
    assert access.logging is stdlib_logging
    assert validate_engine_class(ENGINE, "engines.logging") is AccessLog


def test_config() -> None:
    assert AccessLog.validate_config({}) == {
        "enforce": True,
        "file": "-",
        "sample_rate": 1.0,
        "max_inflight": 1_000_000,
    }
    cases: list[tuple[dict[str, Any], str]] = [
        ({"path": "x"}, "unknown config key.*path"),
        ({"file": ""}, "file:"),
        ({"file": 3}, "file:"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": "all"}, "sample_rate"),
        ({"max_inflight": 0}, "max_inflight"),
    ]
    for bad, error in cases:
        with pytest.raises(ConfigError, match=f"^logging: {error}"):
            AccessLog.validate_config(bad)


def test_one_line_per_rpc_with_latency(tmp_path: Path) -> None:
    engine, w, clock, path = make(tmp_path)
    c1, c2 = call(42, clock, size=64), call(43, clock, size=70)
    w.tx_in.extend([c1, c2])
    engine.do_work()
    clock.advance(0.000123)
    w.rx_in.extend([reply(c1, size=8), reply(c2, StatusCode.NOT_FOUND, size=0)])
    engine.do_work()
    assert w.ids("tx_out") == [42, 43] and w.ids("rx_out") == [42, 43]
    first, second = lines(path)
    assert first["ts"].endswith("Z")
    assert {
        k: first[k]
        for k in (
            "app",
            "side",
            "method",
            "status",
            "req_bytes",
            "resp_bytes",
            "latency_us",
            "call_id",
        )
    } == {
        "app": "kv",
        "side": "send",
        "method": "/kv.KV/Get",
        "status": "OK",
        "req_bytes": "64",
        "resp_bytes": "8",
        "latency_us": "123",
        "call_id": "42",
    }
    assert "details" not in first
    assert second["status"] == "NOT_FOUND" and second["details"] == "failed with NOT_FOUND"
    assert engine.statistics()["logged"] == 2


def test_receive_side_logs_replies_going_out(tmp_path: Path) -> None:
    engine, w, clock, path = make(tmp_path, side=Side.RECEIVE)
    c = call(1, clock)
    w.rx_in.append(c)
    engine.do_work()
    w.tx_in.append(reply(c))
    engine.do_work()
    assert w.ids("rx_out") == [1] and w.ids("tx_out") == [1]
    assert lines(path)[0]["side"] == "receive"


def test_unsafe_values_are_quoted_so_one_rpc_is_one_line(tmp_path: Path) -> None:
    engine, w, clock, path = make(tmp_path)
    c = call(1, clock, app='evil app\nts=forged "x"')
    w.tx_in.append(c)
    engine.do_work()
    w.rx_in.append(reply(c, StatusCode.INTERNAL))
    engine.do_work()
    text = path.read_text()
    assert text.count("\n") == 1
    assert lines(path)[0]["app"] == 'evil app\\nts=forged "x"'


def test_reply_for_an_unseen_call(tmp_path: Path) -> None:
    engine, w, clock, path = make(tmp_path)
    w.rx_in.append(reply(call(5, clock)))
    engine.do_work()
    entry = lines(path)[0]
    assert entry["latency_us"] == "-" and entry["req_bytes"] == "-"
    assert engine.statistics()["unmatched_replies"] == 1


def test_sampling_is_deterministic(tmp_path: Path) -> None:
    picked = [i for i in range(10_000) if sampled(i, 0.25)]
    assert len(picked) == pytest.approx(2500, rel=0.05)
    assert picked == [i for i in range(10_000) if sampled(i, 0.25)]
    assert all(sampled(i, 1.0) for i in range(1000)) and not any(
        sampled(i, 0.0) for i in range(1000)
    )
    engine, w, clock, path = make(tmp_path, sample_rate=0.25)
    calls = [call(i, clock) for i in range(200)]
    w.tx_in.extend(calls)
    engine.do_work()
    assert engine.statistics()["inflight"] == len([i for i in range(200) if sampled(i, 0.25)])
    w.rx_in.extend(reply(c) for c in calls)
    engine.do_work()
    logged = [int(x["call_id"]) for x in lines(path)]
    assert logged == [i for i in range(200) if sampled(i, 0.25)]


def test_stderr_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    clock = MockClock()
    engine = AccessLog(make_ctx(clock), {})
    w = wire(engine)
    c = call(7, clock)
    w.tx_in.append(c)
    w.rx_in.append(reply(c))
    engine.do_work()
    engine.close()  # must not close stderr
    assert parse(capsys.readouterr().err.strip())["call_id"] == "7"


def test_update_config_switches_files_all_or_nothing(tmp_path: Path) -> None:
    engine, w, clock, path = make(tmp_path)
    before = dict(engine.config)
    with pytest.raises(ConfigError, match="cannot open"):
        engine.update_config({"file": str(tmp_path / "missing-dir" / "x.log")})
    with pytest.raises(ConfigError, match="sample_rate"):
        engine.update_config({"file": str(tmp_path / "other.log"), "sample_rate": 2})
    assert engine.config == before and not (tmp_path / "other.log").exists()
    engine.update_config({"file": str(tmp_path / "new.log")})
    c = call(1, clock)
    w.tx_in.append(c)
    w.rx_in.append(reply(c))
    engine.do_work()
    assert len(lines(tmp_path / "new.log")) == 1 and path.read_text() == ""


def test_files_are_appended_and_closed(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text("old line\n")
    engine, w, clock, _ = make(tmp_path)
    c = call(1, clock)
    w.tx_in.append(c)
    w.rx_in.append(reply(c))
    engine.do_work()
    assert path.read_text().startswith("old line\nts=")  # line-buffered: already on disk
    engine.close()
    w.tx_in.append(c2 := call(2, clock))
    w.rx_in.append(reply(c2))
    engine.do_work()  # writing after close never fails the RPC
    assert w.ids("rx_out") == [1, 2]
    with pytest.raises(ConfigError, match="cannot open"):
        AccessLog(make_ctx(clock), {"file": str(tmp_path)})  # a directory


def test_decompose_restore_keeps_calls_in_flight(tmp_path: Path) -> None:
    engine, w, clock, path = make(tmp_path)
    c = call(3, clock, size=99)
    w.tx_in.append(c)
    engine.do_work()
    state = engine.decompose()
    engine.close()
    fresh = AccessLog.restore(engine.ctx, engine.config, state, prev_version=1)
    wire(fresh, w)
    clock.advance(0.001)
    w.rx_in.append(reply(c))
    fresh.do_work()
    fresh.close()
    entry = lines(path)[0]
    assert entry["req_bytes"] == "99" and entry["latency_us"] == "1000"
    assert fresh.handle_request({"op": "stats"})["stats"]["calls"] == 1
