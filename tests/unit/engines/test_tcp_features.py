"""Wire features between two daemons: what a HELLO says, what each side uses,
BATCH frames on a real socket pair, and the FEATURES re-announcement."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from engines import tcp_features as wf
from engines.tcp_conn import EPOLLIN, Conn, ConnState
from libmrpc.wire.errors import WireError
from libmrpc.wire.frames import (
    BATCH,
    CALL,
    FEATURES,
    HELLO,
    METADATA,
    FrameAssembler,
    FrameHeader,
    encode_header,
    encode_json_frame,
)
from mrpcd.runtime import Poller

V1 = frozenset({wf.FEAT_FEATURES})
V2 = wf.WIRE_FEATURES


class Owner:
    def __init__(self) -> None:
        self.frames: list[tuple[int, int, bytes]] = []
        self.closed: list[str] = []
        self.counters: dict[str, int] = {}

    def frame_sink(self, conn: Conn, header: FrameHeader) -> None:
        return None

    def handle_frame(self, conn: Conn, header: FrameHeader, body: memoryview) -> None:
        self.frames.append((header.type, header.call_id, bytes(body)))

    def conn_closed(self, conn: Conn, reason: str) -> None:
        self.closed.append(reason)


@pytest.fixture
def pair() -> Iterator[tuple[Conn, Owner, socket.socket]]:
    """A READY connection (its owner) and the raw socket of its peer."""
    ours, theirs = socket.socketpair()
    poller, owner = Poller(), Owner()
    conn = Conn(ours, owner, poller, peer="peer", outbound=False, max_body=1 << 20)
    conn.state = ConnState.READY
    yield conn, owner, theirs
    conn.close("test over")
    theirs.close()
    poller.close()


def wire_frames(sock: socket.socket) -> list[tuple[FrameHeader, bytes]]:
    sock.setblocking(False)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except BlockingIOError:
        pass
    return [(h, bytes(b)) for h, b in FrameAssembler(max_body=1 << 20).feed(data)]


def small(call_id: int, body: bytes = b"x" * 40) -> list[bytes]:
    return [encode_header(CALL, call_id=call_id, body_len=len(body)), body]


# ---------------------------------------------------------------- negotiation


def test_a_peer_that_predates_features_has_none() -> None:
    assert wf.parse(None, "HELLO") == frozenset()
    assert wf.parse(["batch", "from-the-future"], "HELLO") == {"batch", "from-the-future"}


@pytest.mark.parametrize(
    "bad",
    ["batch", [1], ["x" * 33], [""], [f"f{i}" for i in range(33)], {"batch": True}],
)
def test_a_malformed_features_field_is_the_peers_protocol_error(bad: Any) -> None:
    with pytest.raises(WireError, match="'features' must be a list"):
        wf.parse(bad, "HELLO")


def test_each_side_uses_only_what_both_advertised(pair) -> None:
    conn, _, _ = pair
    assert wf.advertise(conn, V2) == ["batch", "features"]
    wf.negotiate(conn, V2, V1)
    assert conn.features == V1 and conn.accepts == V2  # we take BATCH, we never send one
    wf.negotiate(conn, V1, V2)
    assert conn.features == V1


# ---------------------------------------------------------------- BATCH


def test_small_frames_go_out_as_one_batch_and_arrive_one_by_one(pair) -> None:
    conn, owner, theirs = pair
    conn.features = conn.accepts = V2
    for i in range(1, 4):
        conn.queue(small(i))
    conn.queue([encode_header(METADATA, call_id=4, body_len=3), b"md1", *small(4)], frames=2)
    conn.flush()
    frames = wire_frames(theirs)
    assert [(h.type, h.aux) for h, _ in frames] == [(BATCH, 5)]
    assert owner.counters == {"batched_frames": 5, "batches_sent": 1}
    # the same bytes, received by a connection that advertised batch: five frames
    theirs.sendall(encode_header(BATCH, body_len=len(frames[0][1]), aux=5) + frames[0][1])
    conn.on_event(EPOLLIN)
    assert [(t, c) for t, c, _ in owner.frames] == [
        (CALL, 1),
        (CALL, 2),
        (CALL, 3),
        (METADATA, 4),
        (CALL, 4),
    ]
    assert owner.counters["batched_frames_received"] == 5 and conn.open


def test_a_frame_that_cannot_wait_seals_the_batch_first_so_order_holds(pair) -> None:
    conn, _, theirs = pair
    conn.features = V2
    conn.queue(small(1))
    conn.queue(small(2))
    done: list[int] = []
    seg = memoryview(b"zero-copy")
    conn.queue([encode_header(CALL, call_id=3, body_len=len(seg)), seg], lambda: done.append(3))
    conn.queue(small(4))  # alone in its "batch": goes as it is
    conn.flush()
    frames = wire_frames(theirs)
    assert [(h.type, h.call_id) for h, _ in frames] == [(BATCH, 0), (CALL, 3), (CALL, 4)]
    assert done == [3]


def test_position_seals_a_pending_batch(pair) -> None:
    conn, _, _ = pair
    conn.features = V2
    conn.queue(small(1))
    assert conn.sendq.queued == 0
    assert conn.position() == conn.sendq.queued == 32 + 40


def test_no_batch_is_sent_unless_both_sides_have_it(pair) -> None:
    conn, owner, theirs = pair
    conn.accepts = V2  # we could take one; the peer did not advertise it
    conn.features = V1
    conn.queue(small(1))
    conn.queue(small(2))
    conn.flush()
    assert [h.type for h, _ in wire_frames(theirs)] == [CALL, CALL]
    assert "batched_frames" not in owner.counters


def _batch(*frames: list[bytes], aux: int | None = None) -> bytes:
    body = b"".join(b for f in frames for b in f)
    n = len(frames) if aux is None else aux
    return encode_header(BATCH, body_len=len(body), aux=n) + body


@pytest.mark.parametrize(
    ("accepts", "data", "reason"),
    [
        (V1, _batch(small(1), small(2)), "BATCH frame, which this daemon did not advertise"),
        (V2, _batch(small(1), [encode_json_frame(HELLO, {})]), "HELLO frame inside a BATCH"),
        (V2, _batch(small(1), [encode_json_frame(FEATURES, {})]), "FEATURES frame inside"),
        (V2, _batch(small(1), [_batch(small(2))]), "BATCH frame inside a BATCH"),
        (V2, _batch(small(1), small(2), aux=3), "announced 3 frames, carried 2"),
        (V2, _batch(small(1), [small(2)[0]]), "BATCH frame ends inside a frame"),
    ],
)
def test_a_bad_batch_closes_only_its_connection(pair, accepts, data, reason) -> None:
    conn, owner, theirs = pair
    conn.accepts = accepts
    theirs.sendall(data)
    conn.on_event(EPOLLIN)
    assert conn.closed and reason in owner.closed[0], owner.closed


# ---------------------------------------------------------------- FEATURES


def _features_frame(sock: socket.socket) -> dict[str, Any]:
    (frame,) = wire_frames(sock)
    assert frame[0].type == FEATURES
    return json.loads(frame[1])


def test_an_upgraded_side_announces_and_the_peer_answers_once(pair) -> None:
    conn, _, theirs = pair
    wf.advertise(conn, V1)  # the handshake, on the old code
    wf.negotiate(conn, V1, V2)
    assert conn.features == V1
    assert wf.sync(conn, V2)  # the new code takes over the live connection
    conn.flush()
    assert _features_frame(theirs) == {"features": ["batch", "features"], "answer": False}
    assert conn.features == V2 and conn.accepts == V2
    assert not wf.sync(conn, V2)  # nothing new: nothing sent

    # the peer's side: it records our set, uses what both have, answers with its own
    peer = Conn(theirs.dup(), Owner(), Poller(), peer="p", outbound=True, max_body=1 << 20)
    try:
        peer.state = ConnState.READY
        wf.advertise(peer, V2)
        wf.negotiate(peer, V2, V1)
        body = json.dumps({"features": ["batch", "features"], "answer": False}).encode()
        assert wf.on_features(peer, memoryview(body), V2)
        assert peer.features == V2
        answer = json.dumps({"features": ["batch", "features"], "answer": True}).encode()
        assert not wf.on_features(peer, memoryview(answer), V2)  # an answer is not answered
    finally:
        peer.close("test over")


def test_a_peer_that_never_heard_of_features_is_not_told(pair) -> None:
    conn, _, theirs = pair
    wf.advertise(conn, V1)
    wf.negotiate(conn, V1, frozenset())  # a daemon before wire features
    assert not wf.sync(conn, V2)
    conn.flush()
    assert wire_frames(theirs) == [] and conn.features == frozenset()


def test_features_frames_are_refused_unless_advertised_and_bounded(pair) -> None:
    conn, _, _ = pair
    body = memoryview(json.dumps({"features": ["batch"]}).encode())
    with pytest.raises(WireError, match="did not advertise"):
        wf.on_features(conn, body, V2)
    wf.advertise(conn, V2)
    for _ in range(wf.MAX_ANSWERS):
        wf.on_features(conn, body, V2)
    with pytest.raises(WireError, match="FEATURES announcements on one connection"):
        wf.on_features(conn, body, V2)
