"""Hot restart with calls in flight: the calls that wait for an answer move to the
new process (``mrpcd/hotrestart_calls.py``), so the pause does not depend on how
long the slowest call takes, and no call fails, repeats or goes unanswered.

The server runs in the test process (a handler that counts every execution and
notices a cancel); the clients too.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import libmrpc
from libmrpc import StatusCode
from tests.integration.conftest import ROOT, Cluster, Daemon, mrpcd_running, stop_successor

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")


class Counting(testing.TestServicer):  # type: ignore[misc, name-defined]
    """Sleeps ``sleep_ms``; with key "until-cancelled" until its caller cancels, with
    "until-released" at least ``sleep_ms`` and until the test sets ``release`` (so a
    slow load of the new mrpcd on a busy machine cannot outlast the call)."""

    def __init__(self) -> None:
        self.runs: collections.Counter[bytes] = collections.Counter()
        self.cancelled: set[bytes] = set()
        self.lock = threading.Lock()
        self.release = threading.Event()

    def Call(self, request: Any, context: Any) -> Any:
        payload = bytes(request.payload)
        with self.lock:
            self.runs[payload] += 1
        end = time.monotonic() + request.sleep_ms / 1000
        cap = time.monotonic() + 60
        while time.monotonic() < end or (
            request.key == "until-released" and not self.release.is_set() and time.monotonic() < cap
        ):
            if request.key == "until-cancelled" and context.cancelled():
                with self.lock:
                    self.cancelled.add(payload)
                break
            time.sleep(0.01)
        return testing.Reply(payload=payload)


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(daemon)``: a Counting server app (in this process) at ``daemon``."""
    servers = []

    def start(d: Daemon, name: str = "srv") -> Counting:
        servicer = Counting()
        server = libmrpc.Server(prefix=str(d.prefix), max_workers=80, name=name)
        server.add_servicer(servicer)
        server.start()
        servers.append(server)
        return servicer

    yield start
    for server in servers:
        server.stop(1.0)


def _restart(d: Daemon, *futures: Any) -> dict[str, Any]:
    """Hot restart ``d``; ``r["in_flight"]``: how many ``futures`` were not done when
    the restart answered (the hand-over was over by then)."""
    old = d.ctl("status")["pid"]
    r = d.ctl("daemon", "restart")
    r["in_flight"] = sum(not f.done() for f in futures)
    assert r["old_pid"] == old and r["new_pid"] != old, r
    deadline = time.monotonic() + 10
    while mrpcd_running(old) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mrpcd_running(old), f"the old mrpcd (pid {old}) still runs after the hand-over"
    assert d.ctl("status")["pid"] == r["new_pid"]
    return r


def _stub(target: str, d: Daemon, name: str) -> Any:
    return testing.TestStub(libmrpc.connect(target, prefix=str(d.prefix), name=name))


def _slow_call_across(d: Daemon, call: Any, srv: Counting, tag: str, handler_s: float) -> float:
    """A call whose handler takes ``handler_s`` (and runs until the restart is over)
    is in flight while ``d`` restarts: the pause is short and the call completes
    once, with its payload. ``call(payload, sleep_ms)``: starts the call, returns
    a function that waits for its reply's payload."""
    payload = f"slow-{tag}".replace(" ", "-").encode()
    t0 = time.monotonic()
    srv.release.clear()
    result = call(payload, int(handler_s * 1000))
    while not srv.runs[payload]:  # the handler runs: the call is in flight at both daemons
        assert time.monotonic() - t0 < 10, "the slow call did not reach its handler"
        time.sleep(0.01)
    r = _restart(d)
    took = time.monotonic() - t0
    srv.release.set()
    print(
        f"{tag}: restart of {d.prefix.name} with a {handler_s:g}-s call in flight: "
        f"stall_ms={r['stall_ms']} settle_ms={r['settle_ms']} startup_ms={r['startup_ms']} "
        f"(restart answered {took:.2f} s after the call began)"
    )
    assert r["stall_ms"] < 1000, r
    assert result() == payload
    assert srv.runs[payload] == 1, srv.runs  # executed exactly once
    return float(r["stall_ms"])


