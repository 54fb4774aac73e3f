"""Token-bucket rate limit: config, reject and delay modes, shadow mode, upgrade state."""

from __future__ import annotations

from typing import Any

import pytest

from engines.ratelimit import ENGINE, RateLimit, parse_duration
from libmrpc.status import ConfigError, StatusCode
from mrpcd.engine import MockClock, Side, validate_engine_class
from tests.unit.engines import GET, PUT, call, make_ctx, reply, wire

RATE_500 = {"max_tokens": 50, "tokens_per_fill": 50, "fill_interval": "100ms"}


def make(
    config: dict[str, Any], *, side: Side = Side.SEND, clock: MockClock | None = None
) -> tuple[RateLimit, Any, MockClock]:
    clock = clock or MockClock()
    engine = RateLimit(make_ctx(clock, side=side, engine_id="kv/ratelimit-1"), config)
    return engine, wire(engine), clock


# ---------------------------------------------------------------------- config


def test_valid_engine_and_defaults() -> None:
    assert validate_engine_class(ENGINE, "engines.ratelimit") is RateLimit
    assert RateLimit.validate_config({"max_tokens": 10}) == {
        "enforce": True,
        "max_tokens": 10,
        "tokens_per_fill": 10,
        "fill_interval": 1.0,
        "mode": "reject",
        "per_method": False,
        "max_held": 10_000,
    }


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (0.5, 0.5),
        (2, 2.0),
        ("1s", 1.0),
        ("100ms", 0.1),
        ("250us", 0.00025),
        ("1.5", 1.5),
        (" 2 s ", 2.0),
        ("1m", 60.0),
    ],
)
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)
    cfg = RateLimit.validate_config({"max_tokens": 1, "fill_interval": raw})
    assert cfg["fill_interval"] == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"max_tokens": 1, "burst": 3}, "unknown config key.*burst"),
        ({}, "max_tokens: required"),
        ({"max_tokens": 0}, "max_tokens: expected an integer >= 1, got 0"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 1, "tokens_per_fill": 0}, "tokens_per_fill"),
        ({"max_tokens": 1, "fill_interval": 0}, "fill_interval: expected seconds > 0"),
        ({"max_tokens": 1, "fill_interval": "-1s"}, "fill_interval"),
        ({"max_tokens": 1, "fill_interval": "soon"}, "fill_interval.*'soon'"),
        ({"max_tokens": 1, "fill_interval": float("inf")}, "fill_interval"),
        ({"max_tokens": 1, "mode": "drop"}, "mode: expected reject or delay, got 'drop'"),
        ({"max_tokens": 1, "per_method": "yes"}, "per_method"),
        ({"max_tokens": 1, "max_held": -1}, "max_held"),
        ({"max_tokens": 1, "enforce": "no"}, "enforce"),
    ],
)
def test_bad_config(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^ratelimit: {key}"):
        RateLimit.validate_config(config)


# ---------------------------------------------------------------------- reject mode


def test_reject_mode_refuses_excess_at_once() -> None:
    engine, w, clock = make({"max_tokens": 3, "tokens_per_fill": 1, "fill_interval": 1})
    w.tx_in.extend(call(i, clock) for i in range(5))
    assert engine.do_work() == 5
    assert w.ids("tx_out") == [0, 1, 2]
    assert w.ids("rx_out") == [3, 4]
    err = w.rx_out[0]
    assert err.status is StatusCode.RESOURCE_EXHAUSTED
    assert "kv/ratelimit-1" in err.details and "1 calls per 1s (burst 3)" in err.details
    assert "retry" in err.details and "mrpcctl" in err.details
    assert engine.next_timer() is None  # nothing held: no timer in reject mode
    clock.advance(0.999)
    w.tx_in.append(call(5, clock))
    engine.do_work()
    assert w.ids("rx_out") == [3, 4, 5]
    clock.advance(0.001)  # one fill: one more token
    w.tx_in.extend([call(6, clock), call(7, clock)])
    engine.do_work()
    assert w.ids("tx_out") == [0, 1, 2, 6]
    assert engine.statistics()["rejected"] == 4


def test_receive_side_rejects_toward_the_network_and_passes_replies() -> None:
    engine, w, clock = make({"max_tokens": 1}, side=Side.RECEIVE)
    w.rx_in.extend([call(1, clock), call(2, clock)])
    w.tx_in.append(reply(call(9, clock)))
    engine.do_work()
    assert w.ids("rx_out") == [1]
    assert w.ids("tx_out") == [9, 2]
    assert w.tx_out[1].status is StatusCode.RESOURCE_EXHAUSTED


def test_2000_per_second_offered_converges_to_500_per_second() -> None:
    engine, w, clock = make(RATE_500)
    for i in range(20_000):  # 10 simulated seconds at 2000 calls/s
        clock.advance(0.0005)
        w.tx_in.append(call(i, clock))
        engine.do_work()
    rate = len(w.tx_out) / 10.0
    assert rate == pytest.approx(500, rel=0.10)
    assert len(w.tx_out) + len(w.rx_out) == 20_000


def test_per_method_buckets_are_independent() -> None:
    engine, w, clock = make({"max_tokens": 2, "per_method": True})
    w.tx_in.extend(
        [
            call(1, clock),
            call(2, clock),
            call(3, clock),
            call(4, clock, method=PUT),
            call(5, clock, method=PUT),
        ]
    )
    engine.do_work()
    assert w.ids("tx_out") == [1, 2, 4, 5]
    assert "method /kv.KV/Get" in w.rx_out[0].details
    assert engine.handle_request({"op": "buckets"})["buckets"]["/kv.KV/Put"]["tokens"] == 0


def test_shadow_reject_counts_and_passes() -> None:
    engine, w, clock = make({"max_tokens": 2, "enforce": False})
    w.tx_in.extend(call(i, clock) for i in range(5))
    engine.do_work()
    assert w.ids("tx_out") == [0, 1, 2, 3, 4] and not w.rx_out
    stats = engine.statistics()
    assert stats["would_reject"] == 3 and stats["rejected"] == 0


# ---------------------------------------------------------------------- delay mode


def delayed(**extra: Any) -> tuple[RateLimit, Any, MockClock]:
    return make(
        {"max_tokens": 2, "tokens_per_fill": 1, "fill_interval": 0.1, "mode": "delay", **extra}
    )


def test_delay_mode_holds_in_fifo_order_and_releases_on_fills() -> None:
    engine, w, clock = delayed()
    w.tx_in.extend(call(i, clock) for i in range(5))
    engine.do_work()
    assert w.ids("tx_out") == [0, 1] and not w.rx_out
    assert engine.statistics()["held_now"] == 3
    assert engine.next_timer() == pytest.approx(clock.now() + 0.1)
    clock.advance(0.05)
    w.tx_in.append(call(5, clock))  # must queue behind the held calls
    assert engine.do_work() == 1
    assert w.ids("tx_out") == [0, 1]
    clock.advance(0.05)
    engine.do_work()
    assert w.ids("tx_out") == [0, 1, 2]
    clock.advance(0.25)  # two more fills (bucket caps at 2 tokens)
    engine.do_work()
    assert w.ids("tx_out") == [0, 1, 2, 3, 4]
    assert engine.next_timer() == pytest.approx(engine.decompose()["buckets"][""][1] + 0.1)
    clock.advance(0.1)
    engine.do_work()
    assert w.ids("tx_out") == [0, 1, 2, 3, 4, 5]
    assert engine.next_timer() is None
    assert engine.statistics()["released"] == 4


def test_held_calls_past_their_deadline_fail() -> None:
    engine, w, clock = delayed()
    now = clock.now()
    w.tx_in.extend(
        [
            call(0, clock),
            call(1, clock),
            call(2, clock, deadline=now + 0.05),
            call(3, clock, deadline=now + 1),
            call(4, clock),
        ]
    )
    engine.do_work()
    assert engine.next_timer() == pytest.approx(now + 0.05)
    clock.advance(0.06)
    engine.do_work()
    assert w.ids("rx_out") == [2]
    assert w.rx_out[0].status is StatusCode.DEADLINE_EXCEEDED
    assert "kv/ratelimit-1" in w.rx_out[0].details
    clock.advance(0.04)
    engine.do_work()
    assert w.ids("tx_out") == [0, 1, 3]
    assert engine.statistics()["expired"] == 1


def test_flush_releases_everything_held() -> None:
    engine, w, clock = delayed()
    w.tx_in.extend(call(i, clock) for i in range(6))
    engine.do_work()
    assert engine.flush() == 4
    assert w.ids("tx_out") == [0, 1, 2, 3, 4, 5]
    assert engine.next_timer() is None and engine.flush() == 0


def test_delay_queue_is_bounded() -> None:
    engine, w, clock = delayed(max_held=2)
    w.tx_in.extend(call(i, clock) for i in range(6))
    engine.do_work()
    assert w.ids("rx_out") == [4, 5]
    assert "delay queue full" in w.rx_out[0].details
    assert engine.statistics()["overflow"] == 2


def test_shadow_delay_counts_would_hold() -> None:
    engine, w, clock = delayed(enforce=False)
    w.tx_in.extend(call(i, clock) for i in range(5))
    engine.do_work()
    assert w.ids("tx_out") == [0, 1, 2, 3, 4]
    assert engine.statistics()["would_hold"] == 3 and engine.next_timer() is None


# ---------------------------------------------------------------------- config updates, upgrade


def test_update_config_keeps_tokens_clamped_and_is_all_or_nothing() -> None:
    engine, w, clock = make({"max_tokens": 10, "tokens_per_fill": 1, "fill_interval": 1})
    w.tx_in.extend(call(i, clock) for i in range(3))
    engine.do_work()  # 7 tokens left
    engine.update_config({"max_tokens": 5})
    assert engine.handle_request({"op": "buckets"})["buckets"][""]["tokens"] == 5
    before = dict(engine.config)
    with pytest.raises(ConfigError, match="fill_interval"):
        engine.update_config({"max_tokens": 100, "fill_interval": "never"})
    assert engine.config == before
    assert engine.handle_request({"op": "buckets"})["buckets"][""]["tokens"] == 5


def test_toggling_per_method_keeps_held_calls_in_order() -> None:
    engine, w, clock = delayed()
    w.tx_in.extend(call(i, clock, method=GET if i % 2 else PUT) for i in range(6))
    engine.do_work()
    engine.update_config({"per_method": True})
    assert engine.flush() == 4
    assert w.ids("tx_out") == [0, 1, 2, 4, 3, 5]  # FIFO per bucket: Put's, then Get's
    assert sorted(w.ids("tx_out")) == list(range(6))


def test_decompose_restore_moves_held_calls_without_loss_or_duplication() -> None:
    engine, w, clock = delayed()
    w.tx_in.extend(call(i, clock) for i in range(7))
    engine.do_work()
    state = engine.decompose()
    assert [rpc.call_id for _, rpc in state["held"]] == [2, 3, 4, 5, 6]
    fresh = RateLimit.restore(engine.ctx, engine.config, state, prev_version=1)
    assert isinstance(fresh, RateLimit) and fresh is not engine
    fresh.load_state(state, 1)  # applying the same state twice must not duplicate
    wire(fresh, w)
    assert fresh.statistics()["held_now"] == 5 and fresh.statistics()["held"] == 5
    clock.advance(0.1)
    fresh.do_work()
    assert w.ids("tx_out") == [0, 1, 2]
    assert fresh.flush() == 4
    assert w.ids("tx_out") == list(range(7))
    assert fresh.handle_request({"op": "stats"})["stats"]["released"] == 1


def test_restore_rejects_newer_state_it_cannot_read() -> None:
    engine, _, _ = delayed()
    newer = {**engine.decompose(), "windows": {}}  # a v2 that keeps more than v1 knows
    assert "windows" in (RateLimit.check_compatible(2, newer) or "")
    with pytest.raises(ValueError, match="v2"):
        RateLimit.restore(engine.ctx, engine.config, newer, prev_version=2)
    # a newer state of the same shape is taken (rolling back v2 -> v1)
    assert RateLimit.check_compatible(2, engine.decompose()) is None
    RateLimit.restore(engine.ctx, engine.config, engine.decompose(), prev_version=2)
