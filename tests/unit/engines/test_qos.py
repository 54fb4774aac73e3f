"""QoS: priority calls pass, bulk waits while priority traffic is active, bounded delay."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from engines.qos import ENGINE, Qos, QosScheduler
from libmrpc.status import ConfigError
from mrpcd.engine import MockClock, validate_engine_class
from tests.unit.engines import Wires, call, make_ctx, reply, wire

SMALL, BULK = 100, 64 * 1024
BUDGET = 150 * 1024  # two 64 KiB bulk calls per turn


class Runtime:
    """qos instances of several apps sharing one runtime_local dict and one clock."""

    def __init__(self) -> None:
        self.clock = MockClock()
        self.local: dict[str, Any] = {}

    def add(self, app: str, **config: Any) -> tuple[Qos, Wires]:
        cfg = {"bulk_budget_bytes": BUDGET, **config}
        engine = Qos(
            make_ctx(self.clock, app=app, engine_id=f"{app}/qos-1", runtime_local=self.local), cfg
        )
        return engine, wire(engine)

    def send(self, engine: Qos, w: Wires, i: int, size: int) -> None:
        w.tx_in.append(call(i, self.clock, app=engine.ctx.app, size=size))
        engine.do_work()


# ---------------------------------------------------------------------- config


def test_valid_engine_and_defaults() -> None:
    assert validate_engine_class(ENGINE, "engines.qos") is Qos
    assert Qos.validate_config({}) == {
        "enforce": True,
        "small_threshold": 4096,
        "latency_sensitive": False,
        "bulk_budget_bytes": 262144,
        "priority_window": 0.001,
        "max_delay": 0.002,
        "max_held": 10_000,
        "bulk_inflight": None,
    }
    assert Qos.validate_config({"max_delay": "5ms", "priority_window": "500us"})[
        "max_delay"
    ] == pytest.approx(0.005)


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"threshold": 1}, "qos: unknown config key.*threshold"),
        ({"small_threshold": -1}, "small_threshold: expected an integer >= 0"),
        ({"small_threshold": "4k"}, "small_threshold"),
        ({"bulk_budget_bytes": 0}, "bulk_budget_bytes"),
        ({"latency_sensitive": "yes"}, "latency_sensitive: expected true or false"),
        ({"max_delay": 0}, "max_delay: expected seconds > 0"),
        ({"priority_window": "soon"}, "priority_window"),
        ({"max_held": True}, "max_held"),
    ],
)
def test_bad_config(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        Qos.validate_config(config)


def test_instances_share_one_scheduler() -> None:
    rt = Runtime()
    a, _ = rt.add("a")
    b, _ = rt.add("b")
    assert a.scheduler is b.scheduler is rt.local["qos"]
    assert a.handle_request({"op": "scheduler"})["instances"] == 2
    b.close()
    assert a.scheduler.instances == 1


def test_a_compatible_scheduler_from_another_version_is_shared() -> None:
    rt = Runtime()
    old = rt.local["qos"] = SimpleNamespace(last_priority=rt.clock.now(), instances=3)
    a, w = rt.add("a")
    assert a.scheduler is old and old.instances == 4
    rt.send(a, w, 1, BULK)  # priority is active per the old scheduler's stamp
    assert not w.tx_out


def test_an_incompatible_scheduler_is_replaced_keeping_its_signal() -> None:
    rt = Runtime()
    rt.local["qos"] = SimpleNamespace(last_priority=rt.clock.now())
    a, w = rt.add("a")
    assert isinstance(a.scheduler, QosScheduler) and rt.local["qos"] is a.scheduler
    rt.send(a, w, 1, BULK)
    assert not w.tx_out


# ---------------------------------------------------------------------- scheduling


def test_bulk_passes_when_no_priority_traffic() -> None:
    rt = Runtime()
    b, w = rt.add("b")
    for i in range(3):
        rt.send(b, w, i, BULK)
    assert w.ids("tx_out") == [0, 1, 2] and b.next_timer() is None
    assert b.statistics()["bulk_direct"] == 3


def test_bulk_waits_while_another_app_has_priority_traffic() -> None:
    rt = Runtime()
    a, wa = rt.add("a")
    b, wb = rt.add("b")
    rt.send(a, wa, 1, SMALL)
    assert wa.ids("tx_out") == [1]
    rt.send(b, wb, 10, BULK)
    rt.send(b, wb, 11, SMALL)  # small calls of a bulk app still go first
    assert wb.ids("tx_out") == [11]
    assert b.next_timer() == pytest.approx(rt.clock.now() + 0.001)  # end of priority window
    rt.clock.advance(0.0005)
    assert b.do_work() == 0
    rt.clock.advance(0.0005)
    assert b.do_work() == 1
    assert wb.ids("tx_out") == [11, 10] and b.next_timer() is None


def test_latency_sensitive_app_is_all_priority() -> None:
    rt = Runtime()
    a, wa = rt.add("a", latency_sensitive=True)
    b, wb = rt.add("b")
    rt.send(a, wa, 1, BULK)
    rt.send(b, wb, 2, BULK)
    assert wa.ids("tx_out") == [1] and not wb.tx_out
    assert a.statistics()["priority"] == 1 and b.statistics()["bulk"] == 1


def test_max_delay_bounds_the_wait_under_continuous_priority_traffic() -> None:
    rt = Runtime()
    a, wa = rt.add("a")
    b, wb = rt.add("b")
    rt.send(b, wb, 0, BULK)  # no priority yet: passes
    rt.send(a, wa, 1, SMALL)
    rt.send(b, wb, 2, BULK)
    held_at = rt.clock.now()
    for i in range(3, 30):  # a small call every 100 us keeps priority active
        rt.clock.advance(0.0001)
        rt.send(a, wa, i, SMALL)
        b.do_work()
        if rt.clock.now() - held_at < 0.002 - 1e-9:
            assert wb.ids("tx_out") == [0]
            assert b.next_timer() == pytest.approx(held_at + 0.002)
    assert wb.ids("tx_out") == [0, 2]
    assert b.statistics()["released_overdue"] == 1


def test_bulk_apps_take_byte_budgeted_turns() -> None:
    rt = Runtime()
    a, wa = rt.add("a")
    b, wb = rt.add("b")
    c, wc = rt.add("c")
    rt.send(a, wa, 0, SMALL)
    for i in range(5):
        rt.send(b, wb, 100 + i, BULK)
        rt.send(c, wc, 200 + i, BULK)
    rt.clock.advance(0.001)
    assert b.next_timer() == rt.clock.now()  # a budgeted turn is due now
    assert (b.do_work(), c.do_work()) == (2, 2)  # 150 KiB budget: two 64 KiB calls each
    assert (b.do_work(), c.do_work()) == (2, 2)
    assert (b.do_work(), c.do_work()) == (1, 1)
    assert wb.ids("tx_out") == [100, 101, 102, 103, 104]
    assert wc.ids("tx_out") == [200, 201, 202, 203, 204]


def test_a_call_bigger_than_the_budget_still_moves() -> None:
    rt = Runtime()
    a, wa = rt.add("a")
    b, wb = rt.add("b", bulk_budget_bytes=1000)
    rt.send(a, wa, 0, SMALL)
    rt.send(b, wb, 1, BULK)
    rt.clock.advance(0.001)
    assert b.do_work() == 1 and wb.ids("tx_out") == [1]


def test_max_held_releases_the_oldest_early() -> None:
    rt = Runtime()
    a, wa = rt.add("a")
    b, wb = rt.add("b", max_held=2)
    rt.send(a, wa, 0, SMALL)
    for i in range(1, 5):
        rt.send(b, wb, i, BULK)
    assert wb.ids("tx_out") == [1, 2] and b.statistics()["overflow"] == 2


def test_replies_pass_untouched() -> None:
    rt = Runtime()
    b, wb = rt.add("b")
    wb.rx_in.append(reply(call(7, rt.clock), size=BULK))
    b.do_work()
    assert wb.ids("rx_out") == [7]


def test_shadow_mode_counts_would_hold() -> None:
    rt = Runtime()
    a, wa = rt.add("a")
    b, wb = rt.add("b", enforce=False)
    rt.send(a, wa, 0, SMALL)
    rt.send(b, wb, 1, BULK)
    assert wb.ids("tx_out") == [1] and b.statistics()["would_hold"] == 1


# ---------------------------------------------------------------------- flush, upgrade


def test_flush_releases_all_in_order() -> None:
    rt = Runtime()
    a, wa = rt.add("a")
    b, wb = rt.add("b")
    rt.send(a, wa, 0, SMALL)
    for i in range(1, 6):
        rt.send(b, wb, i, BULK)
    assert b.flush() == 5 and wb.ids("tx_out") == [1, 2, 3, 4, 5]
    assert b.next_timer() is None and b.statistics()["flushed"] == 5


def test_decompose_restore_hands_over_held_calls_once() -> None:
    rt = Runtime()
    a, wa = rt.add("a")
    b, wb = rt.add("b")
    rt.send(a, wa, 0, SMALL)
    for i in range(1, 4):
        rt.send(b, wb, i, BULK)
    state = b.decompose()
    fresh = Qos.restore(b.ctx, b.config, state, prev_version=1)
    assert isinstance(fresh, Qos)
    fresh.load_state(state, 1)  # idempotent: no duplicates
    wire(fresh, wb)
    assert fresh.scheduler is a.scheduler and fresh.statistics()["held_now"] == 3
    rt.clock.advance(0.002)
    fresh.do_work()
    assert wb.ids("tx_out") == [1, 2, 3] and fresh.flush() == 0
    assert fresh.statistics()["hold_seconds"] == pytest.approx(0.006)


# ---------------------------------------------------------------- bulk_inflight (in-flight cap)


def test_bulk_inflight_caps_calls_in_flight_and_replies_admit_more() -> None:
    from collections import deque as _dq

    from engines.qos import Qos
    from mrpcd.engine import EngineContext, MethodRef, MockClock, Rpc, RpcKind, Side

    clock = MockClock()
    eng = Qos(
        EngineContext("bulk/qos-1", "bulk", 1, clock, side=Side.SEND),
        {"bulk_inflight": 2, "small_threshold": 100},
    )
    tx_in, tx_out, rx_in, rx_out = _dq(), _dq(), _dq(), _dq()
    eng.bind(tx_in, tx_out, rx_in, rx_out)
    m = MethodRef(0, "s.S", "M", "/s.S/M", "s.A", "s.B")
    for i in range(5):
        tx_in.append(Rpc(RpcKind.CALL, "bulk", 1, i, m, size=32768))
    tx_in.append(Rpc(RpcKind.CALL, "bulk", 1, 99, m, size=10))  # small: never waits
    eng.do_work()
    assert [r.call_id for r in tx_out] == [0, 1, 99]
    assert eng.next_timer() is None  # driven by replies, not by time
    clock.advance(10.0)
    eng.do_work()
    assert len(tx_out) == 3  # no time-based release in cap mode
    rx_in.append(Rpc(RpcKind.REPLY, "bulk", 1, 0, m))
    eng.do_work()
    assert [r.call_id for r in tx_out] == [0, 1, 99, 2] and [r.call_id for r in rx_out] == [0]
    state = eng.decompose()
    fresh = Qos.restore(eng.ctx, eng.config, state, Qos.VERSION)
    fresh.bind(tx_in, tx_out, rx_in, rx_out)
    rx_in.extend(Rpc(RpcKind.REPLY, "bulk", 1, i, m) for i in (1, 2))
    fresh.do_work()
    assert [r.call_id for r in tx_out] == [0, 1, 99, 2, 3, 4]
    assert fresh.statistics()["bulk_in_flight"] == 2 and fresh.statistics()["held_now"] == 0


def test_bulk_inflight_validation() -> None:
    import pytest as _pt

    from engines.qos import Qos
    from libmrpc.status import ConfigError

    assert Qos.validate_config({})["bulk_inflight"] is None
    assert Qos.validate_config({"bulk_inflight": 16})["bulk_inflight"] == 16
    for bad in (0, -1, True, "8"):
        with _pt.raises(ConfigError, match="bulk_inflight"):
            Qos.validate_config({"bulk_inflight": bad})
