"""An echo client application: `python examples/echo_client.py HOST:PORT [--prefix DIR] [--calls N]`.

HOST:PORT is the *remote* mrpcd (where the server app runs); the call goes
through the local mrpcd at --prefix.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import click

import libmrpc

echo = libmrpc.load_proto(Path(__file__).resolve().parents[1] / "schemas" / "echo.proto")


@click.command()
@click.argument("target")
@click.option("--prefix", default=None, help="The local mrpcd's prefix.")
@click.option("--calls", default=5000, help="Calls for the latency summary.")
def main(target: str, prefix: str | None, calls: int) -> None:
    channel = libmrpc.connect(target, prefix=prefix)
    stub = echo.EchoStub(channel)
    for text in (b"hello", b"from", b"mrpc"):
        reply = stub.Echo(echo.EchoRequest(payload=text), timeout=5.0)
        print(f"reply: {bytes(reply.payload).decode()}")

    async def burst() -> int:
        replies = await asyncio.gather(
            *(stub.Echo.aio(echo.EchoRequest(payload=b"%d" % i), timeout=5.0) for i in range(64))
        )
        return sum(bytes(r.payload) == b"%d" % i for i, r in enumerate(replies))

    print(f"asyncio: {asyncio.run(burst())}/64 concurrent calls answered correctly")
    try:
        stub.Echo(echo.EchoRequest(payload=b"x"), timeout=0.000001)
    except libmrpc.RpcError as e:
        print(f"a call with a 1 us deadline: {e.code().name}")

    request = echo.EchoRequest(payload=b"x" * 64)  # built once in shared memory, sent many times
    for _ in range(200):
        stub.Echo(request, timeout=5.0)
    rtts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        stub.Echo(request, timeout=5.0)
        rtts.append((time.perf_counter() - t0) * 1e6)
    rtts.sort()
    q = statistics.quantiles(rtts, n=100)
    print(
        f"latency over {calls} calls of 64 B: p50 {q[49]:.0f} us, p90 {q[89]:.0f} us, "
        f"p99 {q[98]:.0f} us, min {rtts[0]:.0f} us"
    )


if __name__ == "__main__":
    main()
