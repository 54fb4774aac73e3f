"""The frontend's metadata intake, deadline clock conversion and cancellation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from engines.frontend import Frontend
from libmrpc.status import StatusCode
from libmrpc.wire import metadata as md
from libmrpc.wire.ring import DESCRIPTOR, SUB_CALL, SUB_CANCEL, SUBF_METADATA
from mrpcd.appstate import ConnSpec
from mrpcd.engine import MockClock, RpcKind
from tests.unit.engines import test_engines_core as core
from tests.unit.engines.test_engines_core import _engine, echo


@pytest.fixture
def app_pair() -> Iterator[Any]:
    yield from core.app_pair.__wrapped__()


def _frontend(state: Any) -> Frontend:
    state.conns[1] = ConnSpec(1, "127.0.0.1", 9, 0)
    return _engine(Frontend, state, MockClock(), max_metadata_size=256)


def _block(app: Any, data: bytes) -> int:
    off = app.heap.alloc(len(data))
    app.heap.buf[off : off + len(data)] = data
    return off


def test_an_app_deadline_lands_on_the_daemon_clock(app_pair: Any) -> None:
    state, app, _ = app_pair
    fe = _frontend(state)  # a MockClock at 1000 s, far from CLOCK_MONOTONIC
    req = echo.EchoRequest.new(app.heap, payload=b"hi")
    app.submit.push(
        DESCRIPTOR, SUB_CALL, 0, 0, 1, 1, 0, 0, req._off, 0, time.monotonic_ns() + 5 * 10**9
    )
    fe.do_work()
    (rpc,) = fe.tx_out
    assert rpc.kind is RpcKind.CALL and rpc.deadline == pytest.approx(
        fe.ctx.clock.now() + 5, abs=0.5
    )


def test_metadata_is_decoded_once_and_bad_blocks_fail_only_their_call(app_pair: Any) -> None:
    state, app, _ = app_pair
    fe = _frontend(state)
    req = echo.EchoRequest.new(app.heap, payload=b"hi")
    good = _block(app, md.encode([("authorization", "Bearer x"), ("t-bin", b"\x00\x01")]))
    big = _block(app, md.encode([("k", "v" * 300)]))
    bad = _block(app, md.encode([("Upper", "v")]))
    trunc = _block(app, (1000).to_bytes(4, "little"))
    for cid, off in ((1, good), (2, big), (3, bad), (4, trunc), (5, 3)):
        app.submit.push(DESCRIPTOR, SUB_CALL, SUBF_METADATA, 0, 1, cid, 0, 0, req._off, off, 0)
    fe.do_work()
    (rpc,) = fe.tx_out
    assert rpc.call_id == 1 and rpc.metadata == (
        ("authorization", "Bearer x"),
        ("t-bin", b"\x00\x01"),
    )
    fe.do_work()
    codes = {d[4]: d[2] for d in app.complete.pop_batch(DESCRIPTOR)}
    assert codes == {
        2: StatusCode.RESOURCE_EXHAUSTED,
        3: StatusCode.INVALID_ARGUMENT,
        4: StatusCode.RESOURCE_EXHAUSTED,
        5: StatusCode.INVALID_ARGUMENT,
    }


def test_a_cancel_marks_the_call_and_tells_the_transport(app_pair: Any) -> None:
    state, app, _ = app_pair
    fe = _frontend(state)
    cancelled = []
    state.datapath = type(
        "DP",
        (),
        {
            "transport": type("T", (), {"cancel": staticmethod(cancelled.append)})(),
            "content": False,
        },
    )()
    req = echo.EchoRequest.new(app.heap, payload=b"hi")
    app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, 1, 0, 0, req._off, 0, 0)
    fe.do_work()
    for _ in range(2):  # a second cancel is a no-op; so is one for an unknown id
        app.submit.push(DESCRIPTOR, SUB_CANCEL, 0, 0, 0, 1, 0, 0, 0, 0, 0)
    app.submit.push(DESCRIPTOR, SUB_CANCEL, 0, 0, 0, 99, 0, 0, 0, 0, 0)
    fe.do_work()
    (rpc,) = fe.tx_out
    assert rpc._cancelled and cancelled == [rpc]
