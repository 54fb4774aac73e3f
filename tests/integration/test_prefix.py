"""The prefix and the binding cache cannot be planted by other local users.

A root daemon refuses a prefix another user created, a symlink at the prefix and
a prefix others may write; it never runs a cache file it did not write; files
get their modes whatever the umask; applications and mrpcctl refuse a prefix of
another (non-root) user.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import marshal
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libmrpc import RpcError, StatusCode
from libmrpc._control import open_control
from libmrpc._schema import cache_key_for
from tests.integration.conftest import ROOT, Cluster, User
from tests.integration.test_schema_bind import bind, raw_app

P3 = 'syntax = "proto3";\n'


def texts_for(tag: str) -> dict[str, str]:
    return {
        f"{tag}.proto": P3 + f"package {tag};\nmessage M {{ int32 x = 1; }}\n"
        "service S { rpc Call(M) returns (M); }\n"
    }


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable sticky directory, like /tmp, that only this test uses."""
    d = Path(tempfile.mkdtemp(prefix="mrpc-shared-", dir="/tmp"))
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def start_daemon(prefix: Path, timeout: float = 15) -> tuple[subprocess.Popen[str], str | None]:
    """Start mrpcd on ``prefix``: (process, None) once it is ready, or (process, output) if it exited."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mrpcd", "run", "--prefix", str(prefix), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc, proc.stdout.read() if proc.stdout else ""
        try:
            if json.loads((prefix / "mrpcd.json").read_text()).get("pid") == proc.pid:
                return proc, None
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("mrpcd neither started nor exited")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    return out


def assert_refused(proc: subprocess.Popen[str], out: str | None, *words: str) -> None:
    if out is None:
        stop(proc)
        raise AssertionError("mrpcd started on an unsafe prefix")
    print(out.strip().splitlines()[-1])
    assert proc.returncode != 0
    assert "Traceback" not in out
    for w in words:
        assert w in out, out


# ---------------------------------------------------------------------------- planted prefix


def test_prefix_precreated_by_another_user_is_refused(shared_dir: Path, other_user: User) -> None:
    prefix = shared_dir / "mrpc-0"
    marker = shared_dir / "PWNED"
    texts = texts_for("planted")
    evil = f"import os\nopen({str(marker)!r}, 'w').write('ran as uid %d' % os.getuid())\n"
    planted = prefix / "cache" / (cache_key_for(texts) + ".py")
    plant = (
        f"import os\nos.mkdir({str(prefix)!r}, 0o755)\nos.mkdir({str(prefix / 'cache')!r}, 0o777)\n"
        f"open({str(planted)!r}, 'w').write({evil!r})\n"
    )
    r = other_user.run([*other_user.python, "-c", plant])
    assert r.returncode == 0, r.stderr
    proc, out = start_daemon(prefix)
    if out is None:  # the old daemon starts: show what that gives the other user
        try:
            sock = raw_app(prefix)
            try:
                bind(sock, texts)
            except RpcError:
                pass
        finally:
            stop(proc)
        raise AssertionError(
            f"mrpcd started on {prefix} made by {other_user.name}; "
            f"planted code ran: {marker.read_text() if marker.exists() else 'no'}"
        )
    assert_refused(proc, out, str(prefix), other_user.name)
    assert not marker.exists()
    assert not (prefix / "mrpcd.json").exists() and not (prefix / "app.sock").exists()


def test_symlink_at_prefix_is_refused_and_target_untouched(
    shared_dir: Path, other_user: User, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    os.chmod(victim, 0o700)
    (victim / "keep").write_text("root's file")
    prefix = shared_dir / "prefix"
    r = other_user.run(
        [*other_user.python, "-c", f"import os; os.symlink({str(victim)!r}, {str(prefix)!r})"]
    )
    assert r.returncode == 0, r.stderr
    proc, out = start_daemon(prefix)
    if out is None:
        stop(proc)
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o700, "mrpcd chmod-ed the symlink's target"
    assert sorted(os.listdir(victim)) == ["keep"], (
        f"mrpcd wrote into the symlink's target: {os.listdir(victim)}"
    )
    assert_refused(proc, out, "symlink", other_user.name)


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_prefix_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    prefix = tmp_path / "p"
    prefix.mkdir()
    os.chmod(prefix, mode)
    proc, out = start_daemon(prefix)
    assert_refused(proc, out, str(prefix), "writable by group or others")
    assert stat.S_IMODE(os.stat(prefix).st_mode) == mode  # left as it was, not "fixed"
    assert not (prefix / "app.sock").exists()


def test_cache_dir_of_another_user_is_refused(
    shared_dir: Path, other_user: User, tmp_path: Path
) -> None:
    cache = shared_dir / "cache"
    r = other_user.run([*other_user.python, "-c", f"import os; os.mkdir({str(cache)!r}, 0o700)"])
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"cache_dir: {cache}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrpcd",
            "run",
            "--prefix",
            str(tmp_path / "p"),
            "--listen",
            "127.0.0.1:0",
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    print(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cache directory" in proc.stderr and other_user.name in proc.stderr


# ---------------------------------------------------------------------------- planted cache files


def test_planted_cache_files_are_never_run(cluster: Cluster, other_user: User) -> None:
    a = cluster.daemon("a")
    a.stop()
    cache = a.prefix / "cache"
    marker = cluster.base / "PWNED"
    evil_src = f"open({str(marker)!r}, 'a').write('planted code ran\\n')\n"
    evil_code = marshal.dumps((compile(evil_src, "evil", "exec"),))
    planted = [texts_for(f"plant{i}") for i in range(3)]
    keys = [cache_key_for(t) for t in planted]
    # 1. the old layout: <key>.py (root's, 0644), as a daemon of an older version would have imported it
    (cache / f"{keys[0]}.py").write_text(evil_src)
    # 2. a well-formed entry with a valid keyed hash, but owned by another user
    secret_path = cache / ".secret"
    secret = secret_path.read_bytes() if secret_path.exists() else b""
    import zlib

    def entry(key: str, mac_key: bytes) -> bytes:
        header = json.dumps(
            {
                "cache_key": key,
                "schema_hash": "0" * 16,
                "python": __import__("importlib.util").util.MAGIC_NUMBER.hex(),
            }
        ).encode()
        rest = len(header).to_bytes(4, "big") + header + zlib.compress(evil_code)
        return b"MRPCBIN1" + hmac.new(mac_key, rest, hashlib.sha256).digest() + rest

    p1 = cache / f"{keys[1]}.bin"
    p1.write_bytes(entry(keys[1], secret))
    os.chmod(p1, 0o600)
    os.chown(p1, other_user.uid, other_user.gid)
    # 3. root's file, mode 0600, but its hash is not keyed with the daemon's secret
    p2 = cache / f"{keys[2]}.bin"
    p2.write_bytes(entry(keys[2], b"guessed"))
    os.chmod(p2, 0o600)

    a2 = cluster.daemon("a")
    sock = raw_app(a2.prefix)
    hows = [bind(sock, t)["how"] for t in planted]
    print("binds of planted schemas:", hows)
    assert not marker.exists(), marker.read_text()
    assert hows == ["compiled"] * 3
    log = a2.log()
    assert f"{keys[1]}.bin" in log and other_user.name in log
    assert f"{keys[2]}.bin" in log and "keyed hash" in log
    assert not (cache / f"{keys[0]}.py").exists()
    again = raw_app(a2.prefix, "again")
    assert [bind(again, t)["how"] for t in planted] == ["memory"] * 3


# ---------------------------------------------------------------------------- modes and umask


@pytest.mark.parametrize("umask", [0o777, 0o000])
def test_file_modes_do_not_depend_on_umask(cluster: Cluster, umask: int) -> None:
    old = os.umask(umask)
    try:
        a = cluster.daemon("a")
    finally:
        os.umask(old)
    sock = raw_app(a.prefix)
    assert bind(sock, texts_for("modes"))["how"] == "compiled"
    p = a.prefix
    modes = {
        str(f.relative_to(p)): oct(stat.S_IMODE(os.lstat(f).st_mode))
        for f in [p, *sorted(p.rglob("*"))]
    }
    print(f"umask {umask:04o}:", modes)
    want = {
        ".": "0o755",
        "cache": "0o700",
        "mrpcd.json": "0o644",
        "mrpcd.lock": "0o644",
        "app.sock": "0o666",
        "ctl.sock": "0o600",
        "cache/.secret": "0o600",
    }
    for name, mode in want.items():
        assert modes.get(name) == mode, (name, modes.get(name))
    entries = [m for n, m in modes.items() if n.startswith("cache/") and n != "cache/.secret"]
    assert entries and set(entries) == {"0o600"}, modes


# ---------------------------------------------------------------------------- the application side


FAKE_DAEMON = """
import json, os, socket, sys
prefix = sys.argv[1]
os.mkdir(prefix, 0o755)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(os.path.join(prefix, "app.sock"))
os.chmod(os.path.join(prefix, "app.sock"), 0o666)
s.listen(8)
print("READY", flush=True)
while True:
    c, _ = s.accept()
    msg = c.recv(1 << 16)
    with open(os.path.join(prefix, "captured"), "ab") as f:
        f.write(msg + b"\\n")
    c.send(json.dumps({"ok": False, "code": 14, "error": "captured by the fake daemon"}).encode())
    c.close()
