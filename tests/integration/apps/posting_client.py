"""A client that posts a batch of slow calls, says so, then waits for them.

usage: posting_client.py PREFIX TARGET [--calls N] [--sleep-ms MS]
Prints READY once the calls are posted (the test may then stop this process and
let the daemon answer and go away meanwhile), then one JSON line: the replies in
order, or the error of each call that failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import libmrpc

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")


@click.command()
@click.argument("prefix")
@click.argument("target")
@click.option("--calls", default=8)
@click.option("--sleep-ms", default=300)
def main(prefix: str, target: str, calls: int, sleep_ms: int) -> None:
    stub = testing.TestStub(libmrpc.connect(target, prefix=prefix, name="posting"))
    assert bytes(stub.Call(testing.Request(payload=b"hello"), timeout=10).payload) == b"hello"
    futs = [
        stub.Call.future(testing.Request(payload=b"%d" % i, sleep_ms=sleep_ms), timeout=30)
        for i in range(calls)
    ]
    print("READY", flush=True)
    out = []
    for f in futs:
        try:
            out.append(bytes(f.result().payload).decode())
        except libmrpc.RpcError as e:
            out.append(f"{e.code().name}: {e.details()}")
    print(json.dumps({"replies": out}), flush=True)


if __name__ == "__main__":
    main()