def _future_call(stub: Any) -> Any:
    def call(payload: bytes, sleep_ms: int) -> Any:
        req = testing.Request(payload=payload, sleep_ms=sleep_ms, key="until-released")
        fut = stub.Call.future(req, timeout=90)
        return lambda: bytes(fut.result().payload)

    return call


def test_a_slow_call_moves_to_the_new_process_of_either_daemon(
    cluster: Cluster, serve: Any
) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    try:
        srv = serve(b)
        stub = _stub(b.listen, a, "cli")
        assert stub.Call(testing.Request(payload=b"hi"), timeout=10).payload == b"hi"
        _slow_call_across(a, _future_call(stub), srv, "client's daemon", 3.0)
        _slow_call_across(b, _future_call(stub), srv, "server's daemon", 3.0)
        assert stub.Call(testing.Request(payload=b"after"), timeout=10).payload == b"after"
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"
        assert stop_successor(b), "the new mrpcd did not stop on SIGTERM"


CLIENT = """
import json, sys
import libmrpc
testing = libmrpc.load_proto(sys.argv[3])
stub = testing.TestStub(libmrpc.connect(sys.argv[2], prefix=sys.argv[1], name="cli"))
stub.Call(testing.Request(payload=b"hi"), timeout=10)
print("READY", flush=True)
for line in sys.stdin:
    payload, sleep_ms = line.split()
    req = testing.Request(payload=payload.encode(), sleep_ms=int(sleep_ms), key="until-released")
    print(json.dumps({"payload": bytes(stub.Call(req, timeout=90).payload).decode()}), flush=True)
"""


def test_a_slow_call_between_apps_of_one_daemon_moves_over_tcp_and_local(
    cluster: Cluster, serve: Any, tmp_path: Path
) -> None:
    a = cluster.daemon("a")
    try:
        srv = serve(a)
        script = tmp_path / "client.py"
        script.write_text(CLIENT)
        proto = str(ROOT / "schemas" / "testing.proto")
        cli = cluster.app(str(script), str(a.prefix), a.listen, proto, name="cli")
        assert cli.proc.stdin is not None and cli.proc.stdout is not None

        def call(payload: bytes, sleep_ms: int) -> Any:
            cli.proc.stdin.write(f"{payload.decode()} {sleep_ms}\n")  # type: ignore[union-attr]
            cli.proc.stdin.flush()  # type: ignore[union-attr]

            def result() -> bytes:
                line = cli.proc.stdout.readline()  # type: ignore[union-attr]
                assert line, f"the client app failed: {cli.proc.stderr.read()}"  # type: ignore[union-attr]
                return bytes(json.loads(line)["payload"].encode())

            return result

        _slow_call_across(a, call, srv, "tcp loopback", 3.0)
        a.ctl("engine", "upgrade", "tcp", "--module", "engines.local", "--app", "cli")
        engines = [e["engine"] for x in a.apps() if x["name"] == "cli" for e in x["datapath"]]
        assert "local" in engines, engines
        _slow_call_across(a, call, srv, "local transport", 3.0)
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"


def test_a_call_longer_than_restart_timeout_no_longer_blocks_a_restart(
    cluster: Cluster, serve: Any
) -> None:
    a = cluster.daemon("a", config="restart_timeout: 4\n")  # 2 s is too short for a busy CI
    b = cluster.daemon("b")
    try:
        srv = serve(b)
        stub = _stub(b.listen, a, "cli")
        _slow_call_across(a, _future_call(stub), srv, "5-s handler, restart_timeout 4 s", 5.0)
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"


