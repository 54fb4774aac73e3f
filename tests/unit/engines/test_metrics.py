"""Metrics: gRPC-style Prometheus counters and histograms, one registry per daemon."""

from __future__ import annotations

import importlib
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from engines import metrics as metrics_mod
from engines.metrics import CODE_NAMES, ENGINE, Metrics, render
from libmrpc.status import ConfigError, StatusCode
from mrpcd.engine import MockClock, Services, Side, validate_engine_class
from mrpcd.metrics_http import start_http_server
from tests.unit.engines import GET, PUT, call, make_ctx, reply, wire


def make(
    registry: CollectorRegistry,
    side: Side = Side.SEND,
    app: str = "kv",
    clock: MockClock | None = None,
    **config: Any,
) -> tuple[Metrics, Any, MockClock]:
    clock = clock or MockClock()
    ctx = make_ctx(clock, side=side, app=app, services=Services(metrics_registry=registry))
    engine = Metrics(ctx, config)
    return engine, wire(engine), clock


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Scrape ``render(registry)`` back into {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return samples(registry).get((name, frozenset(labels.items())), 0.0)


# ---------------------------------------------------------------------- config


def test_valid_engine_and_config() -> None:
    assert validate_engine_class(ENGINE, "engines.metrics") is Metrics
    assert Metrics.validate_config({}) == {"enforce": True, "max_inflight": 1_000_000}
    with pytest.raises(ConfigError, match="metrics: unknown config key.*buckets"):
        Metrics.validate_config({"buckets": [1]})
    with pytest.raises(ConfigError, match="max_inflight: expected an integer >= 1"):
        Metrics.validate_config({"max_inflight": 0})


def test_code_names_follow_grpc() -> None:
    assert CODE_NAMES[StatusCode.OK] == "OK"
    assert CODE_NAMES[StatusCode.RESOURCE_EXHAUSTED] == "ResourceExhausted"
    assert CODE_NAMES[StatusCode.CANCELLED] == "Canceled"


# ---------------------------------------------------------------------- counting


def test_client_side_counts_per_status_and_latency() -> None:
    reg = CollectorRegistry()
    engine, w, clock = make(reg)
    statuses = [StatusCode.OK] * 6 + [StatusCode.NOT_FOUND] * 3 + [StatusCode.UNAVAILABLE]
    calls = [call(i, clock, size=100, method=PUT if i == 0 else GET) for i in range(10)]
    w.tx_in.extend(calls)
    engine.do_work()
    assert list(w.tx_out) == calls
    clock.advance(0.003)
    w.rx_in.extend(reply(c, s, size=10) for c, s in zip(calls, statuses, strict=True))
    engine.do_work()
    assert len(w.rx_out) == 10
    lab = {"app": "kv", "grpc_service": "kv.KV", "grpc_method": "Get"}
    assert value(reg, "grpc_client_started_total", **lab) == 9
    assert value(reg, "grpc_client_started_total", **{**lab, "grpc_method": "Put"}) == 1
    assert value(reg, "grpc_client_handled_total", **lab, grpc_code="OK") == 5
    assert value(reg, "grpc_client_handled_total", **lab, grpc_code="NotFound") == 3
    assert value(reg, "grpc_client_handled_total", **lab, grpc_code="Unavailable") == 1
    assert value(reg, "grpc_client_handling_seconds_count", **lab) == 9
    assert value(reg, "grpc_client_handling_seconds_bucket", **lab, le="0.0025") == 0
    assert value(reg, "grpc_client_handling_seconds_bucket", **lab, le="0.005") == 9
    assert value(reg, "mrpc_rpc_bytes_total", app="kv", direction="tx") == 1000
    assert value(reg, "mrpc_rpc_bytes_total", app="kv", direction="rx") == 100
    assert value(reg, "grpc_server_handled_total", **lab, grpc_code="OK") == 0
    assert engine.statistics()["inflight"] == 0


def test_server_side_uses_server_metrics_and_sees_rejections() -> None:
    reg = CollectorRegistry()
    engine, w, clock = make(reg, side=Side.RECEIVE)
    w.rx_in.extend(call(i, clock) for i in range(3))
    engine.do_work()
    assert len(w.rx_out) == 3
    w.tx_in.append(reply(w.rx_out[0]))
    w.tx_in.append(w.rx_out[1].error_reply(StatusCode.PERMISSION_DENIED, "acl says no"))
    engine.do_work()
    lab = {"app": "kv", "grpc_service": "kv.KV", "grpc_method": "Get"}
    assert value(reg, "grpc_server_started_total", **lab) == 3
    assert value(reg, "grpc_server_handled_total", **lab, grpc_code="OK") == 1
    assert value(reg, "grpc_server_handled_total", **lab, grpc_code="PermissionDenied") == 1
    assert engine.statistics()["inflight"] == 1


def test_instances_share_the_registry_and_label_by_app() -> None:
    reg = CollectorRegistry()
    clock = MockClock()
    a, wa, _ = make(reg, app="a", clock=clock)
    b, wb, _ = make(reg, app="b", clock=clock)
    a2, _, _ = make(reg, app="a", side=Side.RECEIVE, clock=clock)  # same names, no clash
    wa.tx_in.append(call(1, clock, app="a"))
    wb.tx_in.extend([call(1, clock, app="b"), call(2, clock, app="b")])
    for e in (a, b, a2):
        e.do_work()
    lab = {"grpc_service": "kv.KV", "grpc_method": "Get"}
    assert value(reg, "grpc_client_started_total", app="a", **lab) == 1
    assert value(reg, "grpc_client_started_total", app="b", **lab) == 2


def test_default_registry_when_the_daemon_gives_none() -> None:
    clock = MockClock()
    engine = Metrics(make_ctx(clock, app="default-reg-app"), {})
    w = wire(engine)
    w.tx_in.append(call(1, clock, app="default-reg-app"))
    engine.do_work()
    assert b'app="default-reg-app"' in render()
    assert b'app="default-reg-app"' in render(metrics_mod.default_registry())


def test_inflight_is_bounded_and_unmatched_replies_still_count() -> None:
    reg = CollectorRegistry()
    engine, w, clock = make(reg, max_inflight=2)
    calls = [call(i, clock) for i in range(3)]
    w.tx_in.extend(calls)
    engine.do_work()
    w.rx_in.extend(reply(c) for c in calls)
    w.rx_in.append(reply(call(99, clock), StatusCode.INTERNAL))
    engine.do_work()
    stats = engine.statistics()
    assert stats["evicted"] == 1 and stats["unmatched_replies"] == 2 and stats["inflight"] == 0
    lab = {"app": "kv", "grpc_service": "kv.KV", "grpc_method": "Get"}
    assert value(reg, "grpc_client_handled_total", **lab, grpc_code="OK") == 3
    assert value(reg, "grpc_client_handling_seconds_count", **lab) == 2


def test_method_filter_and_shadow_mode_pass_everything() -> None:
    reg = CollectorRegistry()
    clock = MockClock()
    ctx = make_ctx(clock, method="Put", services=Services(metrics_registry=reg))
    engine = Metrics(ctx, {"enforce": False})
    w = wire(engine)
    w.tx_in.extend([call(1, clock), call(2, clock, method=PUT)])
    engine.do_work()
    assert w.ids("tx_out") == [1, 2]
    assert (
        value(reg, "grpc_client_started_total", app="kv", grpc_service="kv.KV", grpc_method="Get")
        == 0
    )
    assert (
        value(reg, "grpc_client_started_total", app="kv", grpc_service="kv.KV", grpc_method="Put")
        == 1
    )


def test_decompose_restore_keeps_inflight_latency() -> None:
    reg = CollectorRegistry()
    engine, w, clock = make(reg)
    c = call(5, clock)
    w.tx_in.append(c)
    engine.do_work()
    fresh = Metrics.restore(engine.ctx, engine.config, engine.decompose(), prev_version=1)
    wire(fresh, w)
    clock.advance(0.0002)
    w.rx_in.append(reply(c))
    fresh.do_work()
    lab = {"app": "kv", "grpc_service": "kv.KV", "grpc_method": "Get"}
    assert value(reg, "grpc_client_handling_seconds_sum", **lab) == pytest.approx(0.0002)
    assert fresh.handle_request({"op": "stats"})["stats"]["calls"] == 1
    assert "grpc_client_handled_total" in fresh.handle_request({"op": "scrape"})["text"]


def test_module_reload_keeps_the_registry_usable() -> None:
    reg = CollectorRegistry()
    engine, w, clock = make(reg)
    w.tx_in.append(call(1, clock))
    engine.do_work()
    default = metrics_mod.default_registry()
    reloaded = importlib.reload(metrics_mod)  # what a live upgrade does
    assert reloaded.default_registry() is default
    fresh = reloaded.ENGINE.restore(engine.ctx, engine.config, engine.decompose(), 1)
    wire(fresh, w)
    w.tx_in.append(call(2, clock))
    fresh.do_work()
    assert (
        value(reg, "grpc_client_started_total", app="kv", grpc_service="kv.KV", grpc_method="Get")
        == 2
    )


# ---------------------------------------------------------------------- exposition


def test_http_server_serves_metrics_on_an_ephemeral_port() -> None:
    reg = CollectorRegistry()
    engine, w, clock = make(reg, app="web")
    w.tx_in.append(call(1, clock, app="web"))
    engine.do_work()
    server, port = start_http_server(reg, "127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            body = resp.read().decode()
        assert 'grpc_client_started_total{app="web",grpc_method="Get"' in body
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
        assert err.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
