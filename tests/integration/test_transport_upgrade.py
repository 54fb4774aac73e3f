"""The tcp transport upgraded across two hosts, each side at its own time.

Two daemons in two network namespaces (a veth pair between them) start on the
"old" transport (``tests/integration/wire_v1.py``: no BATCH). Under continuous
load, A's transport and ingress are upgraded to the current code: A now knows
BATCH but its peer does not, so it must not send one (a BATCH would close the
connection and fail calls). Then B is upgraded: its new code announces BATCH on
the live connection (a FEATURES frame), A answers, and both directions batch on
that same connection. No call fails at any point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import libmrpc
from tests.integration.conftest import ROOT, Cluster, Daemon
from tests.integration.netns import Netns, netns_of
from tests.integration.test_upgrade import Load, testing

# two runtimes: B's server app and its ingress are on different threads, so the
# replies cross runtimes (the ingress's outbox) while the ingress is swapped
V1 = "runtimes: 2\nengines:\n  tcp: tests.integration.wire_v1\n"


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns.create()
    try:
        yield ns
    finally:
        ns.close()


def tcp_stats(d: Daemon, app: str) -> dict[str, Any]:
    stats = d.ctl("stats")
    (row,) = [x for x in stats["apps"] if x["app"] == app]
    (tcp,) = [e for e in row["engines"] if e["engine_id"].endswith("/tcp")]
    return dict(tcp["stats"])


def ingress_stats(d: Daemon) -> dict[str, Any]:
    return dict(d.ctl("stats")["ingress"])


def upgrade_transport(d: Daemon, app: str) -> None:
    r = d.ctl("engine", "upgrade", "tcp", "--module", "engines.tcp", "--app", app)
    assert [u["to_version"] for u in r["engines"]] == [2], r
    r = d.ctl("engine", "upgrade", "tcp-ingress", "--module", "engines.tcp_ingress")
    assert [u["to_version"] for u in r["engines"]] == [2], r


def test_batch_turns_on_for_live_connections_once_both_hosts_upgrade(
    netns: Netns, cluster: Cluster
) -> None:
    a = netns.daemon(cluster, 0, "a", V1)
    b = netns.daemon(cluster, 1, "b", V1)
    here = netns_of(os.getpid())
    assert len({netns_of(a.pid), netns_of(b.pid), here}) == 3  # really apart
    assert a.listen.startswith(netns.addrs[0]) and b.listen.startswith(netns.addrs[1])
    netns.app(cluster, 1, "server_app.py", str(b.prefix), "--mode", "async", name="server")
    steady = netns.app(
        cluster, 0, "steady_client.py", str(a.prefix), b.listen, "--seconds", "60", name="steady"
    )
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="loadgen"))
    stub.Call(testing.Request(payload=b"warm"), timeout=10)
    assert [x["runtime"] for x in b.apps()] == ["rt1"]  # the ingress is on rt0
    with Load(stub) as load:
        time.sleep(0.5)
        assert tcp_stats(a, "loadgen").get("batched_frames", 0) == 0  # both old: no BATCH

        upgrade_transport(a, "loadgen")
        upgrade_transport(a, "steady")
        time.sleep(1.0)
        half = tcp_stats(a, "loadgen")
        assert half.get("batched_frames", 0) == 0, half  # the peer is old: never a BATCH
        assert half["conns_batching"] == 0
        calls_half = sum(load.seen.values())

        upgrade_transport(b, "server")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            full, ing = tcp_stats(a, "loadgen"), ingress_stats(b)
            if full.get("batched_frames", 0) > 0 and ing.get("batched_frames", 0) > 0:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        full, ing = tcp_stats(a, "loadgen"), ingress_stats(b)
        calls = sum(load.seen.values())

        # and back: B rolls its ingress back to the old code; it tells A, which stops
        # batching; a BATCH already on its way to B is still taken (never a failure)
        r = b.ctl("engine", "rollback", "tcp-ingress")
        assert [u["to_version"] for u in r["engines"]] == [1], r
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and tcp_stats(a, "loadgen")["conns_batching"]:
            time.sleep(0.2)
        back = tcp_stats(a, "loadgen")
        time.sleep(0.5)
        assert tcp_stats(a, "loadgen")["batched_frames"] == back["batched_frames"]
        calls_back = sum(load.seen.values()) - calls
    load.check()
    report = steady.result()  # closing its stdin ends its loop
    print(
        f"netns A->B under 64 calls in flight + a steady client: {calls} calls "
        f"({calls_half} before B upgraded), 0 failed; steady {report['ok']} ok, "
        f"errors {report['errors']}; after both upgraded: A tcp batched_frames="
        f"{full.get('batched_frames')} batches_sent={full.get('batches_sent')} "
        f"batched_frames_received={full.get('batched_frames_received')}, "
        f"B ingress batched_frames={ing.get('batched_frames')} "
        f"batched_frames_received={ing.get('batched_frames_received')}; {calls_back} calls "
        f"after B rolled its ingress back (A stopped batching at {back['batched_frames']})"
    )
    assert not report["errors"] and report["ok"] > 10, report
    assert full["conns_batching"] == 1 and full["connections"] == 1  # the same, live connection
    assert full["batched_frames"] > 0 and full["batched_frames_received"] > 0
    assert ing["batched_frames"] > 0 and ing["batched_frames_received"] > 0
    assert ing["accepted"] == 2  # loadgen's and steady's connections, never reopened
    assert calls > calls_half > 100 and calls_back > 100
    assert back["conns_batching"] == 0 and back["connections"] == 1


@pytest.mark.parametrize("runtimes", [1, 2])
def test_an_app_switches_transport_live_from_tcp_to_local_and_back(
    cluster: Cluster, runtimes: int
) -> None:
    a = cluster.daemon("a", config=f"runtimes: {runtimes}\n")  # 2: client and server apart
    cluster.server(a, "--mode", "async")
    stub = testing.TestStub(libmrpc.connect(a.listen, prefix=a.prefix, name="loadgen"))
    stub.Call(testing.Request(payload=b"warm"), timeout=10)
    figures = []
    with Load(stub) as load:
        time.sleep(0.3)
        for module, name, to in [
            ("engines.local", "tcp", "local"),
            ("engines.tcp", "local", "tcp"),
        ]:
            before = tcp_stats(a, "loadgen")
            r = a.ctl("engine", "upgrade", name, "--module", module, "--app", "loadgen")
            assert len(r["engines"]) == 1 and all(u["ok"] for u in r["engines"]), r
            assert engine_row(a, "loadgen", to)["module"] == module
            time.sleep(1.0)
            after = tcp_stats(a, "loadgen")
            local = after.get("local_calls", 0) - before.get("local_calls", 0)
            tcp = after["calls_sent"] - before["calls_sent"]
            figures.append(f"{name}->{to}: {local} local calls, {tcp} over tcp")
            if to == "local":
                assert local > 100, figures
                deadline = time.monotonic() + 10  # closed at the next sweep (tcp_limits tick)
                while after["connections"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                    after = tcp_stats(a, "loadgen")
                assert after["connections"] == 0  # the tcp connection drained and closed
            else:
                assert tcp > 100 and after["connections"] == 1, figures
        calls = sum(load.seen.values())
    load.check()
    ingress = a.ctl("stats")["ingress"]
    where = {x["name"]: x["runtime"] for x in a.apps()}
    if runtimes == 2:
        assert where["loadgen"] != where["server"], where
    print(
        f"tcp -> local -> tcp under 64 calls in flight, {runtimes} runtime(s): {calls} calls, "
        f"0 failed; {figures}"
    )
    assert ingress["accepted"] == 2  # the first connection, and one after switching back


def engine_row(d: Daemon, app: str, name: str) -> dict[str, Any]:
    (row,) = [e for x in d.apps() if x["name"] == app for e in x["datapath"] if e["engine"] == name]
    return row


def test_local_calls_keep_every_outcome_of_a_remote_call(cluster: Cluster) -> None:
    a = cluster.daemon("a")
    cluster.server(a)
    stub = testing.TestStub(libmrpc.connect(a.listen, prefix=a.prefix, name="client"))
    stub.Call(testing.Request(payload=b"warm"), timeout=10)
    a.ctl("engine", "upgrade", "tcp", "--module", "engines.local", "--app", "client")
    big = stub.Call(testing.Request(reply_size=3 << 20), timeout=10)
    assert len(big.payload) == 3 << 20
    outcomes = {}
    for name, req, timeout in [
        ("abort", testing.Request(fail="abort:NOT_FOUND:no such key"), 5.0),
        ("raise", testing.Request(fail="raise:boom"), 5.0),
        ("deadline", testing.Request(sleep_ms=3000), 0.3),
        ("exit", testing.Request(fail="exit"), 5.0),
        ("gone", testing.Request(payload=b"anyone?"), 5.0),
    ]:
        try:
            stub.Call(req, timeout=timeout)
            outcomes[name] = "OK"
        except libmrpc.RpcError as e:
            outcomes[name] = e.code().name
            if name == "abort":
                assert e.details() == "no such key"
    print(f"outcomes of local calls: {outcomes}")
    assert outcomes == {
        "abort": "NOT_FOUND",
        "raise": "UNKNOWN",
        "deadline": "DEADLINE_EXCEEDED",
        "exit": "UNAVAILABLE",
        "gone": "UNAVAILABLE",
    }
    stats = tcp_stats(a, "client")
    deadline = time.monotonic() + 10  # the retired tcp connection closes at a sweep
    while stats["connections"] and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = tcp_stats(a, "client")
    assert stats["local_calls"] >= 4 and stats["connections"] == 0 and stats["pending"] == 0


def _old_tree(dest: Path) -> Path:
    """The code just before wire features (the parent of the commit that added
    engines/tcp_features.py), unpacked from git into ``dest``."""
    try:
        added = subprocess.run(
            ["git", "log", "--diff-filter=A", "--format=%H", "-1", "--", "engines/tcp_features.py"],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        archive = subprocess.run(
            ["git", "archive", f"{added}^"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"no git history to take the pre-feature code from: {e}")
    if not added:
        pytest.skip("no git history to take the pre-feature code from")
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    return dest


def _daemon_from(cluster: Cluster, tree: Path, name: str) -> Daemon:
    """An mrpcd running the code of ``tree`` (python -m finds it first, from its cwd)."""
    prefix, log = cluster.base / name, cluster.base / f"{name}.log"
    argv = [
        sys.executable,
        "-m",
        "mrpcd",
        "run",
        "--prefix",
        str(prefix),
        "--listen",
        "127.0.0.1:0",
    ]
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tree)
    d = Daemon(prefix, proc, log)
    cluster.daemons.append(d)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and d.state.get("pid") != proc.pid:
        assert proc.poll() is None, d.log()
        try:
            d.state = json.loads((prefix / "mrpcd.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
    return d


def test_a_new_daemon_and_one_before_wire_features_talk_both_ways(
    cluster: Cluster, tmp_path: Path
) -> None:
    old_tree = _old_tree(tmp_path / "old")
    assert not (old_tree / "engines" / "tcp_features.py").exists()
    old, new = _daemon_from(cluster, old_tree, "old"), cluster.daemon("new")
    cluster.server(old, name="old-server")
    cluster.server(new, name="new-server")
    figures = []
    for client_d, server_d, label in [(new, old, "new->old"), (old, new, "old->new")]:
        stub = testing.TestStub(
            libmrpc.connect(server_d.listen, prefix=client_d.prefix, name=f"c-{label}")
        )
        stub.Call(testing.Request(payload=b"warm"), timeout=10)
        with Load(stub, workers=16) as load:
            time.sleep(1.0)
        load.check()
        figures.append(f"{label}: {sum(load.seen.values())} calls, 0 failed")
    stats = tcp_stats(new, "c-new->old")
    assert stats.get("batched_frames", 0) == 0 and stats["connections"] == 1
    assert new.ctl("stats")["ingress"].get("batched_frames", 0) == 0
    assert "conns_batching" not in old.ctl("stats")["ingress"]  # it really runs the old code
    print(f"new and pre-feature daemons: {figures}")


def test_wire_features_carry_over_a_hot_restart(cluster: Cluster) -> None:
    """A hot restart hands the connection over with the features both sides agreed
    on: the new process goes on batching on it (and never re-connects)."""
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b, "--mode", "async")
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="loadgen"))
    stub.Call(testing.Request(payload=b"warm"), timeout=10)
    with Load(stub) as load:
        load.wait_for(500)
        before = tcp_stats(a, "loadgen")
        assert before["conns_batching"] == 1, before
        pid = a.ctl("status")["pid"]
        r = a.ctl("daemon", "restart")
        assert r["new_pid"] != pid and r["peer_connections"] >= 1, r
        load.wait_for(500)
        deadline = time.monotonic() + 10
        after = tcp_stats(a, "loadgen")
        while after["batches_sent"] <= before["batches_sent"] and time.monotonic() < deadline:
            load.wait_for(200)
            after = tcp_stats(a, "loadgen")
    load.check()
    print(
        f"hot restart with BATCH in use: {sum(load.seen.values())} calls, 0 failed; "
        f"batches sent {before['batches_sent']} -> {after['batches_sent']}, "
        f"ingress accepted {ingress_stats(b)['accepted']}"
    )
    assert after["conns_batching"] == 1 and after["batches_sent"] > before["batches_sent"]
    assert ingress_stats(b)["accepted"] == 1  # the same connection, handed over
