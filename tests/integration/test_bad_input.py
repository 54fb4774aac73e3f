"""Untrusted input gets a clear gRPC status and nothing else breaks.

Applications are untrusted (descriptors, references inside shared memory, ring
counters, control messages, schemas); so are peer daemons (bytes on the wire).
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

import libmrpc
from libmrpc import RpcError, StatusCode
from libmrpc._control import open_control, recv_msg, request, send_msg
from libmrpc._heap import Heap
from libmrpc._session import Call, get_session
from libmrpc.wire.frames import (
    CALL,
    ERROR,
    HELLO,
    HELLO_ACK,
    REPLY,
    FrameAssembler,
    encode_header,
    encode_json_frame,
)
from libmrpc.wire.ring import SUB_CALL, SUB_RELEASE
from tests.integration.conftest import ROOT, Cluster

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
REQ = "mrpctest.Request"


@pytest.fixture
def hosts(cluster: Cluster):
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="pytest"))
    assert bytes(stub.Call(testing.Request(payload=b"warm"), timeout=10).payload) == b"warm"
    return a, b, stub


def raw_call(
    session, conn: int, method: int, off: int, call_id: int | None = None
) -> RpcError | None:
    """Post a hand-made CALL descriptor and wait for its completion."""
    cid = call_id if call_id is not None else 10_000_000 + len(session.calls)
    call = Call(cid, None, testing.Reply, "raw")
    session.calls[cid] = call
    session._push(SUB_CALL, 0, conn, cid, method, off, 0, 0)
    assert session.wait_call(call, 10), "the daemon never completed the call"
    return call.error


def test_malformed_descriptors_fail_that_call_only(hosts) -> None:
    a, _b, stub = hosts
    s = get_session(a.prefix)
    conn = next(iter(s._conns.values()))
    req = testing.Request(payload=b"ok")
    assert raw_call(s, 999, 0, req._off).code() is StatusCode.INVALID_ARGUMENT  # unknown connection
    assert raw_call(s, conn, 77, req._off).code() is StatusCode.UNIMPLEMENTED  # unknown method id
    for off in (0, 3, 1 << 40, len(s.send_heap.buf) + 64):
        err = raw_call(s, conn, 0, off)
        assert err is not None and err.code() is StatusCode.INVALID_ARGUMENT, off
        assert "offset" in err.details()
    assert raw_call(s, conn, 0, req._off) is None  # the same path with good values works
    # releasing memory the app does not hold, and unknown descriptor kinds, are ignored
    s._push(SUB_RELEASE, 0, 0, 0, 0, 12345 * 64, 0, 0)
    s._push(99, 0, 0, 0, 0, 0, 0, 0)
    assert bytes(stub.Call(req, timeout=10).payload) == b"ok"


def test_out_of_bounds_references_in_the_request_are_invalid_argument(hosts) -> None:
    a, b, stub = hosts
    s = get_session(a.prefix)
    conn = next(iter(s._conns.values()))
    spec = testing.Request._SPECS["payload"]
    for bad_off, bad_len in ((len(s.send_heap.buf) - 4, 64), (1 << 31, 8), (64, 1 << 31)):
        req = testing.Request(payload=b"will be corrupted")
        struct.pack_into("<II", s.send_heap.buf, req._off + spec.off, bad_off, bad_len)
        err = raw_call(s, conn, 0, req._off)
        assert err is not None and err.code() in (
            StatusCode.INVALID_ARGUMENT,
            StatusCode.RESOURCE_EXHAUSTED,
        )
        assert "payload" in err.details(), err.details()
    assert bytes(stub.Call(testing.Request(payload=b"fine"), timeout=10).payload) == b"fine"
    assert {x["name"] for x in b.apps()} == {"server"}


def _frames(sock: socket.socket, want: int, timeout: float = 10) -> list:
    got: list = []
    asm = FrameAssembler(on_frame=lambda h, body: got.append((h, bytes(body))))
    sock.settimeout(timeout)
    while len(got) < want:
        data = sock.recv(65536)
        if not data:
            break
        asm.feed(data)
    return got


def _hello(schema_hash: str) -> bytes:
    return encode_json_frame(
        HELLO,
        {
            "version": 1,
            "schema_hash": schema_hash,
            "services": ["mrpctest.Test"],
            "app": "raw-peer",
            "pid": 1,
            "daemon": "test",
        },
    )


def test_garbage_on_the_wire_closes_only_that_connection(hosts) -> None:
    _a, b, stub = hosts
    host, port = b.listen.rsplit(":", 1)
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 64, encode_header(CALL, body_len=10)[:20]):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            assert sock.recv(1024) == b""  # the daemon closed it
    # a handshake with the wrong schema hash is refused with a clear status
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(_hello("0" * 16))
        ((h, body),) = _frames(sock, 1)
        assert h.type == HELLO_ACK and b'"ok":false' in body and b"schema mismatch" in body
    assert bytes(stub.Call(testing.Request(payload=b"alive"), timeout=10).payload) == b"alive"
    assert "Traceback" not in b.log()


def test_malformed_message_image_from_a_peer_is_refused_per_call(hosts) -> None:
    _a, b, _stub = hosts
    host, port = b.listen.rsplit(":", 1)
    heap = Heap.private(1 << 20)
    msg = testing.Request.new(heap, payload=b"from a raw peer")
    head, segs = testing.MARSHAL[REQ](heap.buf, msg._off, 1 << 30, 1 << 30)
    good = bytes(head) + b"".join(bytes(x) for x in segs)
    bad = bytearray(good)
    struct.pack_into(
        "<II", bad, testing.Request._SPECS["payload"].off, 1 << 20, 5
    )  # past the image
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            _hello(testing.SCHEMA_HASH)
            + encode_header(CALL, call_id=1, method=0, body_len=len(bad))
            + bad
            + encode_header(CALL, call_id=2, method=0, body_len=len(good))
            + good
            + encode_header(CALL, call_id=3, method=40, body_len=len(good))
            + good
        )
        frames = {h.call_id: (h, body) for h, body in _frames(sock, 4) if h.type != HELLO_ACK}
    h1, body1 = frames[1]
    assert h1.type == ERROR and h1.status == StatusCode.INVALID_ARGUMENT and b"payload" in body1
    h2, body2 = frames[2]
    assert h2.type == REPLY
    testing.VALIDATE["mrpctest.Reply"](memoryview(body2))
    assert (
        bytes(testing.Reply._from_image(memoryview(body2), 0, None).payload) == b"from a raw peer"
    )
    h3, _ = frames[3]
    assert h3.type == ERROR and h3.status == StatusCode.UNIMPLEMENTED
    deadline = time.monotonic() + 10  # the server app hands received blocks back in batches
    while True:
        srv = next(x for x in b.apps() if x["name"] == "server")
        if (
            srv["recv_heap"]["used"] == 0 and srv["serving_calls"] == 0
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert srv["recv_heap"]["used"] == 0 and srv["serving_calls"] == 0


def test_bad_schemas_are_rejected_at_bind(hosts) -> None:
    a, _, _ = hosts
    s = get_session(a.prefix)
    with pytest.raises(RpcError) as e:
        s.control({"op": "bind_schema", "texts": {"broken.proto": 'syntax = "proto3"; message {'}})
    assert e.value.code() is StatusCode.INVALID_ARGUMENT and "broken.proto" in e.value.details()
    injection = 'syntax = "proto3"; package evil;\nmessage M { string __class__ = 1; }\n'
    with pytest.raises(RpcError) as e:
        s.control({"op": "bind_schema", "texts": {"evil.proto": injection}})
    assert e.value.code() is StatusCode.INVALID_ARGUMENT and "__class__" in e.value.details()
    with pytest.raises(RpcError) as e:
        s.control({"op": "bind_schema", "texts": "not a mapping"})
    assert e.value.code() is StatusCode.INVALID_ARGUMENT


def test_control_socket_garbage_gets_errors(hosts) -> None:
    a, _, _ = hosts
    with open_control(str(a.prefix / "app.sock")) as sock:
        sock.send(b"\xff not json")
        reply, _ = recv_msg(sock)
        assert (
            reply is not None and not reply["ok"] and reply["code"] == StatusCode.INVALID_ARGUMENT
        )
        send_msg(sock, {"op": "connect", "addr": "x"})
        reply, _ = recv_msg(sock)
        assert reply["code"] == StatusCode.FAILED_PRECONDITION  # not registered yet
        reply, fds = request(sock, {"op": "register", "name": "raw"})
        assert len(fds) == 5
        for fd in fds:
            import os

            os.close(fd)
        for msg, code in (
            ({"op": "nope"}, StatusCode.UNIMPLEMENTED),
            ({"op": "connect", "slot": 0, "addr": "x"}, StatusCode.INVALID_ARGUMENT),
            ({"op": "serve", "slot": 7, "services": ["x"]}, StatusCode.INVALID_ARGUMENT),
        ):
            send_msg(sock, msg)
            reply, _ = recv_msg(sock)
            assert reply["code"] == code, (msg, reply)
    # the raw app is cleaned up when its socket closes
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "raw" in {x["name"] for x in a.apps()}:
        time.sleep(0.05)
    assert "raw" not in {x["name"] for x in a.apps()}


def test_corrupt_ring_counters_disconnect_that_app_only(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    good = cluster.app(
        "client_app.py", str(a.prefix), b.listen, "--forever", "--name", "good", name="good"
    )
    s = get_session(a.prefix, "corrupt")
    struct.pack_into("<Q", s.submit.buf, 64, 1 << 40)  # an impossible tail
    import os

    os.eventfd_write(s.regions.submit_efd, 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "corrupt" in {x["name"] for x in a.apps()}:
        time.sleep(0.05)
    assert {x["name"] for x in a.apps()} == {"good"}
    assert "corrupted its rings" in a.log()
    assert good.proc.poll() is None  # still calling happily
