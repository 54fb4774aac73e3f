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

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

import libmrpc
from tests.integration.conftest import Cluster, Daemon
from tests.integration.netns import Netns, netns_of
from tests.integration.test_upgrade import Load, testing

V1 = "engines:\n  tcp: tests.integration.wire_v1\n"


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
    assert [u["to"] for u in r["upgraded"]] == [2] and not r["refused"], r
    r = d.ctl("engine", "upgrade", "tcp-ingress", "--module", "engines.tcp_ingress")
    assert [u["to"] for u in r["upgraded"]] == [2] and not r["refused"], r


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
    load.check()
    report = steady.result()  # closing its stdin ends its loop
    print(
        f"netns A->B under 64 calls in flight + a steady client: {calls} calls "
        f"({calls_half} before B upgraded), 0 failed; steady {report['ok']} ok, "
        f"errors {report['errors']}; after both upgraded: A tcp batched_frames="
        f"{full.get('batched_frames')} batches_sent={full.get('batches_sent')} "
        f"batched_frames_received={full.get('batched_frames_received')}, "
        f"B ingress batched_frames={ing.get('batched_frames')} "
        f"batched_frames_received={ing.get('batched_frames_received')}"
    )
    assert not report["errors"] and report["ok"] > 10, report
    assert full["conns_batching"] == 1 and full["connections"] == 1  # the same, live connection
    assert full["batched_frames"] > 0 and full["batched_frames_received"] > 0
    assert ing["batched_frames"] > 0 and ing["batched_frames_received"] > 0
    assert ing["accepted"] == 2  # loadgen's and steady's connections, never reopened
    assert calls > calls_half > 100
