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
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import libmrpc
from tests.integration.conftest import (
    ROOT,
    Cluster,
    Daemon,
    hot_restart,
    mrpcd_running,
    stop_successor,
)


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
            r = hot_restart(a)
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
        # a recorded policy (a standing rule attaches it again), upgraded for its app only
        a.ctl("policy", "attach", "null", "--app", "srv", "--side", "receive")
        r = a.ctl(
            "engine", "upgrade", "null", "--module", "tests.integration.engines.null_v2",
            "--app", "srv",
        )  # fmt: skip
        assert [u["to_version"] for u in r["engines"]] == [2], r
        r = a.ctl("engine", "upgrade", "tcp", "--module", "engines.local", "--app", "client")
        assert [u["ok"] for u in r["engines"]] == [True], r
        # standing rules made at runtime, recorded or not: by their ids
        a.ctl("policy", "attach", "null", "--all", "--future", "--side", "receive")
        a.ctl("policy", "attach", "null", "--all", "--future", "--transient", "--method", "Ping")
        rules = a.ctl("policy", "rules")["rules"]
        time.sleep(0.5)
        before, scraped = _engines(a), _scrape(port)
        local_before = _tcp_stats(a, "client")["local_calls"]
        print("before:", json.dumps(before))
        hot_restart(a)
        after = _engines(a)
        print("after: ", json.dumps(after))
        assert after == before  # ids, engines, versions, modules: the transport is local
        known = {r["rule_id"] for r in rules}  # (app entries of the record come back as rules too)
        assert [r for r in a.ctl("policy", "rules")["rules"] if r["rule_id"] in known] == rules
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


# --------------------------------------------------------------------------- around a restart
# MRPC_TEST_PAUSE_TAKEOVER=STEP:SECONDS makes the new process pause at STEP (and log
# it), so a test can act in that window: "load" (the old one serves, the control
# loop is paused), "restore" (the old one is quiesced), "commit" (the old one has
# committed; the new one does not serve yet).


def _pause(step: str, seconds: float = 1.5) -> dict[str, str]:
    return {"MRPC_TEST_PAUSE_TAKEOVER": f"{step}:{seconds}"}


