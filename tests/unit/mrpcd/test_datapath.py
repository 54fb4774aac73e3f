"""Splicing engines into a live datapath: queued items survive insert, remove,
replace and teardown, in order, each exactly once."""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from libmrpc.status import StatusCode
from mrpcd.datapath import Datapath, DatapathError
from mrpcd.engine import (
    LIFECYCLE,
    Engine,
    EngineContext,
    EngineState,
    FrontendEngine,
    LifecycleError,
    MockClock,
    PolicyEngine,
    Reject,
    Rpc,
    RpcKind,
    Side,
    TransportEngine,
    Verdict,
)

APP = "kv"


def ctx(name: str, side: Side = Side.SEND) -> EngineContext:
    return EngineContext(
        engine_id=f"{APP}/{name}", app=APP, app_pid=1, clock=MockClock(), side=side
    )


class Frontend(FrontendEngine):
    """Stands in for the app side: tests put submitted items on ``tx_out`` and
    read delivered ones from ``rx_in``."""

    NAME = "test-frontend"

    def do_work(self) -> int:
        return 0


class Transport(TransportEngine):
    """Stands in for the network side: receives on ``tx_in``, delivers on ``rx_out``."""

    NAME = "test-transport"

    def do_work(self) -> int:
        return 0


class Pass(PolicyEngine):
    NAME = "test-pass"


