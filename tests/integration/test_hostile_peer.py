"""Hostile peer daemons cost only themselves: bounded memory, fds and heap
reservations, stalled or idle connections timed out, while a well-behaved
client on the same daemons keeps succeeding.

Daemon "b" (the attacked server host) runs with short timeouts and small
per-connection limits so that each test takes seconds; the figures that prove
each bound are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

import libmrpc
from libmrpc import StatusCode
from libmrpc._session import get_session
from libmrpc.wire.frames import ERROR, HELLO_ACK, PING, REPLY, encode_header
from tests.integration.conftest import ROOT, App, Cluster, Daemon
from tests.integration.hostile_peer import (
    Peer,
    call_frame,
    hello,
    proc_stats,
    request_image,
    wait_for,
)

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
MiB = 1 << 20
B_CONFIG = """
tcp:
  handshake_timeout: 1.0
  header_timeout: 1.0
  body_stall_timeout: 1.0
  idle_timeout: 3.0
  write_stall_timeout: 1.5
  max_send_queue: 256KiB
  max_reserved_per_connection: 4MiB
"""


class Hosts:
    def __init__(self, cluster: Cluster, b_config: str = B_CONFIG) -> None:
        self.cluster = cluster
        self.a = cluster.daemon("a")
        self.b = cluster.daemon("b", config=b_config)
        cluster.server(self.b, "--mode", "async", name="payments")
        self.steady: App | None = None

    def start_steady(self) -> None:
        self.steady = self.cluster.app(
            "steady_client.py", str(self.a.prefix), self.b.listen, "--seconds", "120", name="steady"
        )

    def steady_report(self) -> dict:
        assert self.steady is not None
        time.sleep(0.5)  # and a little after the attack
        report = self.steady.result(timeout=60)
        print(
            f"well-behaved client during the attack: {report['ok']} ok, errors {report['errors']}, "
            f"{report['rate']} calls/s, longest gap {report['max_gap_s']} s"
        )
        assert report["ok"] > 0 and not report["errors"], report
        return report

    def server_heap(self) -> dict:
        return next(x for x in self.b.apps() if x["name"] == "payments")["recv_heap"]


@pytest.fixture
def hosts(cluster: Cluster) -> Iterator[Hosts]:
    h = Hosts(cluster)
    h.start_steady()
    yield h


def _rss_mb(d: Daemon) -> float:
    return proc_stats(d.pid)["rss_kb"] / 1024


# --------------------------------------------------------------------------- item 2


def test_declined_huge_bodies_allocate_nothing(hosts: Hosts) -> None:
    """14 headers announcing 256 MiB bodies the daemon declines (CALL before
    HELLO, REPLY at the listener, unrouted call): nothing is allocated for them,
    and their connections are closed."""
    b = hosts.b
    before = proc_stats(b.pid)
    huge = 256 * MiB - 1
    early = [Peer(b.listen) for _ in range(5)]
    for p in early:
        p.send(encode_header(1 + 2, call_id=1, body_len=huge))  # CALL before HELLO
    replies = [Peer(b.listen) for _ in range(5)]
    for p in replies:
        p.send(hello(testing.SCHEMA_HASH) + encode_header(REPLY, call_id=1, body_len=huge))
    unrouted = [Peer(b.listen) for _ in range(4)]
    for p in unrouted:  # method 40 does not exist: the body is skipped as it arrives
        p.send(
            hello(testing.SCHEMA_HASH)
            + encode_header(3, call_id=7, method=40, body_len=huge)
            + b"\0" * (4 * MiB)
        )
    time.sleep(0.5)
    during = proc_stats(b.pid)
    growth = (during["rss_kb"] - before["rss_kb"]) / 1024
    print(
        f"mrpcd RSS {before['rss_kb'] // 1024} MiB -> {during['rss_kb'] // 1024} MiB "
        f"(+{growth:.1f} MiB) with 14 announced 256 MiB bodies; fds {before['fds']} -> {during['fds']}"
    )
    assert growth < 50, growth
    assert all(p.closed_by_daemon(2) for p in early + replies), (
        "protocol violations must close at once"
    )
    assert all(p.closed_by_daemon(4) for p in unrouted), "a stalled declined body must time out"
    assert wait_for(lambda: proc_stats(b.pid)["fds"] <= before["fds"], 5)
    assert hosts.server_heap()["used"] < MiB
    hosts.steady_report()


# --------------------------------------------------------------------------- item 8


def test_stalled_bodies_reserve_a_bounded_share_and_give_it_back(hosts: Hosts) -> None:
    b = hosts.b
    stalled = []
    for _ in range(33):
        p = Peer(b.listen)
        p.send(
            hello(testing.SCHEMA_HASH)
            + encode_header(3, call_id=1, method=0, body_len=4 * MiB)
            + b"\0" * 1024
        )
        stalled.append(p)
    assert wait_for(lambda: hosts.server_heap()["used"] >= 33 * 4 * MiB, 5)
    used = hosts.server_heap()["used"]
    print(f"server recv heap reserved by 33 stalled bodies: {used / MiB:.1f} MiB")
    # one connection may not reserve more than tcp.max_reserved_per_connection (4 MiB)
    greedy = Peer(b.listen)
    big = request_image(testing, payload=b"g" * (3 * MiB), sleep_ms=1500)
    greedy.send(hello(testing.SCHEMA_HASH) + call_frame(big, 1) + call_frame(big, 2))
    frames = greedy.read_frames(lambda fs: any(h.call_id == 2 for h, _ in fs), timeout=5)
    (second,) = [(h, body) for h, body in frames if h.call_id == 2]
    assert second[0].type == ERROR and second[0].status == StatusCode.RESOURCE_EXHAUSTED
    assert b"max_reserved_per_connection" in second[1], second[1]
    frames = greedy.read_frames(lambda fs: any(h.call_id == 1 for h, _ in fs), timeout=5)
    assert any(h.call_id == 1 and h.type == REPLY for h, _ in frames)
    # after the body stall timeout (1 s) every stalled reservation is returned
    assert all(p.closed_by_daemon(5) for p in stalled)
    assert wait_for(lambda: hosts.server_heap()["used"] < MiB, 5), hosts.server_heap()
    print(f"server recv heap after the stall timeout: {hosts.server_heap()['used']} bytes")
    greedy.close()
    hosts.steady_report()


def test_a_body_that_trickles_in_is_dropped_and_its_reservation_returned(hosts: Hosts) -> None:
    b = hosts.b
    p = Peer(b.listen)
    p.send(
        hello(testing.SCHEMA_HASH)
        + encode_header(3, call_id=1, method=0, body_len=4 * MiB)
        + b"\0" * 64
    )
    assert wait_for(lambda: hosts.server_heap()["used"] >= 4 * MiB, 5)
    t0, closed = time.monotonic(), False
    while time.monotonic() - t0 < 6 and not closed:
        try:
            p.send(b"\0")  # one byte every 0.2 s: never a 1-s stall, but hopelessly slow
        except OSError:
            closed = True
        closed = closed or p.closed_by_daemon(0.2)
    print(f"dripping body dropped after {time.monotonic() - t0:.1f} s")
    assert closed and "trickles in" in b.log()
    assert wait_for(lambda: hosts.server_heap()["used"] < MiB, 5), hosts.server_heap()
    hosts.steady_report()


def test_idle_connections_close_and_reopen_transparently(cluster: Cluster) -> None:
    """The server side closes a connection idle for tcp.idle_timeout; a client's
    outbound connection closes itself at half of it; the next call reconnects."""
    a = cluster.daemon("a", config="tcp:\n  idle_timeout: 1.0\n")  # closes its own at 0.5 s
    c = cluster.daemon("c")  # default: would wait 150 s, so the server closes first
    b = cluster.daemon("b", config="tcp:\n  idle_timeout: 1.0\n")
    cluster.server(b)
    stubs = [
        testing.TestStub(libmrpc.connect(b.listen, prefix=d.prefix, name="idler")) for d in (a, c)
    ]
    for i in range(3):
        for stub in stubs:
            reply = stub.Call(testing.Request(payload=b"idle %d" % i), timeout=10)
            assert bytes(reply.payload) == b"idle %d" % i
        if i < 2:
            time.sleep(1.6)
    assert a.log().count("idle for 0.5s") >= 2, a.log()[-2000:]
    assert b.log().count("idle for 1s") >= 2, b.log()[-2000:]
    for d in (a, c):
        get_session(d.prefix).close()


def test_a_peer_that_never_reads_replies_is_paused_then_dropped(hosts: Hosts) -> None:
    b = hosts.b
    before = proc_stats(b.pid)
    p = Peer(b.listen)
    p.send(hello(testing.SCHEMA_HASH))
    image = request_image(testing, payload=b"r" * 8192)  # echoed: zero-copy from the send heap
    frames = b"".join(call_frame(image, i + 1) for i in range(40_000))
    sent, stuck_since = 0, None
    while sent < len(frames):
        try:
            n = p.send_some(frames[sent : sent + 65536])
        except OSError:
            break  # the daemon already dropped us
        sent += n
        if n:
            stuck_since = None
        elif stuck_since is None:
            stuck_since = time.monotonic()
        elif time.monotonic() - stuck_since > 3.0:
            # the daemon stopped reading our calls (a paused connection is dropped after
            # write_stall_timeout, 1.5 s, which ends the loop sooner; a daemon that only
            # stalled a moment on a loaded machine reads on)
            break
        else:
            time.sleep(0.01)
    calls = sent // len(call_frame(image, 1))
    during = proc_stats(b.pid)
    print(
        f"peer that never reads: the daemon took {calls} of 40000 calls before pausing; "
        f"mrpcd RSS {before['rss_kb'] // 1024} -> {during['rss_kb'] // 1024} MiB"
    )
    assert calls < 40_000
    assert wait_for(lambda: "read none of" in b.log(), 6), b.log()[-3000:]
    assert (during["rss_kb"] - before["rss_kb"]) / 1024 < 100
    assert wait_for(
        lambda: next(x for x in b.apps() if x["name"] == "payments")["serving_calls"] == 0, 10
    )
    p.close()
    hosts.steady_report()


def test_slowloris_idle_and_silent_connections_are_closed(hosts: Hosts) -> None:
    b = hosts.b
    before = proc_stats(b.pid)
    http = Peer(b.listen)
    http.send(b"GET / HTTP/1.1\r\n")  # 16 bytes: not even a header
    t0 = time.monotonic()
    assert http.closed_by_daemon(1.0), "a non-mrpc stream must be closed at once"
    print(f"HTTP request closed after {time.monotonic() - t0:.3f} s")
    slow = [Peer(b.listen) for _ in range(50)]
    for p in slow:
        p.send(b"MR\x01\x03\x00")  # a valid start of a header, never finished
    idle = [Peer(b.listen) for _ in range(50)]
    for p in idle:
        p.send(hello(testing.SCHEMA_HASH))
    for p in idle:
        assert p.read_frames(lambda fs: bool(fs))[0][0].type == HELLO_ACK
    silent = [Peer(b.listen) for _ in range(50)]
    time.sleep(0.3)
    during = proc_stats(b.pid)
    print(
        f"150 hostile connections: mrpcd fds {before['fds']} -> {during['fds']}, "
        f"RSS {before['rss_kb'] // 1024} -> {during['rss_kb'] // 1024} MiB "
        f"({(during['rss_kb'] - before['rss_kb']) / 150:.0f} KiB per connection)"
    )
    assert all(p.closed_by_daemon(4) for p in slow + silent), "header/handshake timeouts"
    assert all(p.closed_by_daemon(6) for p in idle), "idle timeout"
    assert wait_for(lambda: proc_stats(b.pid)["fds"] <= before["fds"], 5)
    after = proc_stats(b.pid)
    print(f"after the timeouts: mrpcd fds {after['fds']}, RSS {after['rss_kb'] // 1024} MiB")
    hosts.steady_report()


def test_too_many_connections_from_one_address_are_refused(cluster: Cluster) -> None:
    h = Hosts(cluster, B_CONFIG + "  max_inbound_per_ip: 20\n")
    h.start_steady()  # holds one of the 20
    peers = [Peer(h.b.listen) for _ in range(30)]
    time.sleep(0.3)  # well inside the handshake timeout (1 s)
    closed = sum(p.closed_by_daemon(0.02) for p in peers)
    print(f"30 connections over a per-address limit of 20 (1 in use): {closed} closed at once")
    assert 11 <= closed <= 12, closed
    assert "tcp.max_inbound_per_ip" in h.b.log()
    for p in peers:
        p.close()
    h.steady_report()


def test_ping_flood_costs_bounded_memory(hosts: Hosts) -> None:
    b = hosts.b
    before = proc_stats(b.pid)
    p = Peer(b.listen)
    p.send(hello(testing.SCHEMA_HASH))
    chunk = encode_header(PING, call_id=1) * 4096
    sent = 0
    try:
        for _ in range(250):  # 1M PINGs, 32 MB; we never read a PONG
            p.sock.settimeout(5)
            p.send(chunk)
            sent += 4096
    except OSError:
        pass  # the daemon gave up on us (write stall): fine
    during = proc_stats(b.pid)
    growth = (during["rss_kb"] - before["rss_kb"]) / 1024
    print(f"PING flood: {sent} PINGs sent, mrpcd RSS +{growth:.1f} MiB")
    assert growth < 30, growth
    assert "PING flood" in b.log()
    p.close()
    hosts.steady_report()


# --------------------------------------------------------------------------- items 9, 4, 18


def test_oversized_hellos_are_refused(hosts: Hosts) -> None:
    b = hosts.b
    for services in ([f"s{i}" for i in range(80_000)], [f"s{i}" for i in range(300)], ["x" * 300]):
        p = Peer(b.listen)
        p.send(hello(testing.SCHEMA_HASH, services))
        frames = p.read_frames(lambda fs: bool(fs), timeout=3)
        assert not any(h.type == HELLO_ACK and b'"ok":true' in body for h, body in frames), len(
            services
        )
        assert p.closed_by_daemon(2)
    assert "HELLO" in b.log()
    hosts.steady_report()


def test_a_call_with_an_endless_timeout_is_answered_and_freed(hosts: Hosts) -> None:
    b = hosts.b
    p = Peer(b.listen)
    image = request_image(testing, payload=b"forever")
    p.send(hello(testing.SCHEMA_HASH) + call_frame(image, 5, aux=2**64 - 1))
    frames = p.read_frames(lambda fs: any(h.call_id == 5 for h, _ in fs), timeout=5)
    (reply,) = [(h, body) for h, body in frames if h.call_id == 5]
    assert reply[0].type == REPLY, reply
    assert wait_for(lambda: hosts.server_heap()["used"] == 0, 5), hosts.server_heap()
    p.close()
    hosts.steady_report()


def test_hello_refusal_reveals_nothing_about_the_server(hosts: Hosts) -> None:
    b = hosts.b
    p = Peer(b.listen)
    p.send(hello("0123456789abcdef"))
    ((h, body),) = p.read_frames(lambda fs: bool(fs))
    assert h.type == HELLO_ACK
    ack = json.loads(body)
    print(f"refusal sent to an unauthenticated peer: {ack}")
    assert not ack["ok"] and "schema mismatch" in ack["error"]
    text = body.decode()
    port = b.listen.rsplit(":", 1)[1]
    for secret in (testing.SCHEMA_HASH, "payments", socket.gethostname(), port):
        assert secret not in text, secret
    assert testing.SCHEMA_HASH in b.log()  # the details are logged at the server
    hosts.steady_report()


# --------------------------------------------------------------------------- items 12, 11


def test_many_connects_share_one_connection_and_are_bounded(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    s = get_session(a.prefix, "connector")
    slot = s.bind(testing)
    base_a, base_b = proc_stats(a.pid), proc_stats(b.pid)
    ids = {
        s.control({"op": "connect", "addr": b.listen, "slot": slot})["conn_id"] for _ in range(1500)
    }
    stub_session_calls = []
    for conn_id in sorted(ids):
        from tests.integration.test_bad_input import raw_call

        req = testing.Request(payload=b"x")
        stub_session_calls.append(raw_call(s, conn_id, 0, req._off))
    assert all(err is None for err in stub_session_calls)
    after_a, after_b = proc_stats(a.pid), proc_stats(b.pid)
    print(
        f"1500 connects: {len(ids)} distinct connection(s); local mrpcd fds {base_a['fds']} -> "
        f"{after_a['fds']}, RSS {base_a['rss_kb'] // 1024} -> {after_a['rss_kb'] // 1024} MiB; "
        f"remote mrpcd fds {base_b['fds']} -> {after_b['fds']}, "
        f"RSS {base_b['rss_kb'] // 1024} -> {after_b['rss_kb'] // 1024} MiB"
    )
    assert len(ids) == 1
    assert after_a["fds"] - base_a["fds"] < 10 and after_b["fds"] - base_b["fds"] < 10
    assert (after_a["rss_kb"] - base_a["rss_kb"]) / 1024 < 30
    # distinct targets are bounded per app (tcp.max_connections_per_app, 64)
    with pytest.raises(libmrpc.RpcError) as e:
        for port in range(1, 100):
            s.control({"op": "connect", "addr": f"127.0.0.1:{port}", "slot": slot})
    assert e.value.code() is StatusCode.RESOURCE_EXHAUSTED
    assert "max_connections_per_app" in e.value.details()
    s.close()
    assert wait_for(
        lambda: proc_stats(a.pid)["fds"] <= base_a["fds"] - 2, 5
    )  # the app's own fds too
    assert wait_for(lambda: proc_stats(b.pid)["fds"] <= base_b["fds"], 5)


def test_unresolvable_host_names_do_not_stall_other_apps(cluster: Cluster) -> None:
    """Name resolution runs off the runtime thread: an app calling a name that
    does not resolve gets UNAVAILABLE, and another app's calls flow without gaps."""
    h = Hosts(cluster)
    h.start_steady()
    bad = testing.TestStub(
        libmrpc.connect("nonexistent.invalid:5150", prefix=h.a.prefix, name="dns")
    )
    errors = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2:
        with pytest.raises(libmrpc.RpcError) as e:
            bad.Call(testing.Request(payload=b"x"), timeout=5)
        errors.append(e.value)
    assert all(e.code() is StatusCode.UNAVAILABLE for e in errors)
    assert "resolve" in errors[0].details(), errors[0].details()
    report = h.steady_report()
    assert report["max_gap_s"] < 1.0, report
