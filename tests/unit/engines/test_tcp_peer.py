"""The transport against hostile or slow peers, in one process: name resolution
off the runtime thread, per-connection accounting and timers (MockClock)."""

from __future__ import annotations

import functools
import threading
import time
from types import SimpleNamespace

import pytest

from engines import tcp_resolve
from engines.tcp import TcpTransport
from engines.tcp_conn import Conn, ConnState
from engines.tcp_limits import PeerLimits, admit, overdue, settle
from libmrpc.status import StatusCode
from libmrpc.wire.errors import WireError
from libmrpc.wire.frames import CALL, HELLO, encode_header
from mrpcd.engine import ConnSpec, MethodRef, MockClock, Rpc, RpcKind
from mrpcd.runtime import Poller
from tests.unit.engines import test_engines_core as core
from tests.unit.engines.test_engines_core import FakePeer, _engine, echo, tx_call

app_pair = core.app_pair  # the fixture


@pytest.fixture
def slow_resolver(monkeypatch):
    """Host names take ``delay`` seconds to resolve (to 127.0.0.1) unless released."""
    release = threading.Event()
    state = SimpleNamespace(delay=5.0, calls=[], release=release)

    def resolve(host: str, port: int) -> str:
        state.calls.append(host)
        release.wait(state.delay)
        if host.endswith(".invalid"):
            raise OSError("Name or service not known")
        return "127.0.0.1"

    monkeypatch.setattr(tcp_resolve, "resolve", resolve)
    tcp_resolve.forget()
    yield state
    release.set()
    tcp_resolve.forget()


def _call(
    tcp, state, binding, app, spec: ConnSpec, call_id: int, deadline: float | None = None
) -> None:
    req = echo.EchoRequest.new(app.heap, payload=b"call %d" % call_id)
    app.keep = getattr(app, "keep", []) + [req]
    tcp.tx_in.append(
        Rpc(
            RpcKind.CALL,
            "t",
            1,
            call_id,
            MethodRef.of(echo.METHODS[0]),
            deadline=deadline,
            _state=tx_call(state, spec, binding, req._off),
        )
    )


def test_a_slow_host_name_never_blocks_the_runtime(app_pair, slow_resolver) -> None:
    state, app, binding = app_pair
    peer, poller = FakePeer(), Poller()
    try:
        spec = state.conns[1] = ConnSpec(1, "slow.example", peer.port, 0)
        tcp = _engine(TcpTransport, state, MockClock(), poller)
        _call(tcp, state, binding, app, spec, 1)
        t0 = time.monotonic()
        tcp.do_work()
        _call(tcp, state, binding, app, spec, 2)
        tcp.do_work()
        took = time.monotonic() - t0
        print(f"do_work with a 5-s resolver: {took * 1e3:.1f} ms")
        assert took < 0.5 and not tcp.rx_out
        deadline = time.monotonic() + 2
        while not slow_resolver.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow_resolver.calls == ["slow.example"]  # one resolution for both calls
        slow_resolver.release.set()  # the name resolves now; both calls go out on one connection
        for _ in range(200):
            tcp.do_work()
            poller.poll(0.005)
            if tcp.conns:  # connected once the name resolved
                peer.pump()
            if sum(h.type == CALL for h, _ in peer.frames) == 2:
                break
        assert [h.type for h, _ in peer.frames] == [HELLO, CALL, CALL]
        assert len(tcp.conns) == 1 and len(tcp.pending) == 2
    finally:
        peer.close()
        poller.close()