"""


def test_app_refuses_prefix_of_another_user(shared_dir: Path, other_user: User) -> None:
    prefix = shared_dir / "eve"
    fake = other_user.popen(
        [*other_user.python, "-c", FAKE_DAEMON, str(prefix)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "READY"
        from libmrpc._session import Session

        with pytest.raises(RpcError) as info:
            Session(prefix, name="victim")
        print(info.value.details())
        assert info.value.code() == StatusCode.PERMISSION_DENIED, info.value.details()
        assert str(prefix) in info.value.details() and other_user.name in info.value.details()
        assert not (prefix / "captured").exists(), (prefix / "captured").read_text()
        ctl = subprocess.run(
            [sys.executable, "-m", "mrpcd.ctl", "--prefix", str(prefix), "status"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            check=False,
        )
        assert ctl.returncode != 0 and "PERMISSION_DENIED" in ctl.stderr, ctl.stderr
        from libmrpc._paths import check_daemon_peer

        sock = open_control(
            str(prefix / "app.sock")
        )  # past the file checks: the peer's uid still counts
        with sock, pytest.raises(RpcError) as info:
            check_daemon_peer(sock, str(prefix / "app.sock"))
        assert (
            info.value.code() == StatusCode.PERMISSION_DENIED
            and other_user.name in info.value.details()
        )
    finally:
        fake.kill()
        fake.wait()
