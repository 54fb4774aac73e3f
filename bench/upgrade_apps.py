"""The two apps of the live-upgrade benchmark (``python -m bench upgrade``).

``python -m bench.upgrade_apps server --prefix B --ready FILE``
    an echo server app on daemon B that answers every call with its own request
    payload and counts payloads it has already seen (a call executed twice). A
    request ``?stats`` answers those counters as JSON; ``?reset`` clears them.

``python -m bench.upgrade_apps client --target HOST:PORT --prefix A --out FILE``
    a client app on daemon A that keeps ``--conc`` calls in flight (asyncio tasks,
    ``await stub.Echo.aio(req)``), every call with a payload of its own, and
    records each completion's ``time.monotonic_ns()`` (CLOCK_MONOTONIC: the
    same clock as the runner's) and latency in in-process arrays. JSON lines:

        client -> {"event": "ready", "pid"}         connected, first call answered
        runner -> "go"                               start the load
        client -> {"event": "started", "t_ns"}
        runner -> "stop"                             stop issuing, drain, report
        client -> {"event": "result", ...}           counts; arrays written to --out

``--out`` holds int64 pairs (completion ns, latency ns), one per answered call
in completion order (:func:`read_calls`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any

ECHO_PROTO = Path(__file__).resolve().parent.parent / "schemas" / "echo.proto"
CALL_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 40.0
MAX_ERRORS_KEPT = 5
STATS, RESET = b"?stats", b"?reset"


def read_calls(path: Path) -> tuple[array, array]:
    """(completion ns, latency ns) of every answered call, from a client's ``--out``."""
    raw = array("q")
    raw.frombytes(path.read_bytes())
    return raw[0::2], raw[1::2]


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- server


def serve(prefix: str, ready: str, lifetime: float) -> None:
    import libmrpc
    from bench.systems import watch_parent, write_ready

    echo = libmrpc.load_proto(str(ECHO_PROTO))
    lock = threading.Lock()
    seen: set[bytes] = set()
    counts = {"received": 0, "duplicates": 0}

    class Echo(echo.EchoServicer):  # type: ignore[name-defined,misc]
        def Echo(self, request: Any, context: Any) -> Any:
            payload = bytes(request.payload)
            if payload == STATS:
                with lock:
                    return echo.EchoReply(payload=json.dumps(counts).encode())
            if payload == RESET:
                with lock:
                    seen.clear()
                    counts.update(received=0, duplicates=0)
                return echo.EchoReply(payload=b"ok")
            with lock:
                counts["received"] += 1
                if payload in seen:
                    counts["duplicates"] += 1
                seen.add(payload)
            return echo.EchoReply(payload=payload)

    server = libmrpc.Server(prefix=prefix, name="bench-server", inline=True)
    server.add_servicer(Echo())
    server.start()
    write_ready(ready, {"prefix": prefix})
    try:
        watch_parent(lifetime)
    finally:
        server.stop(0)


# ----------------------------------------------------------------------------- client


class Load:
    """``conc`` asyncio tasks calling back to back until told to stop."""

    def __init__(self, stub: Any, echo: Any, conc: int) -> None:
        self.stub, self.echo, self.conc = stub, echo, conc
        self.done_ns = array("q")
        self.lat_ns = array("q")
        self.failed = 0
        self.mismatched = 0
        self.error_samples: list[str] = []
        self.error_ns: list[int] = []
        self.stopping = False

    async def _task(self, k: int) -> None:
        aio = self.stub.Echo.aio
        clock = time.monotonic_ns
        i = 0
        while not self.stopping:
            body = f"{k}:{i}".encode()
            i += 1
            t0 = clock()
            try:
                reply = await aio(self.echo.EchoRequest(payload=body), timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                self.failed += 1
                if len(self.error_samples) < MAX_ERRORS_KEPT:
                    self.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])
                    self.error_ns.append(clock())
                continue
            t1 = clock()
            self.done_ns.append(t1)
            self.lat_ns.append(t1 - t0)
            if bytes(reply.payload) != body:
                self.mismatched += 1

    async def run(self, stop: asyncio.Event) -> bool:
        """Run until ``stop``; True if every task finished its last call in time."""
        tasks = [asyncio.create_task(self._task(k)) for k in range(self.conc)]
        await stop.wait()
        self.stopping = True
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
        for t in pending:
            t.cancel()
        return not pending


async def _client(opts: argparse.Namespace) -> None:
    import libmrpc

    echo = libmrpc.load_proto(str(ECHO_PROTO))
    channel = libmrpc.connect(opts.target, prefix=opts.prefix, name=opts.name)
    stub = echo.EchoStub(channel)
    try:
        await stub.Echo.aio(echo.EchoRequest(payload=RESET), timeout=CALL_TIMEOUT_S)
        loop = asyncio.get_running_loop()
        go, stop = asyncio.Event(), asyncio.Event()

        def read_commands() -> None:  # stdin on a thread: the loop only sees events
            for line in sys.stdin:
                cmd = line.strip()
                if cmd == "go":
                    loop.call_soon_threadsafe(go.set)
                elif cmd == "stop":
                    break
            loop.call_soon_threadsafe(go.set)
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=read_commands, daemon=True).start()
        _emit({"event": "ready", "pid": os.getpid()})
        await go.wait()
        load = Load(stub, echo, opts.conc)
        _emit({"event": "started", "t_ns": time.monotonic_ns()})
        drained = await load.run(stop)
        t_stop = time.monotonic_ns()
        reply = await stub.Echo.aio(echo.EchoRequest(payload=STATS), timeout=CALL_TIMEOUT_S)
        server = json.loads(bytes(reply.payload))
        out = array("q", [0]) * (2 * len(load.done_ns))
        out[0::2], out[1::2] = load.done_ns, load.lat_ns
        Path(opts.out).write_bytes(out.tobytes())
        _emit(
            {
                "event": "result",
                "calls": len(load.done_ns),
                "failed": load.failed,
                "mismatched": load.mismatched,
                "error_samples": load.error_samples,
                "error_ns": load.error_ns,
                "drained": drained,
                "stopped_ns": t_stop,
                "server": server,
            }
        )
    finally:
        channel.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.upgrade_apps")
    sub = p.add_subparsers(dest="app", required=True)
    s = sub.add_parser("server")
    s.add_argument("--prefix", required=True)
    s.add_argument("--ready", required=True)
    s.add_argument("--lifetime", type=float, default=1200.0)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--prefix", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--conc", type=int, default=64)
    c.add_argument("--name", default="bench-upgrade")
    opts = p.parse_args(argv)
    if opts.app == "server":
        serve(opts.prefix, opts.ready, opts.lifetime)
    else:
        asyncio.run(_client(opts))


if __name__ == "__main__":
    main()