def test_resolution_is_bounded_by_the_connect_timeout(app_pair, slow_resolver) -> None:
    state, app, binding = app_pair
    clock, poller = MockClock(), Poller()
    spec = state.conns[1] = ConnSpec(1, "slow.example", 9, 0)
    tcp = _engine(TcpTransport, state, clock, poller)
    _call(tcp, state, binding, app, spec, 1)
    _call(tcp, state, binding, app, spec, 2, deadline=clock.now() + 0.5)
    tcp.do_work()
    assert not tcp.rx_out
    clock.advance(1.0)
    tcp.do_work()
    (late,) = tcp.rx_out
    assert late.call_id == 2 and late.status is StatusCode.DEADLINE_EXCEEDED
    clock.advance(1.5)  # past connect_timeout (2 s)
    tcp.do_work()
    assert [r.call_id for r in tcp.rx_out] == [2, 1]
    assert tcp.rx_out[1].status is StatusCode.UNAVAILABLE and "resolving" in tcp.rx_out[1].details
    poller.close()


def test_an_unresolvable_name_fails_calls_unavailable(app_pair, slow_resolver) -> None:
    state, app, binding = app_pair
    slow_resolver.delay = 0.0
    poller = Poller()
    spec = state.conns[1] = ConnSpec(1, "nonexistent.invalid", 5150, 0)
    tcp = _engine(TcpTransport, state, MockClock(), poller)
    _call(tcp, state, binding, app, spec, 1)
    for _ in range(100):
        tcp.do_work()
        if tcp.rx_out:
            break
        time.sleep(0.01)
    (err,) = tcp.rx_out
    assert (
        err.status is StatusCode.UNAVAILABLE
        and "cannot resolve host 'nonexistent.invalid'" in err.details
    )
    poller.close()


def test_ip_literals_skip_resolution(slow_resolver) -> None:
    assert tcp_resolve.lookup("127.0.0.1", 1, lambda: None) == ("127.0.0.1", "")
    assert tcp_resolve.lookup("::1", 1, lambda: None) == ("::1", "")
    assert slow_resolver.calls == []


# --------------------------------------------------------------------------- accounting and timers


def _conn(outbound: bool = False) -> SimpleNamespace:
    from engines.tcp_conn import ConnState
    from libmrpc.wire.frames import FrameAssembler

    return SimpleNamespace(
        state=ConnState.HELLO_SENT if outbound else ConnState.AWAIT_HELLO,
        open=True,
        outbound=outbound,
        info={},
        assembler=FrameAssembler(),
        lock=threading.Lock(),
        rx_calls={},
        calls=set(),
        reserved=0,
        opened=0.0,
        last_in=0.0,
        frame_at=0.0,
        last_frame=0.0,
        out_since=None,
        read_paused=False,
        sendq=b"",
    )


def test_admit_bounds_calls_and_bytes_per_connection() -> None:
    limits = PeerLimits(max_calls=2, max_reserved=100)
    conn, app = _conn(), SimpleNamespace(closed=False)
    assert admit(conn, app, 1, 60, limits) is None
    code, msg = admit(conn, app, 1, 10, limits)
    assert code is StatusCode.INVALID_ARGUMENT  # the same call id twice
    code, msg = admit(conn, app, 2, 41, limits)
    assert code is StatusCode.RESOURCE_EXHAUSTED and "max_reserved_per_connection" in msg
    assert admit(conn, app, 2, 40, limits) is None
    code, msg = admit(conn, app, 3, 0, limits)
    assert code is StatusCode.RESOURCE_EXHAUSTED and "max_calls_per_connection" in msg
    settle(conn, 1)
    settle(conn, 1)  # twice is harmless
    assert conn.reserved == 40 and list(conn.rx_calls) == [2]


