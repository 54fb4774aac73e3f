"""A well-behaved client that calls steadily for a while and reports how it went.

usage: steady_client.py PREFIX TARGET [--seconds S] [--name NAME]
Prints READY after its first success, then, after S seconds (or when stdin
closes), one JSON line: ok, errors by status, calls per second and the longest
gap between two successes (a stalled daemon shows up there).
"""

from __future__ import annotations

import collections
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
@click.option("--seconds", default=5.0)
@click.option("--name", default="steady")
def main(prefix: str, target: str, seconds: float, name: str) -> None:
    stub = testing.TestStub(libmrpc.connect(target, prefix=prefix, name=name))
    assert bytes(stub.Call(testing.Request(payload=b"hello"), timeout=10).payload) == b"hello"
    print("READY", flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    errors: collections.Counter[str] = collections.Counter()
    details: dict[str, str] = {}
    ok, gap = 0, 0.0
    t0 = last = time.monotonic()
    while not stop.is_set() and time.monotonic() - t0 < seconds:
        try:
            reply = stub.Call(testing.Request(payload=b"steady %d" % ok), timeout=5)
            assert bytes(reply.payload) == b"steady %d" % ok
            ok += 1
            now = time.monotonic()
            gap, last = max(gap, now - last), now
        except libmrpc.RpcError as e:
            errors[e.code().name] += 1
            details.setdefault(e.code().name, e.details())
        time.sleep(0.002)
    took = time.monotonic() - t0
    print(
        json.dumps(
            {
                "ok": ok,
                "errors": dict(errors),
                "details": details,
                "seconds": round(took, 3),
                "rate": round(ok / took, 1),
                "max_gap_s": round(gap, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
