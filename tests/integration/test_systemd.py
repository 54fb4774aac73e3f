"""mrpcd under systemd: the notify protocol against a real daemon, the journald log
format, and the unit file (parsed; ``systemd-analyze verify`` when installed).

The service manager is played by a unix datagram socket bound here and passed to
a real ``mrpcd run`` as ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import APPS, ROOT, Cluster, User

UNIT = ROOT / "deploy" / "mrpcd.service"
SYSUSERS = ROOT / "deploy" / "mrpc.sysusers.conf"
QUIET: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 60}


class Manager:
    """The service manager's end of NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value
        self.seen: list[dict[str, str]] = []

    def next(self, timeout: float = 20) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        msg = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append(msg)
        return msg

    def until(self, key: str, timeout: float = 20) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.1, deadline - time.monotonic()))
            if key in msg:
                return msg


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    with sock:
        yield Manager(sock, str(path))


def _run(prefix: Path, env: dict[str, str], stderr: object = None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "mrpcd", "run", "--prefix", str(prefix)]
    return subprocess.Popen(
        [*argv, "--listen", "127.0.0.1:0"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=stderr if stderr is not None else subprocess.DEVNULL,
    )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_ready_comes_only_once_the_app_socket_accepts(manager: Manager, tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    proc = _run(prefix, {"NOTIFY_SOCKET": manager.env_value})
    try:
        msg = manager.next()
        # the first message is READY=1, and the sockets accept the moment it arrives
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as app:
            app.connect(str(prefix / "app.sock"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as op:
            op.connect(str(prefix / "ctl.sock"))
        assert msg.get("READY") == "1", msg
        assert json.loads((prefix / "mrpcd.json").read_text())["pid"] == proc.pid
        assert msg["STATUS"].startswith("serving 0 apps; peers on 127.0.0.1:"), msg
        print("first notify message:", msg)
        assert _stop(proc) == 0
        stopping = manager.until("STOPPING")
        assert stopping["STATUS"].startswith("draining "), stopping
    finally:
        _stop(proc)


def test_ready_arrives_on_an_abstract_notify_socket(tmp_path: Path) -> None:
    name = f"mrpc-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.bind("\0" + name)
        manager = Manager(sock, "@" + name)
        proc = _run(tmp_path / "prefix", {"NOTIFY_SOCKET": manager.env_value})
        try:
            assert manager.next().get("READY") == "1", manager.seen
        finally:
            assert _stop(proc) == 0


def test_status_follows_the_apps_and_stopping_precedes_exit(
    cluster: Cluster, manager: Manager
) -> None:
    d = cluster.daemon("a", env={"NOTIFY_SOCKET": manager.env_value})
    assert manager.until("READY")["STATUS"].startswith("serving 0 apps"), manager.seen
    server = cluster.server(d, name="kv")
    msg = manager.next(10)
    assert msg.get("STATUS", "").startswith("serving 1 app;"), manager.seen
    server.stop()
    assert manager.next(10).get("STATUS", "").startswith("serving 0 apps"), manager.seen
    d.proc.send_signal(signal.SIGTERM)
    stopping = manager.until("STOPPING", 10)  # sent when the drain starts, before the exit
    assert stopping["STOPPING"] == "1"
    assert d.stop() == 0
    print("notify messages:", manager.seen)


def test_sighup_is_a_hot_restart_between_reloading_and_mainpid_ready(
    manager: Manager, tmp_path: Path
) -> None:
    """SIGHUP (ExecReload=) hands over to a new process that reads the config anew:
    RELOADING=1, then MAINPID=<new pid> and READY=1; a config that no longer loads
    leaves the old process serving (RELOADING=1, READY=1) and says why in the log."""
    config = tmp_path / "mrpcd.yaml"
    config.write_text("log_level: info\nruntimes: 1\n")
    log = tmp_path / "mrpcd.log"
    prefix = tmp_path / "p"
    argv = [sys.executable, "-m", "mrpcd", "run", "--config", str(config)]
    env = {**os.environ, "NOTIFY_SOCKET": manager.env_value}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*argv, "--prefix", str(prefix), "--listen", "127.0.0.1:0"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    new_pid = 0
    try:
        manager.until("READY")
        config.write_text("log_level: warning\nruntimes: 2\n")
        sent = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading = manager.until("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) >= sent, reloading
        handed = manager.until("MAINPID")  # the old process names its successor first
        new_pid = int(handed["MAINPID"])
        assert new_pid != proc.pid, manager.seen
        ready = manager.until("READY")
        assert ready["MAINPID"] == str(new_pid), manager.seen  # the successor's own message
        assert proc.wait(10) == 0  # the old process left once the new one took over
        assert json.loads((prefix / "mrpcd.json").read_text())["pid"] == new_pid
        config.write_text("log_level: [not, a, level]\n")
        os.kill(new_pid, signal.SIGHUP)
        manager.until("RELOADING")
        again = manager.until("READY")
        assert "MAINPID" not in again and "failed" in again.get("STATUS", ""), manager.seen
        assert json.loads((prefix / "mrpcd.json").read_text())["pid"] == new_pid  # serves on
        os.kill(new_pid, signal.SIGTERM)
        manager.until("STOPPING")
    finally:
        _stop(proc)
        if new_pid:
            _wait_gone(new_pid)
    text = log.read_text()
    print(text)
    print("notify messages:", manager.seen)
    assert f"hot restart: handed over to pid {new_pid}" in text
    assert "ERROR mrpcd: SIGHUP: hot restart failed, the old mrpcd serves on: " in text
    assert "the config does not load" in text
    assert "draining in-flight RPCs" not in text  # INFO is off in the new process
    assert "Traceback" not in text


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"mrpcd pid {pid} did not stop")


def test_logs_are_journald_lines_when_stderr_is_the_journal(tmp_path: Path) -> None:
    log = tmp_path / "journal"
    with log.open("w") as out:
        st = os.fstat(out.fileno())
        proc = _run(tmp_path / "p", {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "p" / "mrpcd.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        assert _stop(proc) == 0
    lines = log.read_text().splitlines()
    print("\n".join(lines))
    assert lines and all(ln.startswith(("<6>", "<4>", "<3>", "<7>")) for ln in lines), lines
    assert any(ln.startswith("<6>mrpcd.daemon: mrpcd ") and " ready: " in ln for ln in lines)
    assert not any(" INFO " in ln or "mrpcd[" in ln for ln in lines)  # no timestamp, pid, level


def test_logs_stay_plain_when_journal_stream_names_another_file(tmp_path: Path) -> None:
    other = os.stat(UNIT)
    log = tmp_path / "log"
    with log.open("w") as out:
        proc = _run(tmp_path / "p", {"JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino}"}, out)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "p" / "mrpcd.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        assert _stop(proc) == 0
    assert f"mrpcd[{proc.pid}] INFO mrpcd.daemon: mrpcd " in log.read_text()


def test_watchdog_pings_arrive_while_the_runtimes_answer(manager: Manager, tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": manager.env_value, "WATCHDOG_USEC": "400000"}
    proc = _run(tmp_path / "prefix", env)
    try:
        manager.until("READY")
        start = time.monotonic()
        pings = [manager.until("WATCHDOG", 5) for _ in range(3)]
        took = time.monotonic() - start
        print(f"3 watchdog pings in {took:.2f}s (WATCHDOG_USEC=400000)")
        assert all(p["WATCHDOG"] == "1" for p in pings) and took < 3, took
    finally:
        assert _stop(proc) == 0


def test_the_units_layout_serves_other_users(other_user: User, third_user: User) -> None:
    """The unit's setup without systemd: mrpcd runs as a service user (other_user stands
    in for mrpc) with deploy/mrpcd.yaml, the unit's environment and the directories
    systemd would make; another user's app connects with MRPC_PREFIX and
    MRPC_DAEMON_USER, as the README says; the operator socket takes root only."""
    import grp

    base = Path(tempfile.mkdtemp(prefix="mrpc-svc-", dir="/tmp"))
    base.chmod(0o755)
    run, state = base / "run" / "mrpc", base / "lib" / "mrpc"
    for d, mode in ((run, 0o755), (state, 0o700)):  # RuntimeDirectoryMode, StateDirectoryMode
        d.mkdir(parents=True)
        os.chown(d, other_user.uid, other_user.gid)
        d.chmod(mode)
    name = f"mrpc-test-{secrets.token_hex(6)}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    abstract.bind("\0" + name)  # no file permissions: the service user may send to it
    manager = Manager(abstract, "@" + name)
    unit_env = dict(v.split("=", 1) for v in _unit(UNIT)["Service"]["Environment"])
    env = {
        "RUNTIME_DIRECTORY": str(run),
        "MRPC_CACHE_DIR": unit_env["MRPC_CACHE_DIR"].replace("/var/lib/mrpc", str(state)),
        "MRPC_OPERATOR_GROUP": grp.getgrgid(other_user.gid).gr_name,
        "MRPC_LISTEN": "127.0.0.1:0",
        "NOTIFY_SOCKET": manager.env_value,
    }
    log = base / "mrpcd.log"
    argv = [*other_user.python, "-m", "mrpcd", "run", "--config", str(ROOT / "deploy/mrpcd.yaml")]
    with log.open("w") as out:
        daemon = other_user.popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    app = None
    try:
        assert manager.until("READY").get("READY") == "1", log.read_text()
        trust = {"MRPC_PREFIX": str(run), "MRPC_DAEMON_USER": other_user.name}
        ctl = [sys.executable, "-m", "mrpcd.ctl", "--json", "status"]
        r = subprocess.run(ctl, env={**os.environ, **trust}, check=False, **QUIET)
        assert r.returncode == 0, r.stderr  # root operates it
        refused = subprocess.run(
            ctl, env={**os.environ, "MRPC_PREFIX": str(run)}, check=False, **QUIET
        )
        assert refused.returncode != 0 and "only a daemon run by" in refused.stderr, refused
        r = third_user.run([*third_user.python, "-m", "mrpcd.ctl", "status"], env=trust)
        assert r.returncode != 0 and "PERMISSION_DENIED" in r.stdout + r.stderr, r
        app = third_user.popen(
            [*third_user.python, str(APPS / "server_app.py"), str(run), "--name", "kv"],
            env=trust,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "READY", app.stderr
        assert manager.until("STATUS", 10)["STATUS"].startswith("serving 1 app;"), manager.seen
        cache = os.stat(state / "cache")
        assert (cache.st_uid, cache.st_mode & 0o777) == (other_user.uid, 0o700)
        daemon.send_signal(signal.SIGTERM)
        assert manager.until("STOPPING", 10)["STOPPING"] == "1"
        assert daemon.wait(15) == 0, log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        for p in (app, daemon):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        abstract.close()
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- the unit file


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_unit_file_has_the_key_settings() -> None:
    svc = _unit(UNIT)["Service"]

    def one(key: str) -> str:
        assert len(svc.get(key, [])) == 1, f"{key}: {svc.get(key)}"
        return svc[key][0]

    assert one("Type") == "notify"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("WatchdogSec") == "30s"
    assert one("ExecStart").endswith("mrpcd run --config /etc/mrpc/mrpcd.yaml")
    assert one("User") == one("Group") == "mrpc"
    assert one("RuntimeDirectory") == "mrpc" and one("RuntimeDirectoryMode") == "0755"
    assert one("StateDirectory") == "mrpc"
    env = dict(v.split("=", 1) for v in svc["Environment"])
    assert env["MRPC_CACHE_DIR"] == "/var/lib/mrpc/cache"  # StateDirectory=mrpc
    assert env["MRPC_OPERATOR_GROUP"] == "mrpc"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one("SystemCallFilter") == "@system-service"  # has memfd_create (@ipc)
    assert "MemoryDenyWriteExecute" not in svc
    assert one("NoNewPrivileges") == "yes" and one("ProtectSystem") == "strict"
    assert _unit(UNIT)["Install"]["WantedBy"] == ["multi-user.target"]
    assert 'u mrpc - "mrpc daemon" /var/lib/mrpc' in SYSUSERS.read_text().splitlines()


def test_the_config_file_of_the_unit_is_the_shipped_one(tmp_path: Path) -> None:
    """ExecStart's --config is deploy/mrpcd.yaml installed; with the unit's environment
    it loads, with the prefix systemd gives and the cache in the state directory."""
    from mrpcd.config import load_config

    svc = _unit(UNIT)["Service"]
    env = dict(v.split("=", 1) for v in svc["Environment"])
    env["RUNTIME_DIRECTORY"] = "/run/mrpc"
    config = load_config(ROOT / "deploy" / "mrpcd.yaml", env=env)
    assert str(config.prefix) == "/run/mrpc" and str(config.app_socket) == "/run/mrpc/app.sock"
    assert str(config.cache_dir) == "/var/lib/mrpc/cache" and config.operator_group == "mrpc"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    mrpcd = Path(sys.executable).parent / "mrpcd"
    if not mrpcd.exists():
        pytest.skip(f"no mrpcd console script next to {sys.executable} for ExecStart=")
    unit = tmp_path / "mrpcd.service"  # ExecStart must name an existing executable
    unit.write_text(UNIT.read_text().replace("/opt/mrpc/bin/mrpcd", str(mrpcd)))
    r = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    print(r.stdout, r.stderr)
    assert r.returncode == 0 and "mrpcd.service" not in r.stderr, r.stderr


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed"
)
def test_sysusers_creates_the_mrpc_user_and_group(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        (etc / name).touch()
    r = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    passwd = (etc / "passwd").read_text()
    assert passwd.startswith("mrpc:x:") and ":/var/lib/mrpc:" in passwd, passwd
    assert (etc / "group").read_text().startswith("mrpc:x:")