def _load(stub: Any, stop: threading.Event, out: dict[str, Any]) -> None:
    """64 calls in flight until ``stop``: one in eight sleeps 0.5-1 s at the server."""
    seq = itertools.count()
    ok = collections.Counter[bytes]()
    errors: collections.Counter[str] = collections.Counter()

    async def worker(w: int) -> None:
        while not stop.is_set():
            n = next(seq)
            payload = f"{w}:{n}".encode()
            sleep_ms = 500 + (n * 37) % 500 if n % 8 == 0 else 0
            try:
                reply = await stub.Call.aio(
                    testing.Request(payload=payload, sleep_ms=sleep_ms), timeout=30
                )
            except libmrpc.RpcError as e:
                errors[f"{e.code().name}: {e.details()}"] += 1
                continue
            ok[payload] += 1 if bytes(reply.payload) == payload else 1000

    async def run() -> None:
        await asyncio.gather(*(worker(w) for w in range(64)))

    asyncio.run(run())
    out.update(ok=ok, errors=errors, sent=next(seq))


def test_64_calls_in_flight_with_slow_ones_lose_nothing_across_restarts(
    cluster: Cluster, serve: Any
) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    try:
        srv = serve(b)
        stub = _stub(b.listen, a, "cli")
        stub.Call(testing.Request(payload=b"warm"), timeout=10)
        stop, out = threading.Event(), {}
        t = threading.Thread(target=_load, args=(stub, stop, out))
        t.start()
        stalls = []
        held = []  # and two calls that run until each restart is over
        for d in (a, b):
            time.sleep(1.5)
            srv.release.clear()
            reqs = [
                testing.Request(payload=f"held-{d.prefix.name}{i}".encode(), key="until-released")
                for i in range(2)
            ]
            held += [(bytes(req.payload), stub.Call.future(req, timeout=60)) for req in reqs]
            while not all(srv.runs[bytes(req.payload)] for req in reqs):
                time.sleep(0.01)
            r = _restart(d, *(f for _, f in held[-2:]))
            srv.release.set()
            stalls.append(r["stall_ms"])
            print(f"restart of {d.prefix.name} under load: {r}")
            assert r["in_flight"] == 2, r
        time.sleep(1.0)
        stop.set()
        assert [bytes(f.result().payload) for _, f in held] == [p for p, _ in held]
        t.join(40)
        assert not t.is_alive(), "calls left unanswered"
        ok, errors = out["ok"], out["errors"]
        print(f"calls: {sum(ok.values())} ok, errors {dict(errors)}; stall_ms {stalls}")
        assert not errors, errors
        assert all(n == 1 for n in ok.values()), "a reply came twice or with a wrong payload"
        assert sum(ok.values()) == out["sent"] == len(ok) > 200, out["sent"]
        runs = {p: n for p, n in srv.runs.items() if p != b"warm" and not p.startswith(b"held")}
        assert runs == dict.fromkeys(ok, 1), "a call ran twice or a call did not run"
        assert all(s < 1000 for s in stalls), stalls
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"
        assert stop_successor(b), "the new mrpcd did not stop on SIGTERM"


def _inflight(d: Daemon, app: str) -> int:
    (row,) = [x for x in d.apps() if x["name"] == app]
    return int(row["inflight_calls"])


