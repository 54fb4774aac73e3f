"""A server application for integration tests: serves mrpctest.Test (and alltypes).

usage: server_app.py PREFIX [--mode sync|inline|async] [--name NAME] [--alltypes]
Prints READY when serving; exits when stdin closes or on SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import libmrpc
from libmrpc import RpcError, StatusCode

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")


SEEN: collections.Counter[bytes] = collections.Counter()  # --count: payloads answered
SEEN_LOCK = threading.Lock()


def answer(request: object, name: str, count: bool = False) -> object:
    if count:
        with SEEN_LOCK:
            SEEN[bytes(request.payload)] += 1
    fail = request.fail
    if fail == "exit":
        os._exit(3)
    if fail.startswith("raise:"):
        raise ValueError(fail[6:])
    if fail.startswith("abort:"):
        _, code, text = fail.split(":", 2)
        raise RpcError(StatusCode[code], text)
    n = request.reply_size
    payload = bytes(request.payload) if n == 0 else b"r" * n
    return testing.Reply(
        payload=payload, request_size=len(request.payload), served_by=name, key=request.key
    )


@click.command()
@click.argument("prefix")
@click.option("--mode", type=click.Choice(["sync", "inline", "async"]), default="sync")
@click.option("--name", default="server")
@click.option("--alltypes", is_flag=True)
@click.option("--count", is_flag=True, help="At exit print the calls answered and duplicates.")
def main(prefix: str, mode: str, name: str, alltypes: bool, count: bool) -> None:
    if mode == "async":

        class Servicer(testing.TestServicer):
            async def Call(self, request, context):
                if request.sleep_ms:
                    await asyncio.sleep(request.sleep_ms / 1000)
                return answer(request, name, count)
    else:

        class Servicer(testing.TestServicer):  # type: ignore[no-redef]
            def Call(self, request, context):
                if request.sleep_ms:
                    time.sleep(request.sleep_ms / 1000)
                return answer(request, name, count)

    server = libmrpc.Server(prefix=prefix, inline=(mode == "inline"), name=name)
    server.add_servicer(Servicer())
    if alltypes:
        at = libmrpc.load_proto(ROOT / "schemas" / "alltypes.proto")

        class AllTypes(at.AllTypesServiceServicer):
            def Roundtrip(self, request, context):
                return request  # copied into the send heap by the library

            def Ping(self, request, context):
                return at.Empty()

        server.add_servicer(AllTypes())
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("READY", flush=True)
    stop.wait()
    server.stop(1.0)
    if count:
        with SEEN_LOCK:
            dups = {p.decode(errors="replace"): n for p, n in SEEN.items() if n > 1}
            print(json.dumps({"calls": sum(SEEN.values()), "duplicates": dups}), flush=True)


if __name__ == "__main__":
    main()
