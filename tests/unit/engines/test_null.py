"""The null policy forwards everything, in order, unchanged."""

from __future__ import annotations

import pytest

from engines.null import ENGINE, NullPolicy
from libmrpc.status import ConfigError, StatusCode
from mrpcd.engine import MockClock, Rpc, RpcKind, Side, validate_engine_class
from tests.unit.engines import call, make_ctx, reply, wire


def test_is_a_valid_engine() -> None:
    assert validate_engine_class(ENGINE, "engines.null") is NullPolicy
    assert ENGINE.NAME == "null" and ENGINE.VERSION == 1


def test_config() -> None:
    assert NullPolicy.validate_config({}) == {"enforce": True}
    assert NullPolicy.validate_config({"enforce": False}) == {"enforce": False}
    with pytest.raises(ConfigError, match="null: unknown config key.*rate"):
        NullPolicy.validate_config({"rate": 1})
    with pytest.raises(ConfigError, match="enforce"):
        NullPolicy.validate_config({"enforce": "no"})


@pytest.mark.parametrize("side", [Side.SEND, Side.RECEIVE])
def test_forwards_everything_in_order(side: Side) -> None:
    clock = MockClock()
    engine = NullPolicy(make_ctx(clock, side=side), {})
    w = wire(engine)
    calls = [call(i, clock) for i in range(5)]
    reclaim = Rpc(kind=RpcKind.RECLAIM, app="kv", app_pid=1, call_id=99, method=None)
    w.tx_in.extend([*calls, reclaim])
    w.rx_in.extend(
        reply(c, StatusCode.NOT_FOUND if c.call_id == 2 else StatusCode.OK) for c in calls
    )
    assert engine.do_work() == 11
    assert list(w.tx_out) == [*calls, reclaim]
    assert w.ids("rx_out") == [0, 1, 2, 3, 4]
    assert not w.tx_in and not w.rx_in
    assert engine.do_work() == 0
    expected = 5 if side is Side.SEND else 0  # calls on the engine's own side are decided
    assert engine.statistics()["calls"] == expected
    assert engine.next_timer() is None and engine.flush() == 0


def test_decompose_restore_keeps_counters() -> None:
    clock = MockClock()
    ctx = make_ctx(clock)
    engine = NullPolicy(ctx, {})
    w = wire(engine)
    w.tx_in.extend(call(i, clock) for i in range(3))
    engine.do_work()
    fresh = NullPolicy.restore(ctx, {}, engine.decompose(), prev_version=1)
    assert fresh.statistics()["passed"] == 3


def test_requests() -> None:
    engine = NullPolicy(make_ctx(MockClock()), {})
    assert engine.handle_request({"op": "stats"})["stats"]["calls"] == 0
    with pytest.raises(ValueError, match="no command"):
        engine.handle_request({"op": "bogus"})