class Hold(PolicyEngine):
    """Holds every CALL of its side until ``flush`` (or ``release_all``)."""

    NAME = "test-hold"

    def __init__(self, ctx: EngineContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.held: list[Rpc] = []

    def on_call(self, rpc: Rpc) -> Verdict:
        self.held.append(rpc)
        return Verdict.HOLD

    def flush(self) -> int:
        n = len(self.held)
        for rpc in self.held:
            self.release(rpc)
        self.held.clear()
        return n


class BrokenFlush(Hold):
    NAME = "test-broken-flush"

    def flush(self) -> int:
        raise RuntimeError("flush exploded")


def call(i: int) -> Rpc:
    return Rpc(kind=RpcKind.CALL, app=APP, app_pid=1, call_id=i, method=None)


def reply(i: int) -> Rpc:
    return Rpc(kind=RpcKind.REPLY, app=APP, app_pid=1, call_id=i, method=None)


def ids(items: Iterable[Rpc]) -> list[int]:
    return [r.call_id for r in items]


def make() -> tuple[Datapath, Frontend, Transport]:
    fe, tr = Frontend(ctx("frontend"), {}), Transport(ctx("transport"), {})
    return Datapath(APP, fe, tr), fe, tr


def submit(fe: Engine, rng: range) -> None:
    fe.tx_out.extend(call(i) for i in rng)


def deliver(tr: Engine, rng: range) -> None:
    tr.rx_out.extend(reply(i) for i in rng)


def run(dp: Datapath) -> None:
    while sum(e.do_work() for e in dp.engines):
        pass


def check_chain(dp: Datapath) -> None:
    """Neighbours share deques: ``a.tx_out is b.tx_in`` and ``b.rx_out is a.rx_in``."""
    for a, b in zip(dp.engines, dp.engines[1:]):
        assert a.tx_out is b.tx_in
        assert b.rx_out is a.rx_in


# ------------------------------------------------------------------ construction


def test_two_engine_chain() -> None:
    dp, fe, tr = make()
    check_chain(dp)
    assert dp.frontend is fe and dp.transport is tr and dp.policies == []
    submit(fe, range(3))
    deliver(tr, range(3))
    assert ids(tr.tx_in) == [0, 1, 2] and ids(fe.rx_in) == [0, 1, 2]
    assert not dp.reads_content()


# ------------------------------------------------------------------ insert


def test_insert_keeps_queued_items_in_order() -> None:
    """Items queued before the splice stay ahead of items that pass the new policy."""
    dp, fe, tr = make()
    submit(fe, range(5))
    deliver(tr, range(100, 105))
    policy = Pass(ctx("pass"), {})
    dp.insert(policy)
    check_chain(dp)
    assert dp.policies == [policy]
    submit(fe, range(5, 10))
    deliver(tr, range(105, 110))
    run(dp)
    assert ids(tr.tx_in) == list(range(10))
    assert ids(fe.rx_in) == list(range(100, 110))
    assert policy.counters["calls"] == 5  # the 5 queued before the insert went on unchanged


def test_insert_positions() -> None:
    dp, fe, tr = make()
    p1, p2, p3 = (Pass(ctx(f"p{i}"), {}) for i in (1, 2, 3))
    dp.insert(p1)
    dp.insert(p2)  # default: just before the transport
    dp.insert(p3, 1)  # right after the frontend
    assert dp.engines == [fe, p3, p1, p2, tr]
    check_chain(dp)
    submit(fe, range(4))
    run(dp)
    assert ids(tr.tx_in) == [0, 1, 2, 3]
    for bad in (0, 5, -1):
        with pytest.raises(
            DatapathError, match=f"position {bad} is outside the policy chain of 'kv'"
        ):
            dp.insert(Pass(ctx("bad"), {}), bad)
    assert dp.engines == [fe, p3, p1, p2, tr]


@pytest.mark.parametrize("state", ["upgrading", "closed"])
def test_insert_refused_unless_active(state: str) -> None:
    dp, fe, tr = make()
    dp.state = state
    with pytest.raises(DatapathError, match=f"can't attach to 'kv': datapath is {state}"):
        dp.insert(Pass(ctx("pass"), {}))
    assert dp.engines == [fe, tr]
    check_chain(dp)


# ------------------------------------------------------------------ remove


@pytest.mark.parametrize("side", [Side.SEND, Side.RECEIVE])
def test_remove_holding_policy_hands_everything_on(side: Side) -> None:
    """Held items, items waiting for the policy and items it already passed all come out
    the far end, in arrival order, none lost or duplicated."""
    dp, fe, tr = make()
    hold = Hold(ctx("hold", side), {})
    dp.insert(hold)
    if side is Side.SEND:
        submit(fe, range(5))
        deliver(tr, range(100, 103))  # replies are forwarded, never held
    else:
        tr.rx_out.extend(call(i) for i in range(5))  # incoming calls for a server app
        fe.tx_out.extend(reply(i) for i in range(100, 103))  # ...and its replies going out
    run(dp)
    assert len(hold.held) == 5
    if side is Side.SEND:
        submit(fe, range(5, 8))  # waiting in the policy's input
        deliver(tr, range(103, 105))
    else:
        tr.rx_out.extend(call(i) for i in range(5, 8))
        fe.tx_out.extend(reply(i) for i in range(103, 105))
    moved = dp.remove(hold)
    assert moved == 5 + 3 + 2
    assert dp.engines == [fe, tr]
    check_chain(dp)
    calls_out, other_out = (tr.tx_in, fe.rx_in) if side is Side.SEND else (fe.rx_in, tr.tx_in)
    assert ids(calls_out) == list(range(8))
    assert ids(other_out) == list(range(100, 105))
    submit(fe, range(200, 202))  # and the chain works without it
    assert ids(tr.tx_in)[-2:] == [200, 201]
    assert Counter(ids([*tr.tx_in, *fe.rx_in])) == Counter([*range(8), *range(100, 105), 200, 201])


def test_remove_one_of_several() -> None:
    dp, fe, tr = make()
    p1, hold, p3 = Pass(ctx("p1"), {}), Hold(ctx("hold"), {}), Pass(ctx("p3"), {})
    for p in (p1, hold, p3):
        dp.insert(p)
    submit(fe, range(6))
    run(dp)
    assert ids(hold.held) == list(range(6)) and not tr.tx_in
    dp.remove(hold)
    check_chain(dp)
    run(dp)
    assert ids(tr.tx_in) == list(range(6))
    assert dp.policies == [p1, p3]


def test_remove_non_policy_is_refused() -> None:
    dp, fe, tr = make()
    for engine in (fe, tr, Pass(ctx("stranger"), {})):
        with pytest.raises(DatapathError, match="engine is not a policy of 'kv'"):
            dp.remove(engine)


# ------------------------------------------------------------------ replace


def test_replace_keeps_queues() -> None:
    dp, fe, tr = make()
    old = Pass(ctx("v1"), {})
    dp.insert(old)
    submit(fe, range(3))  # in old.tx_in
    deliver(tr, range(100, 102))  # in old.rx_in
    queues = (old.tx_in, old.tx_out, old.rx_in, old.rx_out)
    new = Pass(ctx("v2"), {})
    dp.replace(old, new)
    assert dp.policies == [new]
    assert (new.tx_in, new.tx_out, new.rx_in, new.rx_out) == queues
    assert all(a is b for a, b in zip((new.tx_in, new.tx_out, new.rx_in, new.rx_out), queues))
    check_chain(dp)
    assert ids(new.tx_in) == [0, 1, 2] and ids(new.rx_in) == [100, 101]
    submit(fe, range(3, 5))
    run(dp)
    assert ids(tr.tx_in) == [0, 1, 2, 3, 4] and ids(fe.rx_in) == [100, 101]
    assert new.counters["calls"] == 5 and old.counters["calls"] == 0


def test_replace_unknown_engine() -> None:
    dp, _, _ = make()
    with pytest.raises(ValueError):
        dp.replace(Pass(ctx("a"), {}), Pass(ctx("b"), {}))


# ------------------------------------------------------------------ drain_all


def test_drain_all_returns_everything_exactly_once() -> None:
    dp, fe, tr = make()
    p1, hold = Pass(ctx("p1"), {}), Hold(ctx("hold"), {})
    dp.insert(p1)
    dp.insert(hold)
    submit(fe, range(4))
    run(dp)  # 0..3 now held by `hold`
    submit(fe, range(4, 7))  # in p1.tx_in
    p1.do_work()
    submit(fe, range(7, 9))  # in p1.tx_in again; 4..6 in hold.tx_in
    deliver(tr, range(100, 103))  # in hold.rx_in
    tr.tx_in.append(call(50))  # already at the transport
    fe.rx_in.append(reply(150))  # already at the frontend
    fe.tx_in.append(call(60))  # the unused ends are drained too
    tr.rx_in.append(reply(160))
    items = dp.drain_all()
    got = Counter(ids(items))
    want = [*range(9), *range(100, 103), 50, 150, 60, 160]
    assert got == Counter(want) and max(got.values()) == 1
    assert not hold.held
    for e in dp.engines:
        assert not (e.tx_in or e.tx_out or e.rx_in or e.rx_out)
    assert dp.drain_all() == []


def test_drain_all_survives_a_failing_flush(caplog: pytest.LogCaptureFixture) -> None:
    dp, fe, tr = make()
    dp.insert(BrokenFlush(ctx("broken"), {}))
    dp.insert(Pass(ctx("p"), {}))
    submit(fe, range(3))
    deliver(tr, range(100, 102))
    with caplog.at_level(logging.ERROR, logger="mrpcd.datapath"):
        items = dp.drain_all()
    assert sorted(ids(items)) == [0, 1, 2, 100, 101]
    assert "flush of test-broken-flush failed during teardown" in caplog.text


# ------------------------------------------------------------------ describe


def test_describe() -> None:
    dp, fe, _ = make()
    dp.insert(Pass(ctx("pass"), {}))
    submit(fe, range(2))
    rows = dp.describe()
    assert [r["engine"] for r in rows] == ["test-frontend", "test-pass", "test-transport"]
    assert rows[1] == {
        "id": "kv/pass",
        "engine": "test-pass",
        "version": 1,
        "module": __name__,
        "side": "send",
        "method": None,
        "config": {},
        "queued": 2,
    }


def test_rejected_call_goes_back_to_the_app() -> None:
    """A send-side policy's error reply travels the rx deques back to the frontend."""

    class DenyEven(PolicyEngine):
        NAME = "test-deny-even"

        def on_call(self, rpc: Rpc) -> Verdict | Reject:
            return (
                Reject(StatusCode.PERMISSION_DENIED, "even")
                if rpc.call_id % 2 == 0
                else Verdict.PASS
            )

    dp, fe, tr = make()
    dp.insert(Pass(ctx("p"), {}))
    dp.insert(DenyEven(ctx("deny"), {}), 1)
    submit(fe, range(4))
    run(dp)
    assert ids(tr.tx_in) == [1, 3]
    assert [(r.kind, r.call_id, r.status) for r in fe.rx_in] == [
        (RpcKind.REPLY, 0, StatusCode.PERMISSION_DENIED),
        (RpcKind.REPLY, 2, StatusCode.PERMISSION_DENIED),
    ]


# ------------------------------------------------------------------ the boundary


class Reader(Pass):
    NAME = "test-reader"
    READS_CONTENT = True


def test_the_inbox_survives_every_splice_and_only_the_transport_drains_it() -> None:
    """Other threads append to the inbox (AppPort.deliver) at any time: a splice
    must never swap it out, or a delivered item would land in a dead deque."""
    inbox: deque[Rpc] = deque()
    fe, tr = Frontend(ctx("frontend"), {}), Transport(ctx("transport"), {})
    dp = Datapath(APP, fe, tr, inbox=inbox)
    engines = [Pass(ctx(f"p{i}"), {}) for i in range(3)]
    for p in engines:
        dp.insert(p)
        assert tr.rx_in is inbox
    dp.remove(engines[1])
    dp.replace(engines[0], Pass(ctx("p0b"), {}))
    assert tr.rx_in is inbox and all(e.rx_in is not inbox for e in dp.engines[:-1])


def test_the_frontend_hears_when_content_policies_come_and_go() -> None:
    calls: list[bool] = []

    class Fe(Frontend):
        def need_private_images(self, on: bool) -> None:
            calls.append(on)
            super().need_private_images(on)

    fe = Fe(ctx("frontend"), {})
    dp = Datapath(APP, fe, Transport(ctx("transport"), {}))
    plain, reader = Pass(ctx("plain"), {}), Reader(ctx("reader"), {})
    dp.insert(plain)
    dp.insert(reader)
    assert fe.private_images and dp.reads_content()
    dp.remove(reader)
    assert not fe.private_images
    assert calls == [False, True, False]  # once at creation, then once per change


def test_lifecycle_follows_the_table_and_refuses_the_rest() -> None:
    dp, fe, tr = make()
    assert fe.state is EngineState.ATTACHED and tr.state is EngineState.ATTACHED
    p = Pass(ctx("p"), {})
    assert p.state is EngineState.LOADED
    dp.insert(p)
    assert p.state is EngineState.ATTACHED
    new = Pass(ctx("p2"), {})
    dp.replace(p, new)
    assert p.state is EngineState.DETACHED and new.state is EngineState.ATTACHED
    with pytest.raises(LifecycleError, match="cannot attach when detached"):
        dp.insert(p)  # a retired engine never comes back
    dp.remove(new)
    assert new.state is EngineState.DETACHED
    for moves in LIFECYCLE.values():  # every target is a state; detached is final
        assert all(dst in LIFECYCLE for dst in moves.values())
    assert LIFECYCLE[EngineState.DETACHED] == {}


def test_always_on_engines_are_decided_by_class() -> None:
    dp, _fe, tr = make()
    with pytest.raises(DatapathError, match="always on"):
        dp.insert(Transport(ctx("another-transport"), {}))
    with pytest.raises(DatapathError, match="cannot take the place"):
        dp.replace(tr, Pass(ctx("p"), {}))  # a policy cannot become the transport
    dp.replace(tr, Transport(ctx("transport-v2"), {}))  # a transport can (live upgrade)
    assert isinstance(dp.transport, Transport) and dp.transport is not tr
