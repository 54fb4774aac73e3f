"""The always-on engines (frontend, tcp): real rings, real sockets, in one process.

Each test decomposes a running engine that holds work and restores it into a
fresh instance: nothing queued is lost or duplicated.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest

import libmrpc
from engines.frontend import Frontend
from engines.tcp import TcpTransport
from libmrpc._heap import Heap
from libmrpc._shm import ShmLayout, create_regions, map_app_regions
from libmrpc.status import StatusCode
from libmrpc.wire.frames import (
    CALL,
    HELLO,
    HELLO_ACK,
    REPLY,
    FrameAssembler,
    encode_header,
    encode_json_frame,
)
from libmrpc.wire.ring import CMP_REPLY, DESCRIPTOR, SUB_CALL, RingConsumer, RingProducer
from mrpcd.appstate import AppState
from mrpcd.engine import (
    DEFAULT_TCP,
    Binding,
    ConnSpec,
    EngineContext,
    MethodRef,
    MockClock,
    Rpc,
    RpcKind,
    Services,
    TxCall,
)
from mrpcd.runtime import Poller

ROOT = Path(__file__).resolve().parents[3]
echo = libmrpc.load_proto(ROOT / "schemas" / "echo.proto")


@pytest.fixture
def app_pair():
    layout = ShmLayout(64, 1 << 20, 1 << 20)
    regions, submit_efd, complete_efd = create_regions("t", layout)
    app_side = map_app_regions(layout, [os.dup(fd) for fd in regions.fds()])
    regions.close_fds()
    state = AppState(1, "t", os.getpid(), os.getuid(), regions, submit_efd, complete_efd)
    binding = Binding(0, echo, echo.SCHEMA_HASH, tuple(echo.SERVICES))
    state.bindings.append(binding)
    ctl = memoryview(app_side.ctl)
    app = SimpleNamespace(
        submit=RingProducer(ctl[: layout.ring_size], 64),
        complete=RingConsumer(ctl[layout.ring_size :], 64),
        heap=Heap(memoryview(app_side.send), name="app send heap"),
        recv=memoryview(app_side.recv),
    )
    yield state, app, binding
    state.close()
    app_side.close()


def _engine(cls, state, clock, poller=None, **services):
    ctx = EngineContext(
        f"t/{cls.NAME}",
        "t",
        os.getpid(),
        clock,
        services=Services(
            max_message_size=1 << 20,
            tcp=dataclasses.replace(DEFAULT_TCP, connect_timeout=2.0),
            **services,
        ),
        port=state,
        poller=poller or Poller(),
    )
    engine = cls(ctx, {})
    engine.bind(deque(), deque(), deque(), deque())
    return engine


def tx_call(state, spec, binding, off, type_name="echo.EchoRequest"):
    """An outbound call's state as the frontend leaves it: marshalled once."""
    st = TxCall(spec, binding, off)
    st.wire = binding.module.MARSHAL[type_name](state.send_view, off, 2048, 1 << 20)
    return st


def test_frontend_validates_and_forwards_calls(app_pair) -> None:
    state, app, _ = app_pair
    state.conns[1] = ConnSpec(1, "127.0.0.1", 9, 0)
    fe = _engine(Frontend, state, MockClock())
    fe.need_private_images(True)  # as if an ACL were attached
    req = echo.EchoRequest.new(app.heap, payload=b"hi")
    app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, 7, 0, 0, req._off, 0, 0)
    app.submit.push(DESCRIPTOR, SUB_CALL, 0, 0, 1, 8, 5, 0, req._off, 0, 0)  # no method 5
    assert fe.do_work() >= 2
    (call,) = fe.tx_out
    assert call.kind is RpcKind.CALL and call.call_id == 7 and call.method.path == "/echo.Echo/Echo"
    assert bytes(call.view().payload) == b"hi"  # a daemon-private copy for content policies
    (done,) = app.complete.pop_batch(DESCRIPTOR)
    assert done[0] == CMP_REPLY and done[4] == 8 and done[2] == StatusCode.UNIMPLEMENTED


