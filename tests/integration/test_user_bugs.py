"""Bugs found using mrpc as a user would (issue "One door for engines", section 4)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import ROOT


def test_failed_start_leaves_prefix_clean(tmp_path):
    """``transport: rdma`` on a host without RDMA fails to start and leaves no
    ``app.sock``, ``ctl.sock`` or ``mrpcd.lock`` behind."""
    prefix = tmp_path / "p"
    cfg = tmp_path / "rdma.yaml"
    cfg.write_text("transport: rdma\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrpcd",
            "run",
            "--prefix",
            str(prefix),
            "--listen",
            "127.0.0.1:0",
            "--config",
            str(cfg),
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    print("exit", r.returncode, r.stderr.strip().splitlines()[-1:])
    assert r.returncode != 0 and "rdma" in r.stderr
    assert "Traceback" not in r.stderr
    left = sorted(p.name for p in prefix.iterdir()) if prefix.exists() else []
    print("left in the prefix:", left)
    assert not {"app.sock", "ctl.sock", "mrpcd.lock", "mrpcd.json"} & set(left), left


def test_full_send_heap_is_an_rpc_error(cluster):
    """Building a message in a full send heap raises an RpcError with
    RESOURCE_EXHAUSTED (still a MemoryError for old callers), and the app goes on."""
    import libmrpc
    from libmrpc import RpcError, StatusCode

    testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
    a = cluster.daemon("a", config="shm:\n  send_heap_size: 1048576\n")
    b = cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="fullheap"))
    try:
        testing.Request(payload=b"x" * (2 << 20))
    except RpcError as e:
        print("error:", e)
        assert e.code() is StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(e, MemoryError)
    else:
        raise AssertionError("a 2 MiB message fit in a 1 MiB send heap")
    assert bytes(stub.Call(testing.Request(payload=b"after"), timeout=10).payload) == b"after"


def _fds_rss(pid: int) -> tuple[int, int]:
    import os

    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), rss


def test_register_leave_cycles_return_fds_and_rss_to_baseline(cluster):
    """A departing app's memfds and mappings are closed when it leaves, not at
    the next garbage collection: 1000 register/leave cycles leave the daemon's
    fd count and RSS at baseline."""
    import os
    import time

    from libmrpc._control import open_control, request

    a = cluster.daemon(
        "a",
        config="apps:\n  register_rate: 100000\n  register_burst: 100000\n"
        "shm:\n  send_heap_size: 1048576\n  recv_heap_size: 1048576\n",
    )

    def cycle(n: int) -> None:
        for _ in range(n):
            sock = open_control(str(a.prefix / "app.sock"))
            reply, fds = request(sock, {"op": "register", "name": "cycler", "pid": os.getpid()})
            assert reply.get("app_id"), reply
            for fd in fds:
                os.close(fd)
            sock.close()

    def settled() -> tuple[int, int]:
        deadline = time.monotonic() + 10
        while a.apps() and time.monotonic() < deadline:
            time.sleep(0.05)
        return _fds_rss(a.pid)

    cycle(50)
    fds0, rss0 = settled()
    t0 = time.monotonic()
    cycle(1000)
    took = time.monotonic() - t0
    fds1, rss1 = settled()
    maps = sum(
        1 for line in Path(f"/proc/{a.pid}/maps").read_text().splitlines() if "mrpc-" in line
    )
    print(
        f"1000 register/leave cycles in {took:.1f}s: daemon fds {fds0} -> {fds1}, "
        f"VmRSS {rss0} -> {rss1} kB, app mappings left {maps}"
    )
    assert fds1 <= fds0 + 2, (fds0, fds1)
    assert maps == 0
    assert rss1 <= rss0 + 8 * 1024, (rss0, rss1)


def test_a_timed_out_call_never_sends_bytes_the_app_rewrote(cluster):
    """A call times out while its zero-copy request still sits in the send
    queue (the peer stopped reading); the app reuses that memory; when the peer
    reads again it gets the original bytes (or a dropped connection), never the
    rewritten ones."""
    import socket
    import time

    import libmrpc
    from libmrpc import RpcError, StatusCode
    from libmrpc._session import get_session
    from libmrpc.wire.frames import CALL, HELLO, HELLO_ACK, FrameAssembler, encode_json_frame

    testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
    a = cluster.daemon("a", config="tcp:\n  sndbuf: 65536\n")
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # inherited by the accepted socket
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(10)
    stub = testing.TestStub(
        libmrpc.connect(f"127.0.0.1:{lsock.getsockname()[1]}", prefix=a.prefix, name="rewriter")
    )
    session = get_session(a.prefix)
    size = 8 << 20
    frames: list = []
    asm = FrameAssembler(on_frame=lambda h, b: frames.append((h.type, bytes(b))), max_body=64 << 20)

    failed: list[RpcError] = []

    def call() -> None:
        try:
            stub.Call(testing.Request(payload=b"A" * size), timeout=1.0)
        except RpcError as e:
            failed.append(e)

    import threading

    t = threading.Thread(target=call)
    t.start()
    peer, _ = lsock.accept()
    peer.settimeout(10)
    while not any(ft == HELLO for ft, _ in frames):  # the HELLO, then stop reading
        asm.feed(peer.recv(4096))
    peer.sendall(encode_json_frame(HELLO_ACK, {"ok": True, "daemon": "fake", "version": 1}))
    t.join(15)
    assert failed and failed[0].code() is StatusCode.DEADLINE_EXCEEDED, failed
    heap = session.send_heap.buf  # the app reuses its memory: every A becomes a B
    data = bytes(heap)
    pos, rewritten = data.find(b"A" * 4096), 0
    while pos >= 0:
        end = data.find(b"\0", pos)
        end = len(data) if end < 0 else end
        heap[pos:end] = b"B" * (end - pos)
        rewritten += end - pos
        pos = data.find(b"A" * 4096, end)
    del data
    assert rewritten >= size // 2, rewritten
    got = bytearray()
    peer.settimeout(3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the peer reads again
        try:
            chunk = peer.recv(1 << 20)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        got += chunk
        asm.feed(chunk)
        if any(ft == CALL for ft, _ in frames):
            break
    peer.close()
    lsock.close()
    print(
        f"rewrote {rewritten} bytes after the deadline; the peer then read {len(got)} bytes "
        f"with {got.count(b'B')} rewritten ones"
    )
    bodies = [body for ft, body in frames if ft == CALL]
    print(
        "the CALL arrived whole:",
        bool(bodies),
        "| its payload intact:",
        bool(bodies) and bodies[0].count(b"A") >= size,
    )
    assert b"B" not in got
    assert not bodies or (b"B" not in bodies[0] and bodies[0].count(b"A") >= size)


def test_acl_attached_while_calls_are_held_checks_them(cluster):
    """Calls marshalled before an ACL was attached and held meanwhile by a
    delay-mode ratelimit reach the ACL without a private view: it copies them
    out then and checks them (a deny-list never lets them pass unchecked)."""
    import time

    import libmrpc
    from libmrpc import RpcError

    testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b, "--mode", "inline")
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="held"))
    stub.Call(testing.Request(payload=b"warm"), timeout=10)
    a.ctl(
        "policy",
        "attach",
        "ratelimit",
        "--app",
        "held",
        "--set",
        "max_tokens=1",
        "--set",
        "tokens_per_fill=1",
        "--set",
        "fill_interval=0.5",
        "--set",
        "mode=delay",
    )
    futures = [
        stub.Call.future(testing.Request(key="admin", payload=b"x" * 1000), timeout=20)
        for _ in range(4)
    ]
    time.sleep(0.3)  # the first went; the rest are held by the ratelimit
    a.ctl(
        "policy",
        "attach",
        "acl",
        "--app",
        "held",
        "--set",
        "default=allow",
        "--set",
        "rules=[{name: no-admin, action: deny, field: key, equals: admin}]",
    )
    outcomes = []
    for f in futures:
        try:
            f.result()
            outcomes.append("passed")
        except RpcError as e:
            outcomes.append(e.code().name)
    print("held calls:", outcomes)
    assert outcomes[1:] == ["PERMISSION_DENIED"] * 3, outcomes


def test_a_reply_over_the_clients_max_message_size_fails_that_call_only(cluster):
    """One reply larger than the client daemon's max_message_size fails that
    call with RESOURCE_EXHAUSTED naming both limits; the other calls on the
    same connection go on."""
    import libmrpc
    from libmrpc import RpcError, StatusCode

    testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
    a = cluster.daemon("a", config="max_message_size: 1MiB\n")
    b = cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="small"))
    stub.Call(testing.Request(payload=b"warm"), timeout=10)
    slow = stub.Call.future(testing.Request(payload=b"slow", sleep_ms=1500), timeout=20)
    try:
        stub.Call(testing.Request(reply_size=2 << 20), timeout=20)
    except RpcError as e:
        print("oversize reply:", e)
        assert e.code() is StatusCode.RESOURCE_EXHAUSTED
        assert str(1 << 20) in e.details() and "max_message_size" in e.details()
    else:
        raise AssertionError("a 2 MiB reply passed a 1 MiB max_message_size")
    assert bytes(slow.result().payload) == b"slow"  # the other call on the connection survived
    assert bytes(stub.Call(testing.Request(payload=b"after"), timeout=10).payload) == b"after"


def test_a_request_over_the_servers_max_message_size_is_refused_up_front(cluster):
    """The daemons exchange their limits in the handshake: a request the server's
    daemon would not take fails at the client with both limits named."""
    import libmrpc
    from libmrpc import RpcError, StatusCode

    testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
    a = cluster.daemon("a")
    b = cluster.daemon("b", config="max_message_size: 1MiB\n")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="big"))
    stub.Call(testing.Request(payload=b"warm"), timeout=10)
    try:
        stub.Call(testing.Request(payload=b"x" * (2 << 20)), timeout=10)
    except RpcError as e:
        print("oversize request:", e)
        assert e.code() is StatusCode.RESOURCE_EXHAUSTED and str(1 << 20) in e.details()
    else:
        raise AssertionError("a 2 MiB request passed a 1 MiB max_message_size")
    assert bytes(stub.Call(testing.Request(payload=b"after"), timeout=10).payload) == b"after"


def test_an_old_peer_sending_an_oversize_reply_fails_that_call_only(cluster):
    """A peer that does not announce its limit (an older daemon) sends one reply
    over the client's max_message_size: that call alone fails."""
    import socket
    import threading

    import libmrpc
    from libmrpc import RpcError, StatusCode
    from libmrpc._heap import Heap
    from libmrpc.wire.frames import (
        CALL,
        HELLO,
        HELLO_ACK,
        REPLY,
        FrameAssembler,
        encode_header,
        encode_json_frame,
    )

    testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
    a = cluster.daemon("a", config="max_message_size: 1MiB\n")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(10)
    stub = testing.TestStub(
        libmrpc.connect(f"127.0.0.1:{lsock.getsockname()[1]}", prefix=a.prefix, name="oldpeer")
    )
    heap = Heap.private(1 << 16)
    msg = testing.Reply.new(heap, payload=b"small")
    head, segs = testing.MARSHAL["mrpctest.Reply"](heap.buf, msg._off, 1 << 30, 1 << 30)
    small = bytes(head) + b"".join(bytes(s) for s in segs)
    results: dict[str, object] = {}

    def call(tag: str, payload: bytes) -> None:
        try:
            results[tag] = bytes(stub.Call(testing.Request(payload=payload), timeout=10).payload)
        except RpcError as e:
            results[tag] = e

    threads = [threading.Thread(target=call, args=(t, t.encode())) for t in ("big", "small")]
    for t in threads:
        t.start()
    peer, _ = lsock.accept()
    peer.settimeout(10)
    frames: list = []
    asm = FrameAssembler(on_frame=lambda h, b: frames.append((h, bytes(b))))
    acked = False
    while sum(1 for h, _ in frames if h.type == CALL) < 2:
        data = peer.recv(1 << 16)
        assert data, "the client daemon hung up"
        asm.feed(data)
        if not acked and any(h.type == HELLO for h, _ in frames):
            peer.sendall(
                encode_json_frame(HELLO_ACK, {"ok": True, "daemon": "old"})
            )  # no max_message_size
            acked = True
    calls = {bytes(b).find(b"big") >= 0: h.call_id for h, b in frames if h.type == CALL}
    big_body = 2 << 20
    peer.sendall(
        encode_header(REPLY, call_id=calls[True], method=0, body_len=big_body) + b"\0" * big_body
    )
    peer.sendall(encode_header(REPLY, call_id=calls[False], method=0, body_len=len(small)) + small)
    for t in threads:
        t.join(15)
    peer.close()
    lsock.close()
    print("big:", results.get("big"), "| small:", results.get("small"))
    assert (
        isinstance(results["big"], RpcError)
        and results["big"].code() is StatusCode.RESOURCE_EXHAUSTED
    )
    assert results["small"] == b"small"
