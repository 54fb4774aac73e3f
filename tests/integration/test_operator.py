"""mrpcctl, the operator socket's access rules, config errors, binding cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import libmrpc
from tests.integration.conftest import ROOT, Cluster

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")


def test_status_and_list(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="lister"))
    stub.Call(testing.Request(payload=b"x"), timeout=10)
    st = a.ctl("status")
    assert st["pid"] == a.pid and st["listen"] == a.listen and st["apps"] == 1
    assert st["config"]["listen"] == "127.0.0.1:0"
    (app,) = a.apps()
    assert app["name"] == "lister" and app["pid"] == os.getpid()
    assert [e["engine"] for e in app["datapath"]] == ["frontend", "tcp"]
    assert app["connections"][0]["addr"] == b.listen
    (srv,) = b.apps()
    assert srv["serves"] == ["mrpctest.Test"] and srv["schemas"][0]["hash"] == testing.SCHEMA_HASH
    text = subprocess.run(
        [sys.executable, "-m", "mrpcd.ctl", "--prefix", str(a.prefix), "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "app lister" in text and "engine lister/frontend" in text and f"-> {b.listen}" in text
    text = subprocess.run(
        [sys.executable, "-m", "mrpcd.ctl", "--prefix", str(a.prefix), "status"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"listening on {a.listen}" in text
    # start-up objects are frozen out of the collector's reach; status collected once itself
    gcs = a.ctl("status")["gc"]
    print("daemon gc:", gcs)
    assert gcs["frozen_objects"] > 5000
    assert gcs["collections"][2] >= 2 and 0 < gcs["longest_ms"][2] <= gcs["total_ms"][2]
    assert "start-up objects frozen" in text


def test_other_users_cannot_reach_the_operator_socket(cluster: Cluster) -> None:
    a = cluster.daemon("a")
    # by file permissions: another user can reach the app socket but not the operator socket
    # (the daemon's own check of operator credentials: tests/integration/test_control_access.py)
    os.chmod(cluster.base, 0o755)
    probe = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "out = []\n"
        "for name in ('app.sock', 'ctl.sock'):\n"
        "    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "    try:\n"
        "        s.connect(os.path.join(sys.argv[1], name)); out.append('ok')\n"
        "    except PermissionError:\n"
        "        out.append('denied')\n"
        "print(' '.join(out))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, str(a.prefix)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert r.stdout.split() == ["ok", "denied"], r.stderr


def test_schema_prefetch_and_bind_times(cluster: Cluster) -> None:
    env = {"MRPC_CACHE_DIR": str(cluster.base / "shared-cache")}
    a = cluster.daemon("a", env=env)
    r = a.ctl("schema", "prefetch", str(ROOT / "schemas" / "echo.proto"))
    assert r["how"] == "compiled" and r["services"] == ["echo.Echo"]
    cold = r["bind_ms"]
    r = a.ctl("schema", "prefetch", str(ROOT / "schemas" / "echo.proto"))
    assert r["how"] == "memory"
    a.stop()
    a2 = cluster.daemon("a2", env=env)  # a new daemon on the same cache directory
    r = a2.ctl("schema", "prefetch", str(ROOT / "schemas" / "echo.proto"))
    assert r["how"] == "disk"
    print(f"bind: cold {cold} ms, cached on disk {r['bind_ms']} ms")
    assert "bound schema" in a2.log()


def test_config_errors_name_key_and_file(cluster: Cluster, tmp_path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("listen: 127.0.0.1:0\nshm:\n  ring_slotz: 64\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrpcd",
            "run",
            "--prefix",
            str(tmp_path / "p"),
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode != 0 and str(cfg) in r.stderr and "shm.ring_slotz" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrpcd",
            "run",
            "--prefix",
            str(tmp_path / "p"),
            "--config",
            str(tmp_path / "missing.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode != 0 and "missing.yaml" in r.stderr


def test_one_daemon_per_prefix(cluster: Cluster) -> None:
    a = cluster.daemon("a")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrpcd",
            "run",
            "--prefix",
            str(a.prefix),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode != 0 and "already runs" in r.stderr and str(a.pid) in r.stderr
    assert a.ctl("status")["pid"] == a.pid  # the first one is untouched


def test_mrpcctl_without_daemon_says_so(tmp_path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mrpcd.ctl", "--prefix", str(tmp_path), "status"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode != 0 and "UNAVAILABLE" in r.stderr and "mrpcd run" in r.stderr


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_daemon_uses_no_cpu(cluster: Cluster) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="idle"))
    stub.Call(testing.Request(payload=b"x"), timeout=10)  # engines, connections and apps exist
    time.sleep(0.3)
    before = {d.pid: _cpu_seconds(d.pid) for d in (a, b)}
    time.sleep(2.0)
    used = {pid: _cpu_seconds(pid) - t for pid, t in before.items()}
    assert all(u < 0.1 for u in used.values()), used  # < 5 % of a core while idle
