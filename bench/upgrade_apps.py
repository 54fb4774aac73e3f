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


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- server


class Seen:
    """The echo server's counters: calls received and payloads seen twice (a call
    executed twice); answers the ``?stats`` and ``?reset`` requests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: set[bytes] = set()
        self.counts = {"received": 0, "duplicates": 0}

    def reply(self, payload: bytes) -> bytes:
        """The reply payload for a request payload."""
        with self.lock:
            if payload == STATS:
                return json.dumps(self.counts).encode()
            if payload == RESET:
                self.seen.clear()
                self.counts.update(received=0, duplicates=0)
                return b"ok"
            self.counts["received"] += 1
            if payload in self.seen:
                self.counts["duplicates"] += 1
            self.seen.add(payload)
        return payload


def serve(prefix: str, ready: str, lifetime: float) -> None:
    import libmrpc
    from bench.systems import watch_parent, write_ready

    echo = libmrpc.load_proto(str(ECHO_PROTO))
    seen = Seen()

    class Echo(echo.EchoServicer):  # type: ignore[name-defined,misc]
        def Echo(self, request: Any, context: Any) -> Any:
            return echo.EchoReply(payload=seen.reply(bytes(request.payload)))

    server = libmrpc.Server(prefix=prefix, name="bench-server", inline=True)
    server.add_servicer(Echo())
    server.start()
    write_ready(ready, {"prefix": prefix})
    try:
        watch_parent(lifetime)
    finally:
        server.stop(0)


# ----------------------------------------------------------------------------- client


def status_name(exc: BaseException) -> str:
    """The gRPC status code name of a failed call (``UNAVAILABLE``), or the exception's
    type when it carries none: libmrpc's RpcError and grpc's AioRpcError both have
    ``code()``."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            value = code()
        except Exception:  # noqa: BLE001 - a code that cannot be read is reported by type
            value = None
        name = getattr(value, "name", None)
        if isinstance(name, str):
            return name
    return type(exc).__name__


class Load:
    """``conc`` asyncio tasks calling back to back until told to stop.

    ``call(request, timeout=...)`` is the stub's awaitable unary call (libmrpc's
    ``stub.Echo.aio``, grpc.aio's ``stub.Echo``), ``request(payload=...)`` builds a
    request; both apps of ``python -m bench upgrade`` (mrpc and the gRPC peer,
    ``bench/upgrade_grpc.py``) run this same loop."""

    def __init__(self, call: Any, request: Any, conc: int) -> None:
        self.call, self.request, self.conc = call, request, conc
        self.done_ns = array("q")
        self.lat_ns = array("q")
        self.failed = 0
        self.codes: dict[str, int] = {}
        self.mismatched = 0
        self.error_samples: list[str] = []
        self.error_ns: list[int] = []
        self.last_error_ns = 0
        self.stopping = False

    async def _task(self, k: int) -> None:
        aio, request = self.call, self.request
        clock = time.monotonic_ns
        i = 0
        while not self.stopping:
            body = f"{k}:{i}".encode()
            i += 1
            t0 = clock()
            try:
                reply = await aio(request(payload=body), timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                self.failed += 1
                name = status_name(exc)
                self.codes[name] = self.codes.get(name, 0) + 1
                self.last_error_ns = clock()
                if len(self.error_samples) < MAX_ERRORS_KEPT:
                    self.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])
                    self.error_ns.append(self.last_error_ns)
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

    def write(self, path: str) -> None:
        """The arrays, as :func:`read_calls` reads them."""
        out = array("q", [0]) * (2 * len(self.done_ns))
        out[0::2], out[1::2] = self.done_ns, self.lat_ns
        Path(path).write_bytes(out.tobytes())

    def result(self, drained: bool, t_stop: int, server: dict[str, Any]) -> dict[str, Any]:
        """The ``result`` event's fields."""
        return {
            "event": "result",
            "calls": len(self.done_ns),
            "failed": self.failed,
            "codes": self.codes,
            "mismatched": self.mismatched,
            "error_samples": self.error_samples,
            "error_ns": self.error_ns,
            "last_error_ns": self.last_error_ns,
            "drained": drained,
            "stopped_ns": t_stop,
            "server": server,
        }


def command_reader(loop: asyncio.AbstractEventLoop, go: asyncio.Event, stop: asyncio.Event) -> None:
    """Read the runner's commands on a thread (stdin): the loop only sees the events."""

    def read_commands() -> None:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "go":
                loop.call_soon_threadsafe(go.set)
            elif cmd == "stop":
                break
        loop.call_soon_threadsafe(go.set)
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_commands, daemon=True).start()


async def _client(opts: argparse.Namespace) -> None:
    import libmrpc

    echo = libmrpc.load_proto(str(ECHO_PROTO))
    channel = libmrpc.connect(opts.target, prefix=opts.prefix, name=opts.name)
    stub = echo.EchoStub(channel)
    try:
        await stub.Echo.aio(echo.EchoRequest(payload=RESET), timeout=CALL_TIMEOUT_S)
        go, stop = asyncio.Event(), asyncio.Event()
        command_reader(asyncio.get_running_loop(), go, stop)
        emit({"event": "ready", "pid": os.getpid()})
        await go.wait()
        load = Load(stub.Echo.aio, echo.EchoRequest, opts.conc)
        emit({"event": "started", "t_ns": time.monotonic_ns()})
        drained = await load.run(stop)
        t_stop = time.monotonic_ns()
        reply = await stub.Echo.aio(echo.EchoRequest(payload=STATS), timeout=CALL_TIMEOUT_S)
        load.write(opts.out)
        emit(load.result(drained, t_stop, json.loads(bytes(reply.payload))))
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
