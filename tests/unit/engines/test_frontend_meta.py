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
from mrpcd.engine import ConnSpec, MockClock, RpcKind
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


def test_a_cancel_marks_the_call_and_sends_one_cancel_down_the_datapath(app_pair: Any) -> None:
    state, app, _ = app_pair
    fe = _frontend(state)
    req = echo.EchoRequest.new(app.heap, payload=b"hi")
    app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, 1, 0, 0, req._off, 0, 0)
    fe.do_work()
    for _ in range(2):  # a second cancel is a no-op; so is one for an unknown id
        app.submit.push(DESCRIPTOR, SUB_CANCEL, 0, 0, 0, 1, 0, 0, 0, 0, 0)
    app.submit.push(DESCRIPTOR, SUB_CANCEL, 0, 0, 0, 99, 0, 0, 0, 0, 0)
    fe.do_work()
    rpc, cancel = fe.tx_out  # the call, then exactly one CANCEL naming it (for the transport)
    assert rpc.kind is RpcKind.CALL and rpc._cancelled
    assert cancel.kind is RpcKind.CANCEL and cancel._state is rpc and cancel.call_id == 1


def test_a_reply_carries_initial_metadata_through_and_too_much_is_resource_exhausted(
    app_pair: Any,
) -> None:
    from types import SimpleNamespace

    from libmrpc.wire.ring import CMP_REPLY, CMPF_METADATA, SUB_REPLY
    from mrpcd.engine import Rpc

    state, app, _ = app_pair
    fe = _frontend(state)  # max_metadata_size=256
    both = md.encode([("t", "1")], [("i-bin", b"\x00")])
    cases = {7: both, 8: md.encode([], [("k", "v" * 300)]), 9: md.encode([], [("Bad", "v")])}
    for token, block in cases.items():
        state.server_calls[token] = Rpc(RpcKind.CALL, "t", 1, token, None, _state=SimpleNamespace())
        details = _block(app, b"nope")
        off = _block(app, block)
        app.submit.push(
            DESCRIPTOR, SUB_REPLY, SUBF_METADATA, int(StatusCode.NOT_FOUND), 0, token, 0, 0,
            details, 4, off,
        )  # fmt: skip
    fe.do_work()
    replies = {r.call_id: r for r in fe.tx_out}
    assert replies[7].status is StatusCode.NOT_FOUND
    assert md.split(replies[7].metadata) == ((("i-bin", b"\x00"),), (("t", "1"),))
    assert md.encode(replies[7].metadata) == both  # forwarded to the peer unchanged
    assert replies[8].status is StatusCode.RESOURCE_EXHAUSTED and replies[8].metadata == ()
    assert replies[9].status is StatusCode.INTERNAL, replies[9]
    assert "initial metadata: metadata key 'Bad'" in replies[9].details
    # the caller's side: the reply's metadata lands as one block, initial included
    fe.rx_in.append(replies[7])
    fe.do_work()
    (d,) = [d for d in app.complete.pop_batch(DESCRIPTOR) if d[0] == CMP_REPLY]
    assert d[1] & CMPF_METADATA and d[2] == StatusCode.NOT_FOUND
    at = d[3] << 3
    landed = bytes(app.recv[at : at + md.block_size(app.recv, at)])
    assert landed == both
