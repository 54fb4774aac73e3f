"""ControlLoop with a stand-in handler: slow operations run on workers without
stalling other connections, one connection's replies keep their order, the
registration timer, and cleanup when a registered connection ends."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from libmrpc._control import recv_msg, send_msg
from mrpcd.control_loop import AppConn, ControlLoop


class Fake:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.gone: list[tuple[Any, str]] = []
        self.threads: dict[str, str] = {}  # op -> the thread that ran it

    def handle(self, conn: AppConn, msg: dict[str, Any]) -> dict[str, Any] | None:
        self.threads[msg["op"]] = threading.current_thread().name
        if msg["op"] == "register":
            conn.app = msg["name"]
        if msg["op"] == "bind_schema":
            self.release.wait(10)  # a compile that takes a while
        return {"ok": True, "op": msg["op"], "n": msg.get("n")}

    def on_gone(self, conn: AppConn, reason: str) -> None:
        self.gone.append((conn.app, reason))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Fake, ControlLoop]]:
    path = str(tmp_path / "app.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    fake = Fake()
    loop = ControlLoop(listener, fake.handle, fake.on_gone, register_timeout=0.3, workers=2)
    loop.start()
    yield path, fake, loop
    fake.release.set()
    loop.stop()
    listener.close()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(path)
    return s


def ask(s: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
    send_msg(s, msg)
    reply, _ = recv_msg(s)
    assert reply is not None
    return reply


def test_a_slow_op_stalls_neither_others_nor_its_own_order(
    served: tuple[str, Fake, ControlLoop],
) -> None:
    path, fake, _ = served
    slow, other = connect(path), connect(path)
    ask(slow, {"op": "register", "name": "slow"})
    send_msg(slow, {"op": "bind_schema"})
    send_msg(slow, {"op": "ping", "n": 2})  # must wait for the bind's reply
    start = time.monotonic()
    assert ask(other, {"op": "ping"})["ok"]
    took = time.monotonic() - start
    assert took < 1.0, f"another connection's ping took {took:.2f}s while a bind ran"
    fake.release.set()
    assert recv_msg(slow)[0] == {"ok": True, "op": "bind_schema", "n": None}
    assert recv_msg(slow)[0] == {"ok": True, "op": "ping", "n": 2}
    assert fake.threads["ping"] == "mrpcd-apps"  # quick ops on the loop, slow ones on workers
    assert fake.threads["bind_schema"].startswith("mrpcd-ctl-bind")
    assert fake.threads["register"].startswith("mrpcd-ctl-worker")
    slow.close()
    other.close()


def test_a_connection_that_does_not_register_is_closed_by_the_timer(
    served: tuple[str, Fake, ControlLoop],
) -> None:
    path, fake, loop = served
    idle = connect(path)
    assert ask(idle, {"op": "ping"})["ok"]  # answered, but not registered
    start = time.monotonic()
    assert recv_msg(idle)[0] is None  # end of stream
    assert 0.1 < time.monotonic() - start < 3
    assert not loop.conns and not fake.gone  # nothing registered: nothing to clean up
    idle.close()


def test_end_of_stream_cleans_up_a_registered_app(served: tuple[str, Fake, ControlLoop]) -> None:
    path, fake, loop = served
    s = connect(path)
    ask(s, {"op": "register", "name": "app"})
    time.sleep(0.5)  # past the registration timeout: registered apps stay
    assert ask(s, {"op": "ping"})["ok"]
    s.close()
    deadline = time.monotonic() + 5
    while not fake.gone and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.gone == [("app", "application disconnected")]
    assert not loop.conns


def test_a_bad_message_is_invalid_argument_and_the_connection_lives(
    served: tuple[str, Fake, ControlLoop],
) -> None:
    path, _, _ = served
    s = connect(path)
    s.send(b"not json")
    reply, _ = recv_msg(s)
    assert reply is not None and reply["code"] == 3 and "bad control message" in reply["error"]
    assert ask(s, {"op": "ping"})["ok"]
    s.close()
