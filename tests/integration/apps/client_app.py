"""A client application for integration tests.

usage: client_app.py PREFIX TARGET [--calls N] [--concurrency C] [--size BYTES] [--forever]
Makes calls to mrpctest.Test/Call with up to C outstanding (asyncio), prints
READY after the first success, then one JSON line with the results (with
--forever: when stdin closes). Every request's payload is unique and checked
in its reply; ``max_gap_s`` is the longest time without a completion.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import sys
import threading
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import libmrpc

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")


@click.command()
@click.argument("prefix")
@click.argument("target")
@click.option("--calls", default=100)
@click.option("--concurrency", default=1)
@click.option("--size", default=16)
@click.option("--forever", is_flag=True, help="Keep calling until killed.")
@click.option("--name", default="client")
def main(
    prefix: str, target: str, calls: int, concurrency: int, size: int, forever: bool, name: str
) -> None:
    channel = libmrpc.connect(target, prefix=prefix, name=name)
    stub = testing.TestStub(channel)
    first = stub.Call(testing.Request(payload=b"hello"), timeout=10)
    assert bytes(first.payload) == b"hello"
    print("READY", flush=True)
    errors: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    mismatches = 0
    details: dict[str, str] = {}
    seq = itertools.count()
    stop = threading.Event()
    gap = [0.0, time.perf_counter(), 0.0]  # longest gap between completions, last one, when
    if forever:
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    async def worker(n: int, tag: int) -> None:
        nonlocal mismatches
        for _ in range(n):
            unique = f"{tag}:{next(seq)}:".encode()
            body = (unique * (size // len(unique) + 1))[: max(size, len(unique))]
            t0 = time.perf_counter()
            try:
                reply = await stub.Call.aio(testing.Request(payload=body), timeout=30)
            except libmrpc.RpcError as e:
                errors[e.code().name] += 1
                details.setdefault(e.code().name, e.details())
                continue
            now = time.perf_counter()
            latencies.append(now - t0)
            if now - gap[1] > gap[0]:
                gap[0], gap[2] = now - gap[1], time.time()
            gap[1] = now
            if bytes(reply.payload) != body:
                mismatches += 1

    async def run() -> None:
        if forever:
            while not stop.is_set():
                await asyncio.gather(*(worker(10, t) for t in range(concurrency)))
            return
        per = [
            calls // concurrency + (1 if t < calls % concurrency else 0) for t in range(concurrency)
        ]
        await asyncio.gather(*(worker(n, t) for t, n in enumerate(per)))

    t0 = time.perf_counter()
    asyncio.run(run())
    took = time.perf_counter() - t0
    latencies.sort()
    print(
        json.dumps(
            {
                "ok": len(latencies),
                "errors": dict(errors),
                "mismatches": mismatches,
                "details": details,
                "seconds": took,
                "p50_us": latencies[len(latencies) // 2] * 1e6 if latencies else None,
                "max_gap_s": round(gap[0], 4),
                "max_gap_ended": time.strftime("%H:%M:%S", time.localtime(gap[2]))
                + f".{int(gap[2] * 1000) % 1000:03d}",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
