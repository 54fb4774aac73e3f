"""sd_notify messages on a real unix datagram socket; the journald log format."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mrpcd.logs import JournalFormatter, priority, stderr_is_journal
from mrpcd.notify import Notifier, Watchdog, socket_address


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    with sock:
        yield path, sock


def fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def test_socket_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("relative/path") is None
    assert socket_address("@") is None


def test_messages_arrive_on_a_path_socket(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier(path)
    assert n.enabled
    assert n.ready("serving 2 apps")
    assert fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving 2 apps"}
    assert n.stopping("draining\n3 RPCs")  # a newline would end the STATUS field
    assert fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "draining 3 RPCs"}
    assert n.mainpid(1234)
    assert sock.recv(4096) == b"MAINPID=1234"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    got = fields(sock.recv(4096))
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert got["RELOADING"] == "1" and before <= int(got["MONOTONIC_USEC"]) <= after, got
    assert n.status("serving 0 apps") and sock.recv(4096) == b"STATUS=serving 0 apps"
    assert n.watchdog() and sock.recv(4096) == b"WATCHDOG=1"


def test_messages_arrive_on_an_abstract_socket() -> None:
    name = f"mrpc-test-notify-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier("@" + name).ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled and not n.ready() and not n.stopping()


def test_a_failed_send_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.DEBUG, logger="mrpcd.notify"):
        assert not n.ready()
        assert not n.stopping()
        assert not n.status("x")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "nobody-listens.sock" in warnings[0].getMessage()
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 2


def test_from_environ_unsets_the_variables_for_children(
    monkeypatch: pytest.MonkeyPatch, listener: tuple[str, socket.socket]
) -> None:
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_environ()
    assert n.enabled and n.watchdog_usec == 3_000_000
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert var not in os.environ
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('NOTIFY_SOCKET'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert child.stdout.strip() == "None"
    assert n.ready() and sock.recv(4096) == b"READY=1"  # we still notify


def test_a_watchdog_meant_for_another_pid_is_ignored() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environ(env).watchdog_usec == 0
    assert env == {}


def test_the_watchdog_pings_only_while_healthy(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    healthy = [True]
    dog = Watchdog(Notifier(path, watchdog_usec=100_000), lambda _timeout: healthy[0])
    dog.start()
    try:
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"WATCHDOG=1"
        healthy[0] = False
        time.sleep(0.2)
        sock.settimeout(0.3)
        while True:  # drain what was sent before the switch
            try:
                sock.recv(4096)
            except TimeoutError:
                break
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
        healthy[0] = True
        sock.settimeout(5)
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        dog.stop()


def test_journal_format_prefixes_every_line_with_the_priority() -> None:
    fmt = JournalFormatter()
    rec = logging.LogRecord("mrpcd.daemon", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert fmt.format(rec) == "<4>mrpcd.daemon: a\n<4>b"
    assert [priority(x) for x in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


def test_stderr_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "log").open("w") as f, (tmp_path / "other").open("w") as g:
        st, other = os.fstat(f.fileno()), os.fstat(g.fileno())
        assert stderr_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stderr_is_journal(f, {"JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino}"})
        assert not stderr_is_journal(f, {"JOURNAL_STREAM": "garbage"})
        assert not stderr_is_journal(f, {})