def test_frontend_decompose_restore_keeps_backlog(app_pair) -> None:
    state, app, _ = app_pair
    clock = MockClock()
    fe = _engine(Frontend, state, clock)
    # 100 error replies for a 64-slot completion ring: 36 must wait in the backlog
    for i in range(100):
        fe.rx_in.append(
            Rpc(RpcKind.REPLY, "t", 1, i, None, status=StatusCode.ABORTED, details=f"#{i}")
        )
    fe.do_work()
    assert len(fe.backlog) == 36 and not fe.rx_in  # the rest waits in the (bounded) backlog
    state_ = fe.decompose()
    fresh = Frontend.restore(fe.ctx, {}, state_, Frontend.VERSION)
    fresh.bind(fe.tx_in, fe.tx_out, fe.rx_in, fe.rx_out)
    got = [d[4] for d in app.complete.pop_batch(DESCRIPTOR, 100)]
    fresh.do_work()
    got += [d[4] for d in app.complete.pop_batch(DESCRIPTOR, 100)]
    assert got == list(range(100))
    assert fe.do_work() == 0  # the old instance holds nothing any more


class FakePeer:
    """A listening socket that speaks just enough of the wire protocol."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sock: socket.socket | None = None
        self.frames: list = []
        self.asm = FrameAssembler(on_frame=lambda h, b: self.frames.append((h, bytes(b))))

    def pump(self) -> None:
        if self.sock is None:
            self.listener.settimeout(2)
            self.sock, _ = self.listener.accept()
            self.sock.setblocking(False)
        try:
            while data := self.sock.recv(65536):
                self.asm.feed(data)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.sock:
            self.sock.close()
        self.listener.close()


def _drive(engine, poller, peer, until, rounds: int = 200) -> None:
    for _ in range(rounds):
        engine.do_work()
        poller.poll(0.005)
        peer.pump()
        if until():
            return
    raise AssertionError("condition not reached")


def test_tcp_decompose_restore_matches_replies_to_pending_calls(app_pair) -> None:
    state, app, binding = app_pair
    peer = FakePeer()
    poller = Poller()
    clock = MockClock()
    try:
        state.conns[1] = ConnSpec(1, "127.0.0.1", peer.port, 0)
        tcp = _engine(TcpTransport, state, clock, poller)

        for i in range(10):
            req = echo.EchoRequest.new(app.heap, payload=b"call %d" % i)
            app.keep = getattr(app, "keep", []) + [req]
            tcp.tx_in.append(
                Rpc(
                    RpcKind.CALL,
                    "t",
                    1,
                    i,
                    MethodRef.of(echo.METHODS[0]),
                    _state=tx_call(state, state.conns[1], binding, req._off),
                )
            )
        _drive(tcp, poller, peer, lambda: sum(h.type == CALL for h, _ in peer.frames) == 10)
        hello = [b for h, b in peer.frames if h.type == HELLO]
        assert hello and echo.SCHEMA_HASH.encode() in hello[0]
        assert len(tcp.pending) == 10
        # upgrade in the middle: the replies go to the restored instance
        saved = tcp.decompose()
        fresh = TcpTransport.restore(tcp.ctx, {}, saved, TcpTransport.VERSION)
        fresh.bind(tcp.tx_in, tcp.tx_out, tcp.rx_in, tcp.rx_out)
        heap = Heap.private(1 << 16)
        out = [encode_json_frame(HELLO_ACK, {"ok": True})]
        for h, body in peer.frames:
            if h.type == CALL:
                got = echo.EchoRequest._from_image(memoryview(body), 0, None)
                reply = echo.EchoReply.new(heap, payload=bytes(got.payload).upper())
                head, segs = echo.MARSHAL["echo.EchoReply"](heap.buf, reply._off, 1 << 20, 1 << 20)
                image = bytes(head) + b"".join(bytes(x) for x in segs)
                out.append(encode_header(REPLY, call_id=h.call_id, body_len=len(image)) + image)
        peer.sock.sendall(b"".join(out))
        _drive(fresh, poller, peer, lambda: len(fresh.rx_out) == 10)
        replies = list(fresh.rx_out)
        assert sorted(r.call_id for r in replies) == list(range(10))
        for r in replies:
            view = echo.EchoReply._from_image(state.recv_view, r._state.heap_off, None)
            assert bytes(view.payload) == b"CALL %d" % r.call_id
        assert not fresh.pending and not tcp.pending
    finally:
        peer.close()
        poller.close()


def test_tcp_connection_refused_fails_calls_unavailable(app_pair) -> None:
    state, app, binding = app_pair

    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    state.conns[1] = ConnSpec(1, "127.0.0.1", port, 0)
    poller = Poller()
    tcp = _engine(TcpTransport, state, MockClock(), poller)
    req = echo.EchoRequest.new(app.heap, payload=b"x")
    tcp.tx_in.append(
        Rpc(
            RpcKind.CALL,
            "t",
            1,
            1,
            MethodRef.of(echo.METHODS[0]),
            _state=tx_call(state, state.conns[1], binding, req._off),
        )
    )
    for _ in range(100):
        tcp.do_work()
        poller.poll(0.01)
        if tcp.rx_out:
            break
    (err,) = tcp.rx_out
    assert err.status is StatusCode.UNAVAILABLE and str(port) in err.details
    poller.close()


def test_tcp_ingress_decompose_restore_keeps_connections_and_half_read_frames() -> None:
    from engines.tcp import TcpIngress
    from mrpcd.appstate import Router

    poller = Poller()
    listener = socket.create_server(("127.0.0.1", 0))
    ctx = EngineContext(
        "daemon/tcp-ingress",
        "",
        0,
        MockClock(),
        services=Services(router=Router("test")),
        poller=poller,
        listener=listener,
    )
    old = TcpIngress(ctx, {})
    client = socket.create_connection(listener.getsockname())
    try:
        hello = encode_json_frame(
            HELLO,
            {
                "version": 1,
                "schema_hash": echo.SCHEMA_HASH,
                "services": ["echo.Echo"],
                "app": "t",
                "pid": 1,
            },
        )
        client.sendall(hello[:10])  # half a frame arrives before the upgrade
        for _ in range(50):
            poller.poll(0.01)
            if old.conns and next(iter(old.conns)).bytes_in == 10:
                break
        assert len(old.conns) == 1
        fresh = TcpIngress.restore(ctx, {}, old.decompose(), TcpIngress.VERSION)
        client.sendall(hello[10:])  # the rest goes to the new instance
        got = []
        asm = FrameAssembler(on_frame=lambda h, b: got.append((h, bytes(b))))
        client.settimeout(0.01)
        for _ in range(100):
            poller.poll(0.01)
            fresh.do_work()
            try:
                asm.feed(client.recv(4096))
            except TimeoutError:
                pass
            if got:
                break
        ((h, body),) = got
        assert h.type == HELLO_ACK and b'"ok":true' in body
        assert fresh.counters["accepted"] == 1 and not old.conns
    finally:
        client.close()
        listener.close()
        poller.close()


def test_tcp_batches_queued_calls_into_one_sendmsg(app_pair, monkeypatch) -> None:
    from engines import tcp_conn

    state, app, binding = app_pair
    peer = FakePeer()
    poller = Poller()
    writes: list[int] = []
    real_flush = tcp_conn.SendQueue.flush

    class Counting:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def sendmsg(self, bufs: list) -> int:
            writes.append(len(bufs))
            return self.sock.sendmsg(bufs)

    monkeypatch.setattr(
        tcp_conn.SendQueue, "flush", lambda self, sock: real_flush(self, Counting(sock))
    )
    try:
        state.conns[1] = ConnSpec(1, "127.0.0.1", peer.port, 0)
        tcp = _engine(TcpTransport, state, MockClock(), poller)
        big = b"z" * 10000  # above zero_copy_min: a scatter-gather segment from the send heap
        reqs = [echo.EchoRequest.new(app.heap, payload=big) for _ in range(10)]
        for i, req in enumerate(reqs):
            tcp.tx_in.append(
                Rpc(
                    RpcKind.CALL,
                    "t",
                    1,
                    i,
                    MethodRef.of(echo.METHODS[0]),
                    _state=tx_call(state, state.conns[1], binding, req._off),
                )
            )
        _drive(tcp, poller, peer, lambda: sum(h.type == CALL for h, _ in peer.frames) == 10)
        # the handshake and all ten calls (header, record, zero-copy segment each) in one sendmsg
        assert writes == [1 + 10 * 3], writes
        bodies = [b for h, b in peer.frames if h.type == CALL]
        assert all(
            bytes(echo.EchoRequest._from_image(memoryview(b), 0, None).payload) == big
            for b in bodies
        )
    finally:
        peer.close()
        poller.close()