def _ctl_in_background(d: Daemon, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mrpcd.ctl", "--prefix", str(d.prefix), "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _wait_paused(d: Daemon, count: int = 1) -> int:
    """Wait until the new process logged its pause (the ``count``-th one); its pid."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [ln for ln in d.log().splitlines() if "the new mrpcd pauses" in ln]
        if len(lines) >= count:
            return int(lines[count - 1].split("mrpcd[", 1)[1].split("]", 1)[0])
        time.sleep(0.02)
    raise AssertionError(f"the new mrpcd never paused:\n{d.log()[-3000:]}")


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while mrpcd_running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not mrpcd_running(pid)


@pytest.mark.parametrize(
    ("step", "target"),
    [("restore", "old"), ("commit", "old"), ("commit", "new")],
    ids=["before-commit", "after-commit", "new-before-serving"],
)
def test_sigterm_during_a_hot_restart_stops_the_daemon_cleanly(
    cluster: Cluster, step: str, target: str
) -> None:
    """SIGTERM while a hot restart is under way means what it always means: the
    daemon drains and exits. Nothing is left running, half handed over or not."""
    a = cluster.daemon("a", env=_pause(step), config="drain_timeout: 1\n")
    old = a.pid
    apps = [
        cluster.server(a, name="srv"),
        cluster.app("client_app.py", str(a.prefix), a.listen, "--forever", name="cli"),
    ]
    restart = _ctl_in_background(a, "daemon", "restart")
    new = _wait_paused(a)
    t0 = time.monotonic()
    os.kill(old if target == "old" else new, signal.SIGTERM)
    out, err = restart.communicate(timeout=30)

    print(f"SIGTERM to the {target} mrpcd at {step}: mrpcctl daemon restart said {out or err}")
    code = a.proc.wait(20)
    assert _gone(new), f"the new mrpcd (pid {new}) still runs after SIGTERM:\n{a.log()[-3000:]}"
    print(f"both processes gone {time.monotonic() - t0:.2f} s after the SIGTERM")
    assert code == 0, a.log()[-3000:]
    assert not (a.prefix / "mrpcd.json").exists(), "the daemon did not stop cleanly"
    assert not (a.prefix / "mrpcd.sock").exists() or not _serving(a)
    print("\n".join(ln for ln in a.log().splitlines() if "signal" in ln or "stop" in ln))
    for app in apps:  # their daemon is gone: nothing to wait for
        app.proc.kill()
        app.proc.wait()


def _serving(d: Daemon) -> bool:
    r = d.ctl("status", check=False)
    return not isinstance(r, subprocess.CompletedProcess)


def test_apps_that_register_during_a_hot_restart_end_up_with_the_new_daemon(
    cluster: Cluster,
) -> None:
    """Registrations, schema binds and a new service while the control loop is
    paused and the state is handed over: they wait, then the new process serves
    them; none gets an error."""
    at = libmrpc.load_proto(ROOT / "schemas" / "alltypes.proto")
    a = cluster.daemon("a", env=_pause("restore"))
    try:
        cluster.server(a, name="srv")
        cli = cluster.app("client_app.py", str(a.prefix), a.listen, "--forever", name="cli")
        restart = _ctl_in_background(a, "daemon", "restart")
        _wait_paused(a)  # the old process is quiesced, its control loop paused
        late = [
            cluster.app(
                "client_app.py",
                str(a.prefix),
                a.listen,
                "--calls",
                "200",
                "--name",
                f"late{i}",
                name=f"late{i}",
                wait=False,
            )
            for i in range(2)
        ]
        errors: list[BaseException] = []
        answers: list[Any] = []
        channels: list[Any] = []

        class AllTypes(at.AllTypesServiceServicer):  # type: ignore[name-defined,misc]
            def Ping(self, request: Any, context: Any) -> Any:
                return at.Empty()

        server = libmrpc.Server(prefix=str(a.prefix), name="late_srv")
        server.add_servicer(AllTypes())

        def serve_late() -> None:
            try:
                server.start()  # registers, binds its schemas, serves a new service
                channels.append(libmrpc.connect(a.listen, prefix=str(a.prefix), name="late_cli"))
                stub = at.AllTypesServiceStub(channels[0])
                answers.append(stub.Ping(at.Empty(), timeout=30))
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        t = threading.Thread(target=serve_late)
        t.start()
        out, err = restart.communicate(timeout=30)
        assert restart.returncode == 0, err
        new_pid = json.loads(out)["new_pid"]
        t.join(30)
        assert not errors and len(answers) == 1, errors
        results = [x.result(60) for x in late]
        print("late clients:", results)
        for got in results:
            assert got["errors"] == {} and got["ok"] == 200, got
        names = {x["name"] for x in a.apps()}
        assert {"srv", "client", "late_srv"} <= names, names  # late_cli shares our session
        assert a.ctl("status")["pid"] == new_pid
        services = {s["service"]: s["served_by"] for s in a.ctl("services")["services"]}
        late_service = [s for s, by in services.items() if by and by["app"] == "late_srv"]
        assert late_service, services
        server.stop(1.0)
        (got,) = [cli.result(60)]
        assert got["errors"] == {} and got["mismatches"] == 0, got
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"


def test_a_second_restart_while_one_is_under_way_is_refused(cluster: Cluster) -> None:
    """Two `mrpcctl daemon restart` at once: one runs, the other gets
    FAILED_PRECONDITION and changes nothing; right after it, another one runs."""
    a = cluster.daemon("a", env=_pause("load", 1.0))
    try:
        cluster.server(a, name="srv")
        cli = cluster.app("client_app.py", str(a.prefix), a.listen, "--forever", name="cli")
        first = _ctl_in_background(a, "daemon", "restart")
        _wait_paused(a)
        second = a.ctl("daemon", "restart", check=False)
        print("the second restart said:", second.stderr.strip())
        assert second.returncode != 0 and "FAILED_PRECONDITION" in second.stderr, second.stderr
        assert "already under way" in second.stderr, second.stderr
        out, err = first.communicate(timeout=30)
        assert first.returncode == 0, err
        one = json.loads(out)
        assert _gone(one["old_pid"])
        two = hot_restart(a)  # in quick succession: runs against the new process
        assert two["old_pid"] == one["new_pid"] and two["new_pid"] != one["new_pid"]
        assert [x["name"] for x in a.apps()].count("srv") == 1
        (got,) = [cli.result(60)]
        assert got["errors"] == {} and got["mismatches"] == 0, got
    finally:
        assert stop_successor(a), "the new mrpcd did not stop on SIGTERM"