def test_timers() -> None:
    limits = PeerLimits(
        handshake_timeout=1,
        header_timeout=2,
        body_stall_timeout=3,
        idle_timeout=10,
        write_stall_timeout=4,
    )
    conn = _conn()
    assert overdue(conn, 0.5, limits) is None
    assert "HELLO" in overdue(conn, 1.5, limits)
    conn.info["hello"] = {}
    conn.state = ConnState.READY
    conn.assembler.feed(b"MR\x01")
    assert overdue(conn, 1.5, limits) is None
    assert "header" in overdue(conn, 2.5, limits)
    conn.read_paused = True  # our back-pressure, not the peer's stall
    assert overdue(conn, 2.5, limits) is None
    conn.read_paused = False
    conn.assembler = _conn().assembler
    conn.assembler.feed(encode_header(CALL, body_len=10) + b"abc")
    conn.last_in = conn.frame_at = 5.0
    assert overdue(conn, 7.0, limits) is None
    assert "stalled" in overdue(conn, 8.5, limits)
    conn.last_in = 8.4  # a byte now and then, but far below min_body_rate
    assert "trickles in" in overdue(conn, 8.5, limits)
    assert overdue(conn, 8.5, PeerLimits(body_stall_timeout=3, min_body_rate=0)) is None
    conn.assembler = _conn().assembler
    conn.out_since, conn.sendq = 8.0, b"x" * 10
    assert "read none" in overdue(conn, 12.5, limits)
    conn.out_since = None
    conn.last_frame = 3.0
    assert "idle" in overdue(conn, 13.5, limits)
    conn.rx_calls[1] = (None, 1)
    assert overdue(conn, 13.5, limits) is None
    out = _conn(outbound=True)  # an outbound connection gives up at half the idle timeout
    assert "idle for 5s" in overdue(out, 5.5, limits)


# --------------------------------------------------------------------------- states and hand-overs


def test_connection_states_follow_one_table() -> None:
    from engines.tcp_conn import CONN_STATES

    conn = SimpleNamespace(state=ConnState.AWAIT_HELLO)
    move = functools.partial(Conn.move, conn)
    assert move("hello") is ConnState.READY
    with pytest.raises(WireError, match="hello when the connection is ready"):
        move("hello")  # a second HELLO is the peer's protocol error
    conn.state = ConnState.CONNECTING
    assert move("connected") is ConnState.HELLO_SENT
    assert move("hello_ack") is ConnState.READY and move("goaway") is ConnState.GOAWAY
    with pytest.raises(WireError):
        move("hello_ack")  # a second HELLO_ACK
    assert CONN_STATES[ConnState.CLOSED] == {}
    reachable = {dst for moves in CONN_STATES.values() for dst in moves.values()}
    assert reachable <= set(CONN_STATES)


def test_the_transport_hands_delivered_items_on_and_inbound_answers_to_their_owner(
    app_pair,
) -> None:
    from mrpcd.engine import RxCall, TxReply

    state, _app, binding = app_pair
    poller = Poller()
    tcp = _engine(TcpTransport, state, MockClock(), poller)
    delivered = Rpc(RpcKind.CALL, "t", 1, 5, None)
    tcp.rx_in.append(delivered)  # as AppPort.deliver does, from the ingress's thread
    assert tcp.prepare_sleep()  # queued from this thread: no wake-up came, so do not sleep
    tcp.do_work()
    assert list(tcp.rx_out) == [delivered] and not tcp.prepare_sleep()
    posted: list[Rpc] = []
    origin = SimpleNamespace(owner=SimpleNamespace(post=posted.append), closed=False)
    call = RxCall(origin, 9, binding, None, state)
    answer = Rpc(RpcKind.REPLY, "t", 1, 5, None, _state=TxReply(call, 0))
    refusal = Rpc(RpcKind.REPLY, "t", 1, 6, None, status=StatusCode.ABORTED, _state=call)
    tcp.tx_in.extend([answer, refusal])
    tcp.do_work()
    assert posted == [answer, refusal]  # the connection's owner writes them, on its runtime
    tcp.abandon(
        [Rpc(RpcKind.CALL, "t", 1, 7, None, _state=call), Rpc(RpcKind.CALL, "t", 1, 8, None)],
        "gone",
    )
    (gone,) = posted[2:]  # only the inbound call is answered
    assert gone.status is StatusCode.UNAVAILABLE and gone.details == "gone" and gone._state is call
    poller.close()
