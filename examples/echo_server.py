"""An echo server application: `python examples/echo_server.py [--prefix DIR]`."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

import libmrpc

echo = libmrpc.load_proto(Path(__file__).resolve().parents[1] / "schemas" / "echo.proto")


class Echo(echo.EchoServicer):
    def Echo(self, request, context):
        # request.payload is a zero-copy view of the daemon-delivered message
        return echo.EchoReply(payload=request.payload)


@click.command()
@click.option(
    "--prefix",
    default=None,
    help="The local mrpcd's prefix (default: MRPC_PREFIX or mrpcd's default).",
)
def main(prefix: str | None) -> None:
    server = libmrpc.Server(prefix=prefix, inline=True)  # inline: the handler never blocks
    server.add_servicer(Echo())
    server.start()
    print("echo server ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1.0)


if __name__ == "__main__":
    main()
