"""Policies attached at runtime come back after the daemon restarts (PREFIX/policies.json)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

import libmrpc
from libmrpc import RpcError
from tests.integration.conftest import ROOT, Cluster, Daemon
from tests.integration.test_server_restart import call_until_served

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")

ALWAYS_ON = ("frontend", "tcp", "rdma")
DENY_ADMIN = "rules=[{name: no-admin, action: deny, field: key, prefix: admin/}]"


def restart(cluster: Cluster, d: Daemon, sig: int, name: str = "b") -> Daemon:
    """Stop ``d`` with ``sig`` and start a daemon on the same prefix and address."""
    d.stop(sig)
    old_log = d.log()
    assert "Traceback" not in old_log, old_log[-3000:]
    time.sleep(0.3)  # the server app notices and starts retrying
    return cluster.daemon(name, "--listen", d.listen)


def engines_of(d: Daemon, app: str) -> dict[str, dict]:
    """engine_id -> stats row, for the policy engines of ``app`` (from `mrpcctl stats`)."""
    for row in d.ctl("stats")["apps"]:
        if row["app"] == app:
            return {e["engine_id"]: e for e in row["engines"] if e["engine"] not in ALWAYS_ON}
    raise AssertionError(f"no app {app!r} in stats: {d.ctl('stats')}")


def outcomes(stub: object, keys: list[str]) -> list[str]:
    out = []
    for k in keys:
        try:
            stub.Call(testing.Request(key=k), timeout=10)  # type: ignore[attr-defined]
            out.append("OK")
        except RpcError as e:
            out.append(e.code().name)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_runtime_policies_come_back_after_a_restart(cluster: Cluster, sig: int) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    srv = cluster.server(b, name="srv")
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="client"))
    assert stub.Call(testing.Request(key="x"), timeout=10).served_by == "srv"
    pid = str(b.apps()[0]["pid"])

    r = b.ctl("policy", "attach", "acl", "--app", "srv", "--side", "receive", "--set", DENY_ADMIN)
    assert [p["app"] for p in r["persisted"]] == ["srv"]
    # by pid: recorded under the app's name, and the answer says so
    r = b.ctl(
        "policy", "attach", "ratelimit", "--app", pid, "--side", "receive",
        "--set", "max_tokens=100000",
    )  # fmt: skip
    (rl_eid,) = r["engine_ids"]
    (p,) = r["persisted"]
    assert p["app"] == "srv" and f"pid {pid}" in p["note"]
    b.ctl("policy", "set", rl_eid, "max_tokens=4", "tokens_per_fill=1", "fill_interval=3600")
    r = b.ctl("policy", "attach", "null", "--app", "srv", "--transient")
    assert r["transient"] and r["persisted"] == []

    rec = b.ctl("policy", "list", "--persisted")
    assert [(e["engine"], e["app"]) for e in rec["policies"]] == [
        ("acl", "srv"),
        ("ratelimit", "srv"),
    ]
    assert rec["policies"][1]["config"]["max_tokens"] == 4
    assert rec["policies"][1]["attached_by_pid"] == int(pid)
    assert oct(os.stat(b.prefix / "policies.json").st_mode & 0o777) == "0o600"

    b2 = restart(cluster, b, sig)
    served_by, failures = call_until_served(stub)  # the server registered again by itself
    assert served_by == "srv" and srv.proc.poll() is None
    engines = engines_of(b2, "srv")
    names = sorted(e["engine"] for e in engines.values())
    print(f"\n{signal.Signals(sig).name}: after {failures} failed calls, srv has {names}")
    assert names == ["acl", "ratelimit"]  # the transient null engine is gone
    rules = {x["rule_id"]: x for x in b2.ctl("policy", "rules")["rules"]}
    assert {x["engine"] for x in rules.values()} == {"acl", "ratelimit"}
    assert (
        next(x for x in rules.values() if x["engine"] == "ratelimit")["config"]["max_tokens"] == 4
    )

    # by behaviour: the acl denies again; the ratelimit runs with the config `policy set` gave it
    got = outcomes(stub, ["admin/1", *[f"user/{i}" for i in range(8)]])
    print(f"calls after the restart: {got}")
    assert got[0] == "PERMISSION_DENIED"
    assert "RESOURCE_EXHAUSTED" in got and got.count("OK") <= 4


def test_set_and_detach_after_a_restart_update_the_record(cluster: Cluster) -> None:
    b = cluster.daemon("b")
    cluster.server(b, name="srv")
    b.ctl("policy", "attach", "ratelimit", "--app", "srv", "--set", "max_tokens=1000")
    b.ctl("policy", "attach", "metrics", "--all", "--future")
    b2 = restart(cluster, b, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while not any(x["name"] == "srv" for x in b2.apps()):
        assert time.monotonic() < deadline, "srv did not register again"
        time.sleep(0.1)
    eids = engines_of(b2, "srv")
    rl = next(eid for eid, e in eids.items() if e["engine"] == "ratelimit")
    assert any(e["engine"] == "metrics" for e in eids.values())
    r = b2.ctl("policy", "set", rl, "max_tokens=7")
    assert r["not_recorded"] == {}
    met = next(eid for eid, e in eids.items() if e["engine"] == "metrics")
    r = b2.ctl("policy", "set", met, "enforce=false")  # from a --future rule: not recorded
    assert r["recorded"] == [] and "rule" in r["not_recorded"][met]
    rec = b2.ctl("policy", "list", "--persisted")["policies"]
    assert [(e["kind"], e["engine"], e["config"].get("max_tokens")) for e in rec] == [
        ("app", "ratelimit", 7),
        ("rule", "metrics", None),
    ]
    r = b2.ctl("policy", "detach", rl)
    assert r["detached"][0]["unrecorded"] == rec[0]["id"]
    r = b2.ctl("policy", "detach", "--rule", rec[1]["id"])
    assert r["unrecorded"] == rec[1]["id"]
    assert b2.ctl("policy", "list", "--persisted")["policies"] == []
    assert json.loads((b2.prefix / "policies.json").read_text())["policies"] == []


def test_a_corrupt_record_is_moved_aside_and_the_daemon_starts(cluster: Cluster) -> None:
    b = cluster.daemon("b")
    b.stop()
    (b.prefix / "policies.json").write_bytes(b'{"format": 1, "policies": [tru')
    b2 = cluster.daemon("b")
    aside = sorted(p.name for p in b.prefix.glob("policies.json.bad-*"))
    assert len(aside) == 1 and not (b.prefix / "policies.json").exists()
    assert f"moved it to {aside[0]}" in b2.log()
    assert b2.ctl("policy", "list", "--persisted")["policies"] == []
    cluster.server(b2, name="srv")
    b2.ctl("policy", "attach", "null", "--app", "srv")  # and it records again
    assert len(json.loads((b.prefix / "policies.json").read_text())["policies"]) == 1


def test_entries_with_a_gone_engine_or_a_bad_config_are_skipped_by_name(cluster: Cluster) -> None:
    b = cluster.daemon("b")
    b.stop()
    common = {"app": "srv", "side": "send", "method": None}
    record = {
        "format": 1,
        "engines": {},
        "policies": [
            {"id": "p1", "kind": "app", "engine": "vanished", "config": {}, **common},
            {
                "id": "p2",
                "kind": "app",
                "engine": "ratelimit",
                "config": {"max_tokens": -1},
                **common,
            },
            {"id": "p3", "kind": "app", "engine": "null", "config": {}, **common},
            {"id": 4, "kind": "app"},
        ],
    }
    (b.prefix / "policies.json").write_text(json.dumps(record))
    b2 = cluster.daemon("b")
    log = b2.log()
    assert "persisted policy p1 (attachment: vanished on app 'srv'" in log
    assert "persisted policy p2 (attachment: ratelimit on app 'srv'" in log
    assert "dropping a malformed entry: policies[3]: id" in log
    cluster.server(b2, name="srv")
    assert [e["engine"] for e in engines_of(b2, "srv").values()] == ["null"]
    rec = {e["id"]: e for e in b2.ctl("policy", "list", "--persisted")["policies"]}
    assert set(rec) == {"p1", "p2", "p3"}  # skipped ones stay recorded, marked
    assert "no engine named 'vanished'" in rec["p1"]["skipped"]
    assert "max_tokens" in rec["p2"]["skipped"] and rec["p3"]["skipped"] is None
    assert b2.ctl("policy", "detach", "--rule", "p1")["unrecorded"] == "p1"


def test_an_upgrade_of_every_app_is_kept_across_a_restart(cluster: Cluster) -> None:
    b = cluster.daemon("b")
    cluster.server(b, name="srv")
    b.ctl("policy", "attach", "null", "--app", "srv")
    mod = "tests.integration.engines.null_v2"
    one = b.ctl("engine", "upgrade", "null", "--module", mod, "--app", "srv")
    assert "until the daemon restarts" in one["not_persisted"]  # one app: not recorded
    assert b.ctl("policy", "list", "--persisted")["engines"] == {}
    r = b.ctl("engine", "upgrade", "null", "--module", mod, "--all")
    assert "not_persisted" not in r and r["version"] == 2
    assert b.ctl("policy", "list", "--persisted")["engines"] == {"null": mod}
    b2 = restart(cluster, b, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while not any(x["name"] == "srv" for x in b2.apps()):
        assert time.monotonic() < deadline, "srv did not register again"
        time.sleep(0.1)
    (app,) = b2.ctl("list")["apps"]
    (null,) = [e for e in app["datapath"] if e["engine"] == "null"]
    assert (null["version"], null["module"]) == (2, mod), null
