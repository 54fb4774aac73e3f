"""A hostile application: posts raw descriptors the way a buggy or malicious app could.

usage: hostile_app.py PREFIX TARGET MODE [--count N] [--size-mib M] [--refs R] [--seconds S]

Modes (every mode prints READY once connected, then one JSON line of results):
  bigimage  COUNT calls whose requests all point at ONE payload of SIZE MiB
            (with a content policy attached the daemon copies each one privately).
  flood     post up to COUNT calls within SECONDS and never read a completion;
            prints how many the ring took, then waits (still not reading) until
            stdin closes.
  refs      one AllTypes Roundtrip whose r_bytes holds REFS references to one
            1-byte blob; prints the status and how long the answer took.
  dup       one slow call posted under one call id, again, and once more after the
            daemon answered the second; prints every completion for that id.
  deadline  COUNT calls with deadline 2**64-1, then calls with deadlines 2**63 and 1;
            prints the statuses.
  deaf      (TARGET unused) serve mrpctest.Test at PREFIX's daemon and never read a
            completion, so never answer; waits until stdin closes.
  badreply  (TARGET unused) serve mrpctest.Test and answer every call with a raw
            SUB_REPLY carrying out-of-range numbers (status, offset, length).
"""

from __future__ import annotations

import collections
import json
import struct
import sys
import threading
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import libmrpc
from libmrpc._session import get_session
from libmrpc._shm import notify
from libmrpc.status import StatusCode
from libmrpc.wire.ring import CMP_REPLY, CMP_REQUEST, DESCRIPTOR, SUB_CALL, SUB_RELEASE, SUB_REPLY

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
alltypes = libmrpc.load_proto(ROOT / "schemas" / "alltypes.proto")
U64_MAX = (1 << 64) - 1


class Raw:
    """Raw descriptor access to this process's session (no libmrpc call tracking)."""

    def __init__(self, prefix: str, target: str, alltypes_conn: bool) -> None:
        channel = libmrpc.connect(target, prefix=prefix, name="hostile")
        if alltypes_conn:  # a first call opens the connection
            alltypes.AllTypesServiceStub(channel).Ping(alltypes.Empty(), timeout=10)
        else:
            testing.TestStub(channel).Call(testing.Request(payload=b"warm"), timeout=10)
        self.s = get_session(prefix)
        self.conn = next(iter(self.s._conns.values()))
        self.ids = iter(range(1_000_000, 1 << 62))

    def post(
        self,
        method: int,
        off: int,
        call_id: int | None = None,
        deadline_ns: int = 0,
        wait: bool = True,
    ) -> int | None:
        """Post one CALL; None when the ring is full and ``wait`` is False."""
        cid = next(self.ids) if call_id is None else call_id
        s = self.s
        while not s.submit.push(
            DESCRIPTOR, SUB_CALL, 0, 0, self.conn, cid, method, 0, off, 0, deadline_ns
        ):
            if not wait:
                return None
            notify(s.regions.submit_efd)
            time.sleep(0.001)
        notify(s.regions.submit_efd)
        return cid

    def completions(self, want: int, timeout: float) -> list[tuple[int, ...]]:
        """Read CMP_REPLY descriptors until ``want`` arrived or ``timeout`` passed."""
        got: list[tuple[int, ...]] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            batch = self.s.complete.pop_batch(DESCRIPTOR, 256)
            if not batch:
                time.sleep(0.0005)
                continue
            got += [d for d in batch if d[0] == CMP_REPLY]
        return got

    def details(self, d: tuple[int, ...]) -> str:
        off, length = d[7], d[8]
        return (
            bytes(self.s.recv_view[off : off + length]).decode("utf-8", "replace") if length else ""
        )


# (status, off, length) of SUB_REPLY descriptors no libmrpc would post
BAD_REPLIES = [
    (65535, 0, U64_MAX),
    (0, U64_MAX, 0),
    (2, 1 << 63, U64_MAX),
    (0, 12345, 7),
    (0, 0, 0),
    (13, 64, U64_MAX),
]


def bad_replies(s: object) -> None:
    """Answer each request with the next bad reply; hand its receive block back."""
    i = 0
    while True:
        batch = s.complete.pop_batch(DESCRIPTOR, 64)  # type: ignore[attr-defined]
        if not batch:
            time.sleep(0.001)
            continue
        for kind, _f, _st, _c, token, _m, _aux, off, _length, _dl in batch:
            if kind != CMP_REQUEST:
                continue
            status, roff, rlen = BAD_REPLIES[i % len(BAD_REPLIES)]
            i += 1
            for d in (
                (SUB_RELEASE, 0, 0, 0, 0, 0, 0, off, 0, 0),
                (SUB_REPLY, 0, status, 0, token, 0, 0, roff, rlen, 0),
            ):
                while not s.submit.push(DESCRIPTOR, *d):  # type: ignore[attr-defined]
                    time.sleep(0.001)
            notify(s.regions.submit_efd)  # type: ignore[attr-defined]


