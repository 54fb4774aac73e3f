"""The gRPC peer's two apps for ``python -m bench upgrade`` (the Envoy scenarios).

``python -m bench.upgrade_grpc server --ready FILE``
    a grpc.aio echo server on 127.0.0.1:0 that answers every call with its own
    request payload and counts payloads it has already seen, exactly as the mrpc
    server app (``bench.upgrade_apps.Seen``: ``?stats``, ``?reset``).

``python -m bench.upgrade_grpc client --target HOST:PORT --out FILE``
    a grpc.aio client (one channel, the client-side Envoy's listener as target)
    running the mrpc client's load (``bench.upgrade_apps.Load``: ``--conc`` tasks,
    ``await stub.Echo(req, timeout=30)``, a payload of its own per call, every
    completion recorded) and speaking the same JSON lines to the runner. Calls use
    grpc's defaults (no ``wait_for_ready``, no retry policy): a call made while the
    channel has no connection fails with UNAVAILABLE, as an application's would.
    The result also lists the channel's connectivity states over time
    (``channel_states``: [t_ns, state]) and ``reconnects``: how often the channel
    became READY again after it first was (a new TCP connection to the proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from bench.upgrade_apps import CALL_TIMEOUT_S, RESET, STATS, Load, Seen, command_reader, emit


def serve(ready: str, lifetime: float) -> None:
    import grpc  # type: ignore[import-untyped]

    from bench.systems import serving_while_parent_lives, write_ready
    from bench.systems.grpc_systems import OPTIONS, load_echo

    protos, services = load_echo()
    seen = Seen()

    class Echo(services.EchoServicer):  # type: ignore[name-defined,misc]
        async def Echo(self, request: Any, context: Any) -> Any:
            return protos.EchoReply(payload=seen.reply(bytes(request.payload)))

    async def main() -> None:
        server = grpc.aio.server(options=OPTIONS)
        services.add_EchoServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        write_ready(ready, {"addr": f"127.0.0.1:{port}", "grpc": grpc.__version__})
        keep_serving = serving_while_parent_lives(lifetime)
        try:
            while keep_serving():
                await asyncio.sleep(0.5)
        finally:
            await server.stop(0)

    asyncio.run(main())


async def _watch(channel: Any, states: list[list[Any]]) -> None:
    """Record every connectivity state change of ``channel`` until cancelled."""
    state = channel.get_state(try_to_connect=False)
    states.append([time.monotonic_ns(), state.name])
    while True:
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=False)
        states.append([time.monotonic_ns(), state.name])


async def _client(opts: argparse.Namespace) -> None:
    import grpc  # type: ignore[import-untyped]

    from bench.systems.grpc_systems import OPTIONS, load_echo

    protos, services = load_echo()
    channel = grpc.aio.insecure_channel(opts.target, options=OPTIONS)
    stub = services.EchoStub(channel)
    states: list[list[Any]] = []
    watcher = asyncio.create_task(_watch(channel, states))
    try:
        req = protos.EchoRequest
        await stub.Echo(req(payload=RESET), timeout=CALL_TIMEOUT_S, wait_for_ready=True)
        go, stop = asyncio.Event(), asyncio.Event()
        command_reader(asyncio.get_running_loop(), go, stop)
        emit({"event": "ready", "pid": os.getpid(), "grpc": grpc.__version__})
        await go.wait()
        load = Load(stub.Echo, req, opts.conc)
        emit({"event": "started", "t_ns": time.monotonic_ns()})
        drained = await load.run(stop)
        t_stop = time.monotonic_ns()
        reply = await stub.Echo(req(payload=STATS), timeout=CALL_TIMEOUT_S, wait_for_ready=True)
        load.write(opts.out)
        result = load.result(drained, t_stop, json.loads(bytes(reply.payload)))
        ready_at = [t for t, s in states if s == "READY"]
        result["channel_states"] = states
        result["reconnects"] = max(0, len(ready_at) - 1)
        emit(result)
    finally:
        watcher.cancel()
        await channel.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.upgrade_grpc")
    sub = p.add_subparsers(dest="app", required=True)
    s = sub.add_parser("server")
    s.add_argument("--ready", required=True)
    s.add_argument("--lifetime", type=float, default=1200.0)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--conc", type=int, default=64)
    opts = p.parse_args(argv)
    if opts.app == "server":
        serve(opts.ready, opts.lifetime)
    else:
        asyncio.run(_client(opts))


if __name__ == "__main__":
    main()
