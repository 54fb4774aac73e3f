"""End-to-end RPCs through two real daemons, with real application processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import libmrpc
from libmrpc import RpcError, StatusCode
from tests.integration.conftest import ROOT, Cluster, shm_listing

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")


def two_hosts(cluster: Cluster, *server_args: str):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b, *server_args)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="pytest"))
    return a, b, stub


def test_unary_roundtrip_sync_future_and_aio(cluster: Cluster) -> None:
    _, _, stub = two_hosts(cluster)
    reply = stub.Call(testing.Request(payload=b"hello"), timeout=10)
    assert bytes(reply.payload) == b"hello"
    assert reply.request_size == 5 and reply.served_by == "server"
    fut = stub.Call.future(testing.Request(payload=b"future"), timeout=10)
    assert bytes(fut.result().payload) == b"future"

    async def many() -> list[bytes]:
        replies = await asyncio.gather(
            *(stub.Call.aio(testing.Request(payload=b"%d" % i), timeout=10) for i in range(64))
        )
        return [bytes(r.payload) for r in replies]

    assert asyncio.run(many()) == [b"%d" % i for i in range(64)]


def test_request_can_be_reused_and_reply_is_zero_copy(cluster: Cluster) -> None:
    _, _, stub = two_hosts(cluster)
    req = testing.Request(payload=b"x" * 100)
    for _ in range(20):
        reply = stub.Call(req, timeout=10)
        assert isinstance(reply.payload, memoryview) and reply.payload.readonly
        assert bytes(reply.payload) == b"x" * 100


def test_two_clients_one_server_64_outstanding_each(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b, "--mode", "async")
    clients = [
        cluster.app(
            "client_app.py",
            str(a.prefix),
            b.listen,
            "--calls",
            "640",
            "--concurrency",
            "64",
            "--size",
            "100",
            "--name",
            f"client{i}",
            name=f"client{i}",
        )
        for i in range(2)
    ]
    for c in clients:
        r = c.result()
        assert r == {**r, "ok": 640, "errors": {}, "mismatches": 0}, r


def test_8_mib_request_and_64_mib_reply(cluster: Cluster) -> None:
    _, _, stub = two_hosts(cluster)
    big = os.urandom(8 << 20)
    reply = stub.Call(testing.Request(payload=big), timeout=60)
    assert reply.request_size == len(big) and bytes(reply.payload) == big
    reply = stub.Call(testing.Request(payload=b"y", reply_size=64 << 20), timeout=60)
    assert len(reply.payload) == 64 << 20 and reply.payload[-1] == ord("r")


def test_unknown_method_is_unimplemented(cluster: Cluster) -> None:
    _, _, stub = two_hosts(cluster)
    with pytest.raises(RpcError) as e:
        stub.NotServed(testing.Request(payload=b"x"), timeout=10)
    assert e.value.code() is StatusCode.UNIMPLEMENTED
    assert "not implemented" in e.value.details()


def test_handler_exception_is_unknown_with_text(cluster: Cluster) -> None:
    _, _, stub = two_hosts(cluster)
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(fail="raise:the handler broke"), timeout=10)
    assert e.value.code() is StatusCode.UNKNOWN
    assert "the handler broke" in e.value.details()
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(fail="abort:NOT_FOUND:no such key"), timeout=10)
    assert e.value.code() is StatusCode.NOT_FOUND and e.value.details() == "no such key"
    assert (
        bytes(stub.Call(testing.Request(payload=b"still fine"), timeout=10).payload)
        == b"still fine"
    )


def test_deadline_expiry_and_late_reply_reclaimed(cluster: Cluster) -> None:
    a, _b, stub = two_hosts(cluster)
    t0 = time.monotonic()
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(payload=b"slow", sleep_ms=600), timeout=0.2)
    assert e.value.code() is StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 0.5
    # the late reply arrives and is discarded; nothing stays allocated for it
    time.sleep(0.8)
    assert bytes(stub.Call(testing.Request(payload=b"next"), timeout=10).payload) == b"next"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        apps = {x["name"]: x for x in a.apps()}
        if apps["pytest"]["recv_heap"]["used"] == 0 and apps["pytest"]["inflight_calls"] == 0:
            break
        time.sleep(0.05)
    assert apps["pytest"]["recv_heap"]["used"] == 0, apps["pytest"]
    assert apps["pytest"]["inflight_calls"] == 0


def test_no_server_bound_is_unavailable(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix))
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(payload=b"x"), timeout=10)
    assert e.value.code() is StatusCode.UNAVAILABLE
    assert "no server application" in e.value.details()


def test_unreachable_peer_daemon_is_unavailable(cluster: Cluster) -> None:
    a = cluster.daemon("a")
    stub = testing.TestStub(libmrpc.connect("127.0.0.1:1", prefix=a.prefix))
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(payload=b"x"), timeout=10)
    assert e.value.code() is StatusCode.UNAVAILABLE
    assert "127.0.0.1:1" in e.value.details()


def test_no_local_daemon_is_unavailable(tmp_path) -> None:
    with pytest.raises(RpcError) as e:
        libmrpc.connect("127.0.0.1:5150", prefix=tmp_path / "nothing-here")
    assert e.value.code() is StatusCode.UNAVAILABLE
    assert "mrpcd" in e.value.details()


def test_schema_mismatch_is_failed_precondition_naming_the_clients_hash(cluster: Cluster) -> None:
    """The peer is unauthenticated: the refusal names the client's own hash only;
    the server daemon logs both."""
    a, b, _ = two_hosts(cluster)
    other = libmrpc.load_proto(ROOT / "tests" / "integration" / "schemas" / "testing.proto")
    assert other.SCHEMA_HASH != testing.SCHEMA_HASH
    stub = other.TestStub(libmrpc.connect(b.listen, prefix=a.prefix))
    with pytest.raises(RpcError) as e:
        stub.Call(other.Request(payload=b"x"), timeout=10)
    assert e.value.code() is StatusCode.FAILED_PRECONDITION
    assert other.SCHEMA_HASH in e.value.details() and testing.SCHEMA_HASH not in e.value.details()
    assert other.SCHEMA_HASH in b.log() and testing.SCHEMA_HASH in b.log()


def test_server_killed_mid_call_gives_unavailable(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    server = cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix))
    fut = stub.Call.future(testing.Request(payload=b"x", sleep_ms=3000), timeout=30)
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RpcError) as e:
        fut.result()
    assert e.value.code() is StatusCode.UNAVAILABLE, e.value
    assert time.monotonic() - t0 < 5
    # a request that kills the server in its handler fails the same way
    cluster.server(b, name="server2")
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(fail="exit"), timeout=30)
    assert e.value.code() is StatusCode.UNAVAILABLE


def test_client_sigkill_is_cleaned_up_and_others_unaffected(cluster: Cluster) -> None:
    before = shm_listing()
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    victim = cluster.app(
        "client_app.py",
        str(a.prefix),
        b.listen,
        "--forever",
        "--concurrency",
        "8",
        "--name",
        "victim",
        name="victim",
    )
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="survivor"))
    assert bytes(stub.Call(testing.Request(payload=b"a"), timeout=10).payload) == b"a"
    assert {x["name"] for x in a.apps()} == {"victim", "survivor"}
    time.sleep(0.3)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and {x["name"] for x in a.apps()} != {"survivor"}:
        time.sleep(0.05)
    assert {x["name"] for x in a.apps()} == {"survivor"}
    for i in range(50):
        assert bytes(stub.Call(testing.Request(payload=b"%d" % i), timeout=10).payload) == b"%d" % i
    assert shm_listing() == before
    # the server's daemon freed everything the killed client's calls used
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        srv = next(x for x in b.apps() if x["name"] == "server")
        if srv["serving_calls"] == 0 and srv["recv_heap"]["used"] == 0:
            break
        time.sleep(0.05)
    assert srv["serving_calls"] == 0 and srv["recv_heap"]["used"] == 0, srv


def test_sigterm_drains_in_flight_calls_and_exits_zero(cluster: Cluster) -> None:
    a, _b, stub = two_hosts(cluster)
    futs = [
        stub.Call.future(testing.Request(payload=b"%d" % i, sleep_ms=300), timeout=30)
        for i in range(8)
    ]
    time.sleep(0.1)
    a.proc.send_signal(signal.SIGTERM)
    assert [bytes(f.result().payload) for f in futs] == [b"%d" % i for i in range(8)]
    assert a.proc.wait(15) == 0
    assert not (a.prefix / "app.sock").exists() and not (a.prefix / "mrpcd.json").exists()


def test_replies_posted_before_a_drained_daemon_hangs_up_are_delivered(cluster: Cluster) -> None:
    """The app sees the daemon's last completions and its hang-up in one wake-up
    (stopped meanwhile here; a loaded machine does the same): it takes the
    completions first and fails only what is really lost."""
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    client = cluster.app("posting_client.py", str(a.prefix), b.listen, name="posting")
    time.sleep(0.05)
    client.proc.send_signal(signal.SIGSTOP)
    try:
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(15) == 0
    finally:
        client.proc.send_signal(signal.SIGCONT)
    assert client.result(30)["replies"] == [str(i) for i in range(8)]


def test_several_server_apps_on_one_daemon_route_by_service(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    echo_srv = cluster.app(
        "../../../examples/echo_server.py",
        "--prefix",
        str(b.prefix),
        wait=False,
        name="echo_server",
    )
    assert echo_srv.proc.stdout.readline().strip() == "echo server ready"
    echo = libmrpc.load_proto(ROOT / "schemas" / "echo.proto")
    channel = libmrpc.connect(b.listen, prefix=a.prefix)
    t, e = testing.TestStub(channel), echo.EchoStub(channel)
    for i in range(20):
        assert t.Call(testing.Request(payload=b"t%d" % i), timeout=10).served_by == "server"
        assert bytes(e.Echo(echo.EchoRequest(payload=b"e%d" % i), timeout=10).payload) == b"e%d" % i
    assert sorted(x["serves"][0] for x in b.apps()) == ["echo.Echo", "mrpctest.Test"]
    # a second app cannot take a service that is already served
    dup = cluster.app("server_app.py", str(b.prefix), "--name", "dup", wait=False, name="dup")
    assert dup.proc.wait(30) != 0 and "ALREADY_EXISTS" in dup.proc.stderr.read()


def test_remote_daemon_sigkill_mid_call_is_unavailable(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix))
    fut = stub.Call.future(testing.Request(payload=b"x", sleep_ms=5000), timeout=30)
    time.sleep(0.3)
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait()
    t0 = time.monotonic()
    with pytest.raises(RpcError) as e:
        fut.result()
    assert e.value.code() is StatusCode.UNAVAILABLE and b.listen in e.value.details()
    assert time.monotonic() - t0 < 5
    with pytest.raises(RpcError) as e:  # and new calls fail fast too
        stub.Call(testing.Request(payload=b"y"), timeout=10)
    assert e.value.code() is StatusCode.UNAVAILABLE


def test_local_daemon_sigkill_fails_calls_and_leaves_nothing(cluster: Cluster) -> None:
    before = shm_listing()
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix))
    assert stub.Call(testing.Request(payload=b"x"), timeout=10).served_by == "server"
    fut = stub.Call.future(testing.Request(payload=b"x", sleep_ms=5000), timeout=30)
    time.sleep(0.3)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    with pytest.raises(RpcError) as e:
        fut.result()
    assert e.value.code() is StatusCode.UNAVAILABLE and "mrpcd" in e.value.details()
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(payload=b"y"), timeout=10)
    assert e.value.code() is StatusCode.UNAVAILABLE
    assert shm_listing() == before
    # the server side finishes the orphaned call and frees its memory
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        srv = b.apps()[0]
        if srv["serving_calls"] == 0 and srv["recv_heap"]["used"] == 0:
            break
        time.sleep(0.1)
    assert srv["serving_calls"] == 0 and srv["recv_heap"]["used"] == 0, srv