def method_id(schema: object, name: str) -> int:
    return next(m.id for m in schema.METHODS if m.name == name)  # type: ignore[attr-defined]


def statuses(raw: Raw, done: list[tuple[int, ...]]) -> dict[str, object]:
    counts = collections.Counter(StatusCode(d[2]).name for d in done)
    details = {StatusCode(d[2]).name: raw.details(d) for d in done if d[2]}
    return {"statuses": dict(counts), "details": details}


@click.command()
@click.argument("prefix")
@click.argument("target")
@click.argument(
    "mode", type=click.Choice(["bigimage", "flood", "refs", "dup", "deadline", "deaf", "badreply"])
)
@click.option("--count", default=64)
@click.option("--size-mib", default=64)
@click.option("--refs", default=4_000_000)
@click.option("--seconds", default=5.0)
def main(
    prefix: str, target: str, mode: str, count: int, size_mib: int, refs: int, seconds: float
) -> None:
    if mode in ("deaf", "badreply"):
        s = get_session(prefix, name=mode)
        s.control({"op": "serve", "slot": s.bind(testing), "services": ["mrpctest.Test"]})
        print("READY", flush=True)
        if mode == "badreply":
            threading.Thread(target=bad_replies, args=(s,), daemon=True).start()
        sys.stdin.read()
        return
    raw = Raw(prefix, target, mode == "refs")
    call = method_id(testing, "Call")
    print("READY", flush=True)
    out: dict[str, object] = {}
    t0 = time.perf_counter()
    if mode == "bigimage":
        req = testing.Request(payload=b"\xab" * (size_mib << 20), reply_size=1)
        for _ in range(count):
            raw.post(call, req._off)
        done = raw.completions(count, 120)
        out = statuses(raw, done) | {"answered": len(done)}
    elif mode == "flood":
        req = testing.Request(payload=b"flood")
        posted = 0
        stop = time.monotonic() + seconds
        while posted < count and time.monotonic() < stop:
            if raw.post(call, req._off, wait=False) is None:
                time.sleep(0.01)  # the ring is full: the daemon stopped taking our calls
                continue
            posted += 1
        print(json.dumps({"posted": posted, "seconds": time.perf_counter() - t0}), flush=True)
        sys.stdin.read()  # never read a completion; exit when the test closes stdin
        return
    elif mode == "refs":
        heap = raw.s.send_heap
        msg = alltypes.AllTypes(r_bytes=[b"x"])
        blob = heap.alloc(8)
        heap.buf[blob] = ord("x")
        arr = heap.alloc(8 * refs)
        heap.buf[arr : arr + 8 * refs] = struct.pack("<II", blob, 1) * refs
        struct.pack_into(
            "<II", heap.buf, msg._off + alltypes.AllTypes._SPECS["r_bytes"].off, arr, refs
        )
        t_post = time.perf_counter()
        raw.post(method_id(alltypes, "Roundtrip"), msg._off)
        done = raw.completions(1, 30)
        out = statuses(raw, done) | {
            "answered": len(done),
            "answer_ms": (time.perf_counter() - t_post) * 1e3,
        }
    elif mode == "dup":
        req = testing.Request(payload=b"dup", sleep_ms=500)
        cid = 777
        raw.post(call, req._off, call_id=cid)
        raw.post(call, req._off, call_id=cid)
        done = raw.completions(1, 3)  # the refusal of the second post
        raw.post(call, req._off, call_id=cid)  # the id is still in flight: refused again
        done += raw.completions(3 - len(done), 3)
        out = {
            "completions": [
                {
                    "call_id": d[4],
                    "flags": d[1],
                    "status": StatusCode(d[2]).name,
                    "details": raw.details(d) if d[2] else "",
                }
                for d in done
            ]
        }
    elif mode == "deadline":
        req = testing.Request(payload=b"late")
        for _ in range(count):
            raw.post(call, req._off, deadline_ns=U64_MAX)
        raw.post(call, req._off, deadline_ns=1 << 63)
        raw.post(call, req._off, deadline_ns=1)
        done = raw.completions(count + 2, 10)
        out = statuses(raw, done) | {"answered": len(done)}
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
