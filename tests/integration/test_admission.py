"""Per-app admission control: one hostile app cannot exhaust the daemon or starve others.

Each test runs real daemons, a real server app, a hostile app posting raw
descriptors (apps/hostile_app.py) and, where it matters, a well-behaved client
(this test process) on the same daemon; it prints the figures that prove the
bound (daemon RSS from /proc, the client's rate and errors, answer times).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from pathlib import Path

import pytest

import libmrpc
from libmrpc import RpcError
from tests.integration.conftest import ROOT, Cluster, Daemon

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")
MiB = 1 << 20


def memory(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon (daemon-private memory) and VmHWM (peak RSS) of ``pid``, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


class Client:
    """A well-behaved client in this process: sync calls in a loop on a thread."""

    def __init__(self, a: Daemon, b: Daemon) -> None:
        self.stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="good-client"))
        assert bytes(self.stub.Call(testing.Request(payload=b"hi"), timeout=10).payload) == b"hi"

    def run(self, seconds: float) -> dict[str, float]:
        ok = errors = 0
        worst = 0.0
        req = testing.Request(payload=b"good")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                self.stub.Call(req, timeout=10)
                ok += 1
            except RpcError:
                errors += 1
            worst = max(worst, time.perf_counter() - t0)
        return {"rate": ok / seconds, "errors": errors, "worst_ms": worst * 1e3}

    def run_in_background(
        self, seconds: float
    ) -> tuple[threading.Thread, dict[str, dict[str, float]]]:
        box: dict[str, dict[str, float]] = {}
        t = threading.Thread(target=lambda: box.setdefault("r", self.run(seconds)), daemon=True)
        t.start()
        return t, box


def _app(d: Daemon, name: str) -> dict:
    return next(x for x in d.apps() if x["name"] == name)


def test_duplicate_call_id_is_refused_without_touching_the_original(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    hostile = cluster.app("hostile_app.py", str(a.prefix), b.listen, "dup", name="hostile")
    r = hostile.result(30)
    print("completions for the id posted three times:", r["completions"])
    mine = [c for c in r["completions"] if c["call_id"] == 777]
    outcomes = [c for c in mine if c["flags"] == 0]
    assert [c["status"] for c in outcomes] == ["OK"], mine  # one outcome, never two
    refused = [c for c in mine if c["flags"]]
    assert len(refused) == 2 and all(
        c["status"] == "INVALID_ARGUMENT" and "already in flight" in c["details"] for c in refused
    ), mine


def test_huge_deadlines_from_an_app_are_answered_and_free_memory(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    hostile = cluster.app(
        "hostile_app.py", str(a.prefix), b.listen, "deadline", "--count", "200", name="hostile"
    )
    r = hostile.result(30)
    print("deadline 2**64-1 x200, 2**63, 1:", r["statuses"], r["details"])
    assert r["answered"] == 202
    assert r["statuses"] == {"OK": 201, "DEADLINE_EXCEEDED": 1}
    time.sleep(0.3)
    srv = _app(b, "server")
    print("server app at b:", srv["recv_heap"], "serving", srv["serving_calls"])
    assert srv["recv_heap"]["used"] == 0 and srv["serving_calls"] == 0


ACL = """
policies:
  - engine: acl
    app: "*"
    config: {default: allow, rules: [{name: no-evil, action: deny, field: key, equals: evil}]}