def test_deadlines_and_cancels_of_calls_carried_over_still_work(
    cluster: Cluster, serve: Any
) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    try:
        srv = serve(b)
        stub = _stub(b.listen, a, "cli")
        stub.Call(testing.Request(payload=b"warm"), timeout=10)
        wait = testing.Request(payload=b"cancel-1", key="until-cancelled", sleep_ms=15000)
        first = stub.Call.future(wait, timeout=60)
        for attempt in range(3):  # a busy machine may load the new mrpcd for longer than 1.5 s
            late_payload = f"late-{attempt}".encode()
            t0 = time.monotonic()
            req = testing.Request(payload=late_payload, sleep_ms=5000)
            late = stub.Call.future(req, timeout=1.5)
            while not (srv.runs[late_payload] and srv.runs[b"cancel-1"]):
                time.sleep(0.01)
            r = _restart(a, late, first)  # the caller's daemon: both wait at its transport
            print(f"restart of a with a 1.5-s-deadline call and a call to cancel in flight: {r}")
            if r["in_flight"] == 2:
                break
        assert r["in_flight"] == 2, r
        with pytest.raises(libmrpc.RpcError) as e:
            late.result()
        took = time.monotonic() - t0
        print(f"the 1.5-s call ended after {took:.2f} s: {e.value.code().name}")
        assert e.value.code() is StatusCode.DEADLINE_EXCEEDED and took < 3.0
        while _inflight(a, "cli") != 1:  # the new mrpcd completed it (the library too)
            assert time.monotonic() - t0 < 4.0, "the new mrpcd did not enforce the deadline"
            time.sleep(0.05)
        assert first.cancel()
        t1 = time.monotonic()
        while b"cancel-1" not in srv.cancelled:
            assert time.monotonic() - t1 < 3.0, "the cancel did not reach the server's handler"
            time.sleep(0.02)
        with pytest.raises(libmrpc.RpcError) as e:
            first.result()
        assert e.value.code() is StatusCode.CANCELLED
        # the server's daemon restarts with a call in flight: the peer's CANCEL reaches it
        wait = testing.Request(payload=b"cancel-2", key="until-cancelled", sleep_ms=15000)
        second = stub.Call.future(wait, timeout=30)
        while not srv.runs[b"cancel-2"]:
            time.sleep(0.01)
        assert _restart(b, second)["in_flight"] == 1
        assert second.cancel()
        t2 = time.monotonic()
        while b"cancel-2" not in srv.cancelled:
            assert time.monotonic() - t2 < 3.0, "the cancel did not reach the restarted server"
            time.sleep(0.02)
        time.sleep(max(0.0, t0 + 5.3 - time.monotonic()))  # the expired call's late reply
        assert stub.Call(testing.Request(payload=b"after"), timeout=10).payload == b"after"
        assert _inflight(a, "cli") == 0
        assert all(n == 1 for n in srv.runs.values()), srv.runs
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"
        assert stop_successor(b), "the new mrpcd did not stop on SIGTERM"


def test_a_failed_take_over_leaves_the_calls_it_carried_with_the_old_process(
    cluster: Cluster, serve: Any
) -> None:
    a = cluster.daemon("a", env={"MRPC_TEST_FAIL_TAKEOVER": "restore"})
    b = cluster.daemon("b", env={"MRPC_TEST_FAIL_TAKEOVER": "restore"})
    srv = serve(b)
    stub = _stub(b.listen, a, "cli")
    for d in (a, b):
        srv.release.clear()  # the calls run until the restart failed
        reqs = [
            testing.Request(
                payload=f"{d.prefix.name}{i}".encode(), sleep_ms=500, key="until-released"
            )
            for i in range(4)
        ]
        futs = [stub.Call.future(req, timeout=60) for req in reqs]
        while sum(srv.runs[bytes(req.payload)] for req in reqs) < 4:
            time.sleep(0.01)
        r = d.ctl("daemon", "restart", check=False)
        pending = sum(not f.done() for f in futs)
        srv.release.set()
        print(f"{d.prefix.name}: restart failed with {pending} slow calls in flight: {r.stderr}")
        assert r.returncode != 0 and "MRPC_TEST_FAIL_TAKEOVER=restore" in r.stderr, r.stderr
        assert pending == 4, "the calls finished before the state went to the new process"
        assert d.ctl("status")["pid"] == d.proc.pid
        assert [f.result().payload for f in futs] == [
            f"{d.prefix.name}{i}".encode() for i in range(4)
        ]
    assert all(n == 1 for n in srv.runs.values()), srv.runs
    assert stub.Call(testing.Request(payload=b"after"), timeout=10).payload == b"after"


def test_a_calls_format_the_new_code_does_not_know_fails_the_take_over() -> None:
    from mrpcd.hotrestart_calls import CALLS_VERSION, UnknownCallsFormat, check_version

    check_version(None)  # nothing carried (an old daemon's document)
    check_version({"version": CALLS_VERSION, "served": []})
    with pytest.raises(UnknownCallsFormat, match="format 99"):
        check_version({"version": 99, "served": []})
