"""The frontend's admission control, on real rings in one process (no network)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from engines.frontend import Frontend
from libmrpc.status import StatusCode
from libmrpc.wire.ring import (
    CMP_RECLAIM,
    CMP_REPLY,
    CMPF_DUPLICATE,
    DESCRIPTOR,
    SUB_CALL,
    SUB_REPLY,
)
from mrpcd.engine import DEFAULT_LIMITS, ConnSpec, MockClock, Rpc, RpcKind
from tests.unit.engines import test_engines_core as core
from tests.unit.engines.test_engines_core import _engine, echo


@pytest.fixture
def app_pair() -> Iterator[Any]:
    yield from core.app_pair.__wrapped__()


def _frontend(state, **limits):
    state.conns[1] = ConnSpec(1, "127.0.0.1", 9, 0)
    return _engine(
        Frontend, state, MockClock(), limits=dataclasses.replace(DEFAULT_LIMITS, **limits)
    )


def _reply(fe, call_id):
    fe.rx_in.append(
        Rpc(RpcKind.REPLY, "t", 1, call_id, None, status=StatusCode.ABORTED, details="x")
    )


def test_calls_over_the_quota_wait_in_the_ring_and_replies_behind_them_are_taken(app_pair) -> None:
    state, app, _ = app_pair
    fe = _frontend(state, calls_in_flight=3)
    req = echo.EchoRequest.new(app.heap, payload=b"hi")
    for cid in range(1, 6):
        app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, cid, 0, 0, req._off, 0, 0)
    app.submit.push(DESCRIPTOR, SUB_REPLY, 0, 0, 0, 99, 0, 0, 0, 0, 0)  # an unknown token
    fe.do_work()
    assert [r.call_id for r in fe.tx_out] == [1, 2, 3]  # 4 and 5 wait
    assert fe.held and fe.prepare_sleep() is False  # no busy loop while held
    assert [d[0] for d in app.complete.pop_batch(DESCRIPTOR)] == [
        CMP_RECLAIM
    ]  # the reply was taken
    _reply(fe, 1)
    fe.do_work()  # the completion frees a slot ...
    fe.do_work()  # ... and call 4 goes
    assert [r.call_id for r in fe.tx_out] == [1, 2, 3, 4]


def test_a_duplicate_id_is_refused_with_a_flag_and_keeps_the_original(app_pair) -> None:
    state, app, _ = app_pair
    fe = _frontend(state)
    req = echo.EchoRequest.new(app.heap, payload=b"hi")
    for _ in range(2):
        app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, 7, 0, 0, req._off, 0, 0)
    fe.do_work()
    (done,) = app.complete.pop_batch(DESCRIPTOR)
    assert (
        done[0] == CMP_REPLY
        and done[1] == CMPF_DUPLICATE
        and done[2] == StatusCode.INVALID_ARGUMENT
    )
    assert 7 in state.inflight
    app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, 7, 0, 0, req._off, 0, 0)
    fe.do_work()
    assert len(fe.tx_out) == 1 and app.complete.pop_batch(DESCRIPTOR)[0][1] == CMPF_DUPLICATE


def test_bytes_over_the_quota_wait_then_go(app_pair) -> None:
    state, app, _ = app_pair
    fe = _frontend(state, bytes_in_flight=100_000)
    fe.zero_copy_min = 1 << 30  # copy everything: the image is ~ the payload
    req = echo.EchoRequest.new(app.heap, payload=b"x" * 60_000)
    for cid in (1, 2):
        app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, cid, 0, 0, req._off, 0, 0)
    fe.do_work()
    assert [r.call_id for r in fe.tx_out] == [1] and fe.held
    assert 60_000 < state.bytes_inflight < 100_000
    _reply(fe, 1)
    fe.do_work()
    fe.do_work()
    assert [r.call_id for r in fe.tx_out] == [1, 2]
    big = echo.EchoRequest.new(app.heap, payload=b"x" * 200_000)
    app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, 3, 0, 0, big._off, 0, 0)
    _reply(fe, 2)
    for _ in range(3):
        fe.do_work()
    done = app.complete.pop_batch(DESCRIPTOR)
    assert [(d[4], StatusCode(d[2]).name) for d in done][-1] == (3, "RESOURCE_EXHAUSTED")
    assert state.bytes_inflight == 0 and not state.call_bytes


def test_deadlines_from_the_app_are_clamped(app_pair) -> None:
    state, app, _ = app_pair
    fe = _frontend(state)
    req = echo.EchoRequest.new(app.heap, payload=b"hi")
    app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, 1, 0, 0, req._off, 0, (1 << 64) - 1)
    app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, 2, 0, 0, req._off, 0, 1)  # long past
    fe.do_work()
    (call,) = fe.tx_out
    assert call.call_id == 1 and call.deadline is None
    (done,) = app.complete.pop_batch(DESCRIPTOR)
    assert done[4] == 2 and done[2] == StatusCode.DEADLINE_EXCEEDED
