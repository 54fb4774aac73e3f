"""Many RPCs: nothing grows, nothing is lost or duplicated."""

from __future__ import annotations

import asyncio
import gc
import time

import libmrpc
from libmrpc._session import get_session
from tests.integration.conftest import ROOT, Cluster

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")


def _wait_idle(daemon, name: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        app = next(x for x in daemon.apps() if x["name"] == name)
        idle = (
            app["recv_heap"]["used"] == 0
            and app["inflight_calls"] == 0
            and app["serving_calls"] == 0
        )
        if idle or time.monotonic() > deadline:
            return app
        time.sleep(0.05)


def test_100k_small_rpcs_leave_no_heap_growth(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b, "--mode", "inline")
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="soak"))
    session = get_session(a.prefix)
    stub.Call(testing.Request(payload=b"warm-up"), timeout=10)
    gc.collect()
    baseline = session.send_heap.statistics().used
    total, concurrency = 100_000, 64
    seen: set[int] = set()

    async def worker(tag: int) -> None:
        for i in range(tag, total, concurrency):
            reply = await stub.Call.aio(
                testing.Request(payload=i.to_bytes(4, "little")), timeout=30
            )
            value = int.from_bytes(reply.payload, "little")
            assert value == i and value not in seen
            seen.add(value)

    async def run() -> None:
        await asyncio.gather(*(worker(t) for t in range(concurrency)))

    t0 = time.monotonic()
    asyncio.run(run())
    took = time.monotonic() - t0
    assert len(seen) == total
    print(f"100k RPCs in {took:.1f}s ({total / took:.0f}/s)")
    gc.collect()
    assert session.send_heap.statistics().used == baseline
    assert not session.calls and not session.replies
    client = _wait_idle(a, "soak")
    server = _wait_idle(b, "server")
    assert client["recv_heap"]["used"] == 0 and client["inflight_calls"] == 0, client
    assert server["recv_heap"]["used"] == 0 and server["serving_calls"] == 0, server
    assert client["counters"]["calls"] == total + 1 and server["counters"]["served"] == total + 1
