"""``runtimes: 2``: every datapath and connection has one owning runtime.

The server app lands on runtime 1 while the ingress (and its connections) is on
runtime 0, so every inbound call crosses runtimes (``AppPort.deliver``) and
every reply crosses back (``TcpIngress.post``); clients sit on both runtimes.
Under 64 calls in flight, policies — including a content-reading ACL, which
makes inbound calls land privately — are attached and detached on both daemons
over and over: no call may fail, none may be lost, none may reach the server
twice.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from pathlib import Path

import libmrpc
from libmrpc import RpcError
from tests.integration.conftest import Cluster

ROOT = Path(__file__).resolve().parents[2]
testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
TWO = "runtimes: 2\n"
BIG = 256 << 10

CHURN = [
    ("null", []),
    ("acl", ["--set", "default=allow"]),
    ("ratelimit", ["--set", "max_tokens=1000000", "--set", "mode=delay"]),
    ("metrics", []),
    ("qos", []),
]


def test_two_runtimes_under_policy_churn_lose_and_duplicate_nothing(cluster: Cluster) -> None:
    a = cluster.daemon("a", config=TWO)
    b = cluster.daemon("b", config=TWO)
    cluster.server(b, "--mode", "async")  # app #1 on b: runtime 1, the ingress is on runtime 0
    steady = [
        cluster.app(
            "steady_client.py", str(d.prefix), b.listen, "--seconds", "60", "--name", n, name=n
        )
        for d, n in (
            (a, "steady-a"),
            (b, "steady-b"),
        )  # b's own client: a local, cross-runtime call
    ]
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="loadgen"))
    stub.Call(testing.Request(payload=b"warm"), timeout=10)
    runtimes = {x["name"]: x["runtime"] for d in (a, b) for x in d.apps()}
    assert runtimes["server"] == "rt1" and {runtimes["steady-a"], runtimes["loadgen"]} == {
        "rt0",
        "rt1",
    }, runtimes

    seen: collections.Counter[bytes] = collections.Counter()
    failures: list[str] = []
    stop = threading.Event()

    async def load() -> None:
        async def worker(w: int) -> None:
            i = 0
            big = w % 4 == 0  # replies that fill the socket: writes from both sides of a flush
            while not stop.is_set():
                body = f"{w}:{i}".encode()
                try:
                    request = testing.Request(
                        payload=body, key=body.decode(), reply_size=BIG if big else 0
                    )
                    reply = await stub.Call.aio(request, timeout=30)
                    if reply.key != body.decode() or len(reply.payload) != (
                        BIG if big else len(body)
                    ):
                        failures.append(f"mismatch {body!r} -> {reply.key!r}")
                    seen[body] += 1
                except RpcError as e:
                    failures.append(f"{body!r}: {e}")
                i += 1

        await asyncio.gather(*(worker(w) for w in range(64)))

    runner = threading.Thread(target=lambda: asyncio.run(load()))
    runner.start()
    ops = 0
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            for name, args in CHURN:
                for d, side in ((a, "send"), (b, "receive")):
                    attached = d.ctl("policy", "attach", name, "--all", "--side", side, *args)
                    assert attached["engine_ids"]
                    time.sleep(0.02)
                    d.ctl("policy", "detach", "--engine", name, "--app", "*")
                    ops += 2
    finally:
        stop.set()
        runner.join(60)
    results = [app.result() for app in steady]
    print(
        f"2 runtimes, 64 in flight, {ops} policy operations: {sum(seen.values())} calls, "
        f"steady {[r['ok'] for r in results]}, failures {len(failures)}"
    )
    assert not failures, failures[:5]
    assert all(not r["errors"] for r in results), results
    assert sum(seen.values()) > 500 and max(seen.values()) == 1
    assert ops >= 20
    for d in (a, b):
        assert all(len(x["datapath"]) == 2 for x in d.apps())  # every policy detached again
    # every call reached the server exactly once: the daemon counted each delivery
    (server,) = [x for x in b.apps() if x["name"] == "server"]
    made = sum(seen.values()) + 1 + sum(r["ok"] + 1 for r in results)  # + warm-up calls
    assert server["counters"]["served"] == made, (server["counters"], made)
