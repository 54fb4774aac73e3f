"""Hot restart as the operator sees it: the same daemon afterwards, however often.

A daemon reloaded every day must not grow with every hot restart; what an
operator changed (a transport switched live, an engine upgraded for one app,
policy engine ids, metrics counters) must be there after it; and the restart
must survive what happens around it (SIGTERM, apps registering meanwhile, a
second restart asked for at the same time).
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.integration.conftest import Cluster, Daemon, mrpcd_running, stop_successor


def _state(d: Daemon) -> dict[str, Any]:
    return json.loads((d.prefix / "mrpcd.json").read_text())


def _restart(d: Daemon, *args: str) -> dict[str, Any]:
    old = _state(d)["pid"]
    r = d.ctl("daemon", "restart", *args)
    assert r["old_pid"] == old and r["new_pid"] != old, r
    deadline = time.monotonic() + 10
    while mrpcd_running(old) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mrpcd_running(old), f"the old mrpcd (pid {old}) is still running after the hand-over"
    assert _state(d)["pid"] == r["new_pid"]
    return r


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _figures(pid: int) -> tuple[float, float, int, int]:
    """(VmRSS, RssAnon in MB, open fds, threads) of process ``pid``. RssAnon is the
    process's private memory; VmRSS adds the pages of the apps' shared regions it
    touched, which grow as the heaps are used, restart or not."""
    st = _status(pid)
    rss, anon = (int(st[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon"))
    return rss, anon, len(os.listdir(f"/proc/{pid}/fd")), int(st["Threads"])


def test_memory_fds_and_threads_stay_flat_over_many_hot_restarts(cluster: Cluster) -> None:
    """Each generation used to keep every earlier one's modules and daemon alive
    (~4.5 MB a restart): a daemon reloaded daily grew without bound."""
    a = cluster.daemon("a")
    try:
        cluster.server(a, name="srv")
        cli = cluster.app(
            "client_app.py", str(a.prefix), a.listen, "--concurrency", "8", "--forever", name="cli"
        )
        time.sleep(0.3)
        figures = [_figures(a.pid)]
        for _ in range(8):
            r = _restart(a)
            time.sleep(0.3)  # calls flow on the new process
            figures.append(_figures(r["new_pid"]))
        for i, (rss, anon, fds, threads) in enumerate(figures):
            print(
                f"after restart {i}: VmRSS {rss:.1f} MB (RssAnon {anon:.1f} MB), {fds} fds, "
                f"{threads} threads"
            )
        growth = figures[8][0] - figures[3][0]
        anon_growth = figures[8][1] - figures[3][1]
        print(
            f"growth from restart 3 to restart 8: VmRSS {growth:.1f} MB, RssAnon "
            f"{anon_growth:.1f} MB (bound 6 MB; ~19 MB before the old generation was released)"
        )
        (got,) = [cli.result(60)]
        assert got["errors"] == {} and got["mismatches"] == 0 and got["ok"] > 100, got
        assert growth < 6.0, figures
        assert figures[8][2] <= figures[3][2] + 2, figures  # fds
        assert figures[8][3] == figures[3][3], figures  # threads
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"


def _engines(d: Daemon) -> dict[str, list[tuple[str, str, int, str]]]:
    """Per app: its datapath's (engine id, engine, version, module), as `mrpcctl list` shows."""
    return {
        x["name"]: [(e["id"], e["engine"], e["version"], e["module"]) for e in x["datapath"]]
        for x in d.apps()
    }


def _scrape(port: int) -> dict[str, float]:
    """The counters of the metrics endpoint: ``name{labels}`` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _tcp_stats(d: Daemon, app: str) -> dict[str, Any]:
    (row,) = [x for x in d.ctl("stats")["apps"] if x["app"] == app]
    (tcp,) = [e for e in row["engines"] if e["engine_id"] == f"{app}/tcp"]
    return dict(tcp["stats"])


def test_what_the_operator_changed_survives_a_hot_restart(cluster: Cluster) -> None:
    """A transport switched live, a policy upgraded for one app, the policy engine
    ids and the Prometheus counters: all as they were (they used to revert to the
    configured transport and classes, get new ids, and count from 0 again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = cluster.daemon("a", config=f"metrics:\n  listen: 127.0.0.1:{port}\n")
    try:
        cluster.server(a, name="srv")
        cli = cluster.app(
            "client_app.py", str(a.prefix), a.listen, "--concurrency", "8", "--forever", name="cli"
        )
        # ids move on: attach and detach one first, so that ids are not simply 1, 2, 3
        (gone,) = a.ctl("policy", "attach", "null", "--app", "srv", "--transient")["engine_ids"]
        a.ctl("policy", "detach", gone)
        a.ctl("policy", "attach", "metrics", "--app", "srv", "--side", "receive")
        a.ctl("policy", "attach", "metrics", "--app", "client", "--side", "send", "--transient")
        (rl,) = a.ctl(
            "policy", "attach", "ratelimit", "--app", "srv", "--side", "receive", "--transient",
            "--set", "max_tokens=1000000",
        )["engine_ids"]  # fmt: skip
        (null,) = a.ctl("policy", "attach", "null", "--app", "client", "--transient")["engine_ids"]
        r = a.ctl(
            "engine", "upgrade", "null", "--module", "tests.integration.engines.null_v2",
            "--app", "client",
        )  # fmt: skip
        assert [u["to_version"] for u in r["engines"]] == [2], r
        r = a.ctl("engine", "upgrade", "tcp", "--module", "engines.local", "--app", "client")
        assert [u["ok"] for u in r["engines"]] == [True], r
        time.sleep(0.5)
        before, scraped = _engines(a), _scrape(port)
        local_before = _tcp_stats(a, "client")["local_calls"]
        print("before:", json.dumps(before))
        _restart(a)
        after = _engines(a)
        print("after: ", json.dumps(after))
        assert after == before  # ids, engines, versions, modules: the transport is local
        time.sleep(0.5)
        local_after = _tcp_stats(a, "client")["local_calls"]
        print(f"local calls of the client: {local_before} before, {local_after} after")
        assert local_after > local_before, (local_before, local_after)
        again = _scrape(port)
        counters = {k: v for k, v in scraped.items() if k.startswith(("grpc_", "mrpc_"))}
        assert counters, scraped
        dropped = {k: (v, again.get(k)) for k, v in counters.items() if again.get(k, -1) < v}
        print(
            f"{len(counters)} series before the restart, {len(dropped)} dropped or reset; e.g. "
            + ", ".join(f"{k} {v} -> {again.get(k)}" for k, v in list(counters.items())[:2])
        )
        assert not dropped, dropped
        # operators' scripts go on working with the ids they had
        a.ctl("policy", "set", rl, "max_tokens=2000000")
        assert a.ctl("engine", "call", null, "stats")["engine_id"] == null
        (fresh,) = a.ctl("policy", "attach", "null", "--app", "srv", "--transient")["engine_ids"]
        ids = {e for engines in before.values() for e, *_ in engines} | {gone}
        assert fresh not in ids, (fresh, ids)
        number = int(fresh.rsplit("-", 1)[1])
        assert all(number > int(i.rsplit("-", 1)[1]) for i in ids if i[-1].isdigit()), (fresh, ids)
        (got,) = [cli.result(60)]
        assert got["errors"] == {} and got["mismatches"] == 0, got
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"