"""


def _bigimage(cluster: Cluster, count: int, size_mib: int, limits: str) -> tuple[dict, dict, dict]:
    a = cluster.daemon("a", config=limits + ACL)
    b = cluster.daemon("b")
    cluster.server(b)
    before = memory(a.pid)
    hostile = cluster.app(
        "hostile_app.py",
        str(a.prefix),
        b.listen,
        "bigimage",
        "--count",
        str(count),
        "--size-mib",
        str(size_mib),
        name="hostile",
    )
    r = hostile.result(180)
    after = memory(a.pid)
    print(
        f"{count} calls at one {size_mib} MiB payload, acl attached: {r['statuses']} in {r['seconds']:.1f}s; "
        f"daemon memory before {before}, after {after} (MiB)"
    )
    return r, before, after


def test_private_images_are_bounded_by_the_byte_quota(cluster: Cluster) -> None:
    r, before, after = _bigimage(cluster, 24, 16, "limits: {bytes_in_flight: 64MiB}\n")
    assert r["statuses"] == {"OK": 24}  # over the quota the calls wait; none is lost
    growth = after["VmHWM"] - before["VmHWM"]
    print(f"peak RSS growth {growth:.0f} MiB (24 x 16 MiB = 384 MiB unbounded)")
    assert growth < 180, growth


@pytest.mark.slow
def test_private_images_full_size_attack(cluster: Cluster) -> None:
    r, before, after = _bigimage(cluster, 64, 64, "")
    assert r["statuses"] == {"OK": 64}
    growth = after["VmHWM"] - before["VmHWM"]
    print(f"peak RSS growth {growth:.0f} MiB (64 x 64 MiB = 4 GiB unbounded)")
    assert growth < 500, growth


def test_a_message_larger_than_the_byte_quota_fails_alone(cluster: Cluster) -> None:
    a = cluster.daemon("a", config="limits: {bytes_in_flight: 4MiB}\n")
    b = cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="pytest"))
    with pytest.raises(RpcError) as e:
        stub.Call(testing.Request(payload=b"x" * (5 * MiB), reply_size=1), timeout=10)
    print(e.value.code(), e.value.details())
    assert (
        e.value.code().name == "RESOURCE_EXHAUSTED"
        and "limits.bytes_in_flight" in e.value.details()
    )
    assert (
        stub.Call(testing.Request(payload=b"x" * (3 * MiB), reply_size=1), timeout=10).payload
        == b"r"
    )


def test_an_app_that_never_reads_completions_is_held_back(cluster: Cluster) -> None:
    limits = "limits: {calls_in_flight: 256, completion_backlog: 256}\nshm: {ring_slots: 1024}\n"
    a = cluster.daemon("a", config=limits)
    b = cluster.daemon("b")
    cluster.server(b)
    good = Client(a, b)
    alone = good.run(1.5)
    before = memory(a.pid)
    hostile = cluster.app(
        "hostile_app.py",
        str(a.prefix),
        b.listen,
        "flood",
        "--count",
        "100000",
        "--seconds",
        "3",
        name="hostile",
    )
    during = good.run(2.0)
    assert hostile.proc.stdout is not None
    posted = hostile.proc.stdout.readline()
    after = memory(a.pid)
    h = _app(a, "hostile")
    fe = next(
        e["stats"]
        for x in a.ctl("stats")["apps"]
        if x["app"] == "hostile"
        for e in x["engines"]
        if e["engine_id"].endswith("frontend")
    )
    print(
        f"good client alone {alone}, during the flood {during}; hostile {posted.strip()}, "
        f"admitted {h['counters']['calls']}, in flight {h['inflight_calls']}; its frontend {fe}; "
        f"daemon memory before {before}, after {after} (MiB)"
    )
    assert fe["held"] == 1 and fe["backlog"] <= 256
    # the ring (1024) + the completion ring (1024) + 256 in flight + 256 waiting, not 100000
    assert h["counters"]["calls"] <= 1024 + 2 * 256 + 16
    assert '"posted": 100000' not in posted
    assert after["RssAnon"] - before["RssAnon"] < 60
    assert during["errors"] == 0 and during["rate"] > 0.25 * alone["rate"], (alone, during)


def test_millions_of_shared_references_fail_fast(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b, "--alltypes")
    good = Client(a, b)
    thread, box = good.run_in_background(4.0)
    time.sleep(0.5)
    hostile = cluster.app(
        "hostile_app.py", str(a.prefix), b.listen, "refs", "--refs", "4000000", name="hostile"
    )
    r = hostile.result(60)
    thread.join(10)
    print(
        f"one descriptor with 4M references to one blob: {r['statuses']} after {r['answer_ms']:.1f} ms "
        f"({r['details']}); good client meanwhile {box.get('r')}"
    )
    assert r["statuses"] == {"RESOURCE_EXHAUSTED": 1}
    assert "limits.marshal_work" in r["details"]["RESOURCE_EXHAUSTED"]
    assert r["answer_ms"] < 1000
    assert box["r"]["errors"] == 0 and box["r"]["worst_ms"] < 2000


def test_a_server_app_that_never_reads_gets_no_unbounded_queue(cluster: Cluster) -> None:
    a = cluster.daemon("a")
    b = cluster.daemon(
        "b",
        config="limits: {calls_in_flight: 256, completion_backlog: 256}\nshm: {ring_slots: 1024}\n",
    )
    cluster.app("hostile_app.py", str(b.prefix), "-", "deaf", name="deaf")
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="pytest"))
    req = testing.Request(payload=b"anyone there?")

    async def flood() -> list[object]:
        return await asyncio.gather(
            *(stub.Call.aio(req, timeout=3) for _ in range(2000)), return_exceptions=True
        )

    before = memory(b.pid)
    t0 = time.monotonic()
    results = asyncio.run(flood())
    codes = collections.Counter(r.code().name if isinstance(r, RpcError) else "OK" for r in results)
    deaf = _app(b, "deaf")
    print(
        f"2000 calls to a server app that never reads, in {time.monotonic() - t0:.1f}s: {dict(codes)}; "
        f"it holds {deaf['serving_calls']} unanswered calls; daemon b memory before {before}, "
        f"after {memory(b.pid)} (MiB)"
    )
    assert deaf["serving_calls"] <= 256
    assert codes["RESOURCE_EXHAUSTED"] >= 2000 - 256 - 256 - 16
    assert set(codes) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}


def test_out_of_range_numbers_in_a_server_reply_fail_that_call_only(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.app("hostile_app.py", str(b.prefix), "-", "badreply", name="badreply")
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="pytest"))
    got = []
    for _ in range(6):  # one call per bad reply shape
        try:
            stub.Call(testing.Request(payload=b"q"), timeout=5)
            got.append("OK")
        except RpcError as e:
            got.append(f"{e.code().name}: {e.details()[:80]}")
    print("replies with status 65535 / offset 2**64-1 / length 2**64-1 ...:", got)
    assert [g.split(":")[0] for g in got] == [
        "UNKNOWN",
        "INTERNAL",
        "UNKNOWN",
        "INTERNAL",
        "INTERNAL",
        "INTERNAL",
    ]
    time.sleep(0.3)
    srv = _app(b, "badreply")
    assert srv["serving_calls"] == 0 and srv["recv_heap"]["used"] == 0


def test_an_asyncio_client_far_over_the_quotas_is_slowed_not_stuck(cluster: Cluster) -> None:
    """Back-pressure must not deadlock a legitimate app: an event loop that starts far
    more calls than the quotas and rings hold reads completions while it waits."""
    a = cluster.daemon(
        "a",
        config="limits: {calls_in_flight: 256, completion_backlog: 256}\nshm: {ring_slots: 1024}\n",
    )
    b = cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="pytest"))
    req = testing.Request(payload=b"x")

    async def burst() -> list[object]:
        return await asyncio.gather(
            *(stub.Call.aio(req, timeout=20) for _ in range(6000)), return_exceptions=True
        )

    t0 = time.monotonic()
    results = asyncio.run(burst())
    errors = [r for r in results if isinstance(r, Exception)]
    print(
        f"6000 concurrent asyncio calls through quotas of 256: {time.monotonic() - t0:.1f}s, "
        f"{len(errors)} errors"
    )
    assert not errors, errors[:3]
