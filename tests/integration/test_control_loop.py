"""One event loop serves every app control socket: threads stay constant however
many apps register, fds grow by a few per app, running out of fds is
RESOURCE_EXHAUSTED for the registering app, and slow operations of one app do
not stall the others."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import time
from pathlib import Path

import pytest

from libmrpc import RpcError, StatusCode
from libmrpc._control import ControlError, open_control, request, send_msg
from tests.integration.conftest import Cluster, Daemon
from tests.integration.test_control_robustness import resources, wait_apps

MANY = (
    "apps:\n  max: 5000\n  max_per_uid: 5000\n  register_rate: 1000000\n  register_burst: 1000000\n"
)


def register(path: str, name: str) -> socket.socket:
    """A raw control connection that registers and stays open (the region fds are closed)."""
    s = open_control(path, timeout=30)
    try:
        _, fds = request(s, {"op": "register", "name": name})
    except BaseException:
        s.close()
        raise
    for fd in fds:
        os.close(fd)
    return s


def set_nofile(d: Daemon, soft: int | str) -> None:
    subprocess.run(["prlimit", f"--pid={d.pid}", f"--nofile={soft}:"], check=True)


def nofile(d: Daemon) -> str:
    return Path(f"/proc/{d.pid}/limits").read_text().split("Max open files")[1].split()[0]


@pytest.fixture
def many_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"this test needs 4096 fds; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_apps_cost_no_thread_and_a_few_fds_each(
    cluster: Cluster, many_fds: None
) -> None:
    a = cluster.daemon("a", config=MANY)
    set_nofile(a, 20000)
    path = str(a.prefix / "app.sock")
    before = resources(a.pid)
    start = time.monotonic()
    socks = [register(path, f"app{i}") for i in range(1000)]
    took = time.monotonic() - start
    during = resources(a.pid)
    per_app = (during["fds"] - before["fds"]) / 1000
    print(
        f"\n1000 apps registered in {took:.1f}s: daemon before {before}, with 1000 apps {during}; "
        f"{per_app:.2f} fds per app"
    )
    try:
        assert during["threads"] == before["threads"], "registering must not start threads"
        assert per_app <= 7
        assert a.ctl("status")["apps"] == 1000
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 60
    while a.ctl("status")["apps"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert a.ctl("status")["apps"] == 0
    after = resources(a.pid)
    print(f"after they left: {after}")
    assert after["fds"] <= before["fds"] + 2 and after["threads"] == before["threads"]


def test_out_of_fds_is_resource_exhausted_for_the_registering_app(cluster: Cluster) -> None:
    a = cluster.daemon("a", config=MANY)
    path = str(a.prefix / "app.sock")
    soft = nofile(a)
    socks = [register(path, "first")]
    base = resources(a.pid)["fds"]
    set_nofile(a, base + 40)
    refusals: list[str] = []
    try:
        for i in range(60):
            try:
                socks.append(register(path, f"app{i}"))
            except ControlError as e:
                assert e.code() == StatusCode.RESOURCE_EXHAUSTED, e
                refusals.append(e.details())
            except (
                RpcError,
                OSError,
            ) as e:  # a refused connection may be reset before its reply is read
                refusals.append(f"{type(e).__name__}: {e}")
        registered = len(socks)
        print(
            f"\nRLIMIT_NOFILE {base + 40} ({base} fds in use with 1 app): {registered} apps registered, "
            f"{len(refusals)} refused; first refusal: {refusals[0] if refusals else None!r}"
        )
        assert refusals and 2 <= registered <= 40
        assert any("out of file descriptors" in r and "fd limit" in r for r in refusals), refusals[
            :3
        ]
        # apps leave: new ones register again under the same limit
        for s in socks[1:]:
            s.close()
        del socks[1:]
        assert wait_apps(a, {"first"}) == ["first"]
        time.sleep(0.2)
        for i in range(3):
            socks.append(register(path, f"again{i}"))
        assert len(a.apps()) == 4
    finally:
        for s in socks:
            s.close()
        set_nofile(a, soft)
    assert "Traceback" not in a.log()


def test_an_app_that_does_not_read_its_replies_is_closed(cluster: Cluster) -> None:
    # its replies would block the loop: the daemon closes it and keeps serving the others
    a = cluster.daemon("a")
    path = str(a.prefix / "app.sock")
    good = register(path, "good")
    hog = register(path, "hog")
    hog.setblocking(False)
    sent = 0
    try:
        while sent < 10000:  # pings whose replies it never reads, until its socket buffer is full
            send_msg(hog, {"op": "ping"})
            sent += 1
    except (BlockingIOError, ConnectionError):
        pass  # full, or the daemon closed it already
    start = time.monotonic()
    for _ in range(50):
        reply, _ = request(good, {"op": "ping"})
        assert reply["ok"]
    took = time.monotonic() - start
    print(
        f"\nhog sent {sent} pings without reading; 50 pings of the good app took {took * 1e3:.0f} ms"
    )
    assert took < 5
    hog.setblocking(True)
    hog.settimeout(5)
    # the daemon closed the hog: its pending replies end in end of stream
    deadline = time.monotonic() + 10
    while "hog" in {x["name"] for x in a.apps()} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "hog" not in {x["name"] for x in a.apps()}
    assert "does not read its control socket" in a.log()
    hog.close()
    good.close()
