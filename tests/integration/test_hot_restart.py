"""Hot restart (``mrpcctl daemon restart``, SIGHUP): a new mrpcd takes over with
nothing dropped, and a failed one leaves the old one serving (rollback).

Every test here runs real daemons under load: client apps keep 64 calls in
flight (``client_app.py --forever``), servers count every payload they answer
(``server_app.py --count``), so a failed, mismatched or duplicated call shows.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import libmrpc
from tests.integration.conftest import (
    ROOT,
    App,
    Cluster,
    hot_restart,
    mrpcd_state,
    stop_successor,
)

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")


def _finish(clients: list[App], servers: list[App]) -> list[dict[str, Any]]:
    """Close the apps' stdin (they stop and report), clients first."""
    return [c.result(60) for c in clients] + [s.result(30) for s in servers]


def test_hot_restart_under_load_fails_and_duplicates_nothing(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    try:
        # each daemon serves one app and hosts the client of the other's
        srv_a = cluster.server(a, "--count", name="srv_a")
        srv_b = cluster.server(b, "--count", name="srv_b")
        load = ("--concurrency", "64", "--forever")
        cli_a = cluster.app("client_app.py", str(a.prefix), b.listen, *load, name="cli_a")
        cli_b = cluster.app("client_app.py", str(b.prefix), a.listen, *load, name="cli_b")
        restarts = []
        for d in (a, b, a):  # the client's daemon and the server's, each under load
            time.sleep(1.0)
            r = hot_restart(d)
            r["at"] = time.strftime("%H:%M:%S")
            restarts.append(r)
            print(f"hot restart of {d.prefix.name}: {json.dumps(r)}")
            assert r["apps"] == 2 and r["peer_connections"] == 2, r
        time.sleep(1.0)
        # the apps never noticed: registered once each, under their first ids
        assert sorted((x["name"], x["app_id"]) for x in a.apps()) == [("client", 2), ("srv_a", 1)]
        got_a, got_b, served_a, served_b = _finish([cli_a, cli_b], [srv_a, srv_b])
        print("client on a:", got_a)
        print("client on b:", got_b)
        print("server on a:", served_a, "server on b:", served_b)
        print(
            "longest gap between completions at the clients: "
            f"{got_a['max_gap_s'] * 1e3:.1f} ms (ended {got_a['max_gap_ended']}), "
            f"{got_b['max_gap_s'] * 1e3:.1f} ms (ended {got_b['max_gap_ended']}); calls "
            f"paused in the daemons: {[r['stall_ms'] for r in restarts]} ms; hand-overs at "
            f"{[r['at'] for r in restarts]}"
        )
        for got in (got_a, got_b):
            assert got["errors"] == {} and got["mismatches"] == 0, got
            assert got["ok"] > 1000, got
        # every call answered exactly once: the server saw each payload once,
        # and exactly the calls its client completed (plus the client's first "hello")
        assert served_b == {"calls": got_a["ok"] + 1, "duplicates": {}}, (served_b, got_a)
        assert served_a == {"calls": got_b["ok"] + 1, "duplicates": {}}, (served_a, got_b)
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"
        assert stop_successor(b), "the new mrpcd did not stop on SIGTERM"


def test_a_failed_new_process_leaves_the_old_one_serving(cluster: Cluster) -> None:
    a = cluster.daemon("a", env={"MRPC_TEST_FAIL_TAKEOVER": "restore"})
    srv = cluster.server(a, "--count", name="srv")
    cli = cluster.app(
        "client_app.py", str(a.prefix), a.listen, "--concurrency", "64", "--forever", name="cli"
    )
    time.sleep(0.5)
    r = a.ctl("daemon", "restart", check=False)
    assert r.returncode != 0
    print("mrpcctl daemon restart said:", r.stderr.strip())
    assert "hot restart failed, the old mrpcd serves on" in r.stderr, r.stderr
    assert "MRPC_TEST_FAIL_TAKEOVER=restore" in r.stderr, r.stderr  # the new process's reason
    assert mrpcd_state(a)["pid"] == a.proc.pid and a.ctl("status")["pid"] == a.proc.pid
    time.sleep(0.5)
    got, served = _finish([cli], [srv])
    print("client:", got, "server:", served)
    assert got["errors"] == {} and got["mismatches"] == 0 and got["ok"] > 100, got
    assert served == {"calls": got["ok"] + 1, "duplicates": {}}, (served, got)
    assert "the new mrpcd" in a.log() and "cannot take over" in a.log()


def test_a_config_that_no_longer_loads_is_refused_and_nothing_changes(
    cluster: Cluster, tmp_path: Path
) -> None:
    a = cluster.daemon("a", config="runtimes: 1\n")
    try:
        cluster.server(a, name="srv")
        cli = cluster.app("client_app.py", str(a.prefix), a.listen, "--forever", name="cli")
        cfg = cluster.base / "a.yaml"
        cfg.write_text("runtimes: lots\n")
        r = a.ctl("daemon", "restart", check=False)
        assert r.returncode != 0 and "the config does not load" in r.stderr, r.stderr
        assert "runtimes" in r.stderr, r.stderr
        assert a.ctl("status")["pid"] == a.proc.pid
        cfg.write_text("runtimes: 2\n")  # fixed: the next restart applies it
        done = hot_restart(a)
        assert len(a.ctl("status")["runtimes"]) == 2, done
        (got,) = _finish([cli], [])
        assert got["errors"] == {} and got["mismatches"] == 0, got
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"


def test_the_metrics_endpoint_and_the_policies_carry_over_with_their_state(
    cluster: Cluster,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = cluster.daemon("a", config=f"metrics:\n  listen: 127.0.0.1:{port}\n")
    try:
        cluster.server(a, name="srv")
        r = a.ctl("policy", "attach", "metrics", "--app", "srv", "--side", "receive")
        assert [p["app"] for p in r["persisted"]] == ["srv"]
        a.ctl(
            "policy", "attach", "ratelimit", "--app", "srv", "--side", "receive", "--transient",
            "--set", "max_tokens=1000000",
        )  # fmt: skip
        cli = cluster.app(
            "client_app.py", str(a.prefix), a.listen, "--concurrency", "8", "--forever", name="c"
        )
        time.sleep(0.5)
        before = _scrape(port)
        assert "mrpc_" in before
        hot_restart(a)  # the old process held the port: the new one serves the same socket
        time.sleep(0.5)
        after = _scrape(port)
        print(f"metrics on 127.0.0.1:{port} before and after: {len(before)}, {len(after)} bytes")
        assert "mrpc_" in after
        engines = {
            e["engine"]: e["id"] for x in a.apps() if x["name"] == "srv" for e in x["datapath"]
        }
        assert "metrics" in engines, engines  # the recorded attachment came back
        assert "ratelimit" in engines, (
            engines
        )  # and the transient one, which only a hot restart keeps
        (got,) = _finish([cli], [])
        assert got["errors"] == {} and got["mismatches"] == 0, got
        # the policies' state carried over: their counters cover the calls before the restart
        for name in ("metrics", "ratelimit"):
            stats = a.ctl("engine", "call", engines[name], "stats")["result"]["stats"]
            print(name, stats)
            counted = max(v for k, v in stats.items() if isinstance(v, int))
            assert counted >= got["ok"], (name, stats, got["ok"])
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_a_slow_call_in_flight_moves_to_the_new_process(cluster: Cluster) -> None:
    """A call that waits for its answer is handed over as data (calls move between
    processes, ``mrpcd/hotrestart_calls.py``): a slow handler does not lengthen the
    pause, and the new process completes the call."""
    a, b = cluster.daemon("a"), cluster.daemon("b")
    try:
        cluster.server(b, name="srv")
        stub = testing.TestStub(libmrpc.connect(b.listen, prefix=str(a.prefix), name="slow"))
        assert stub.Call(testing.Request(payload=b"hi"), timeout=10).payload == b"hi"
        for d in (a, b):  # the caller's daemon, then the server's
            fut = stub.Call.future(testing.Request(payload=b"slow", sleep_ms=1500), timeout=10)
            time.sleep(0.2)
            r = hot_restart(d)
            in_flight = not fut.done()
            assert fut.result().payload == b"slow"  # answered through the new process
            print(
                f"{d.prefix.name}: a 1.5-s call in flight (still running when the restart "
                f"answered: {in_flight}) paused the others {r['stall_ms']} ms "
                f"(settle {r['settle_ms']} ms)"
            )
            assert r["stall_ms"] < 1000, r
            # carried over, not finished first (unless loading took longer than the call)
            assert in_flight or r["startup_ms"] > 1000, r
        assert stub.Call(testing.Request(payload=b"after"), timeout=10).payload == b"after"
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"
        assert stop_successor(b), "the new mrpcd did not stop on SIGTERM"


def test_a_new_process_that_hangs_is_killed_and_the_old_one_serves_on(cluster: Cluster) -> None:
    a = cluster.daemon("a", env={"MRPC_TEST_FAIL_TAKEOVER": "hang"})
    cluster.server(a, name="srv")
    cli = cluster.app("client_app.py", str(a.prefix), a.listen, "--forever", name="cli")
    t0 = time.monotonic()
    r = a.ctl("daemon", "restart", "--timeout", "1.5", check=False)
    took = time.monotonic() - t0
    print(f"mrpcctl daemon restart --timeout 1.5 said after {took:.1f}s:", r.stderr.strip())
    assert r.returncode != 0 and "DEADLINE_EXCEEDED" in r.stderr and "timed out" in r.stderr
    assert "hot restart failed, the old mrpcd serves on" in r.stderr
    assert a.ctl("status")["pid"] == a.proc.pid
    children = Path(f"/proc/{a.proc.pid}/task/{a.proc.pid}/children").read_text().split()
    assert children == [], children  # the hanging new process was killed and reaped
    (got,) = _finish([cli], [])
    assert got["errors"] == {} and got["mismatches"] == 0 and got["ok"] > 0, got
