"""The app and operator control sockets under hostile or unlucky clients:
apps that hang up mid-registration, too many apps, thread exhaustion, deep JSON."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import libmrpc
from libmrpc import StatusCode
from libmrpc._control import ControlError, open_control, recv_msg, request, send_msg
from tests.integration.conftest import ROOT, Cluster, Daemon

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")

HIT_AND_RUN = """
import socket, sys, time
from libmrpc._control import send_msg
path, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    while True:
        try:
            s.connect(path)
            break
        except BlockingIOError:  # the backlog is full: the daemon is behind
            time.sleep(0.001)
    send_msg(s, {"op": "register", "name": f"zombie{i}"})
    s.close()  # before the reply: the daemon's send fails with EPIPE
print("done", flush=True)
"""


NO_RATE = "apps:\n  register_rate: 1000000\n  register_burst: 1000000\n"

FLOOD = """
import sys
from libmrpc._control import ControlError, open_control, request
path, n = sys.argv[1], int(sys.argv[2])
ok = refused = 0
detail = ""
for i in range(n):
    with open_control(path) as s:
        try:
            request(s, {"op": "register", "name": f"flood{i}"})
            ok += 1
        except ControlError as e:
            refused += 1
            detail = e.details()
print(ok, refused, detail, flush=True)
"""


def resources(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "maps": len(Path(f"/proc/{pid}/maps").read_text().splitlines()),
    }


def rate(stub: object, seconds: float) -> tuple[float, int]:
    """Calls per second of a sync caller for ``seconds``, and how many failed."""
    req = testing.Request(payload=b"x" * 32)
    n = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            stub.Call(req, timeout=5)  # type: ignore[attr-defined]
        except libmrpc.RpcError:
            errors += 1
        n += 1
    return n / seconds, errors


def wait_apps(d: Daemon, names: set[str], timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        now = sorted(a["name"] for a in d.apps())
        if set(now) == names or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


@pytest.mark.parametrize("n", [600, pytest.param(3000, marks=pytest.mark.slow)])
def test_apps_that_hang_up_before_the_register_reply_leave_nothing(
    cluster: Cluster, n: int
) -> None:
    # no registration rate limit here: every hit-and-run registration must be undone
    a, b = cluster.daemon("a", config=NO_RATE), cluster.daemon("b")
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="good"))
    rate(stub, 0.3)  # warm up
    before = resources(a.pid)
    rate_before, _ = rate(stub, 1.0)
    attack = subprocess.Popen(
        [sys.executable, "-c", HIT_AND_RUN, str(a.prefix / "app.sock"), str(n)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    rate_during, errors_during = rate(stub, 1.5)
    assert attack.communicate(timeout=120)[0].strip() == "done"
    deadline = time.monotonic() + 20
    while resources(a.pid)["fds"] > before["fds"] + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    after = resources(a.pid)
    rate_after, errors_after = rate(stub, 1.0)
    print(
        f"\n{n} hit-and-run registrations: daemon before {before}, after {after}; well-behaved "
        f"client {rate_before:.0f} RPC/s before, {rate_during:.0f} during ({errors_during} errors), "
        f"{rate_after:.0f} after ({errors_after} errors)"
    )
    left = wait_apps(a, {"good"})
    assert left == ["good"], f"{len(left) - 1} zombie apps left registered"
    assert errors_during == errors_after == 0
    assert after["fds"] <= before["fds"] + 5 and after["threads"] <= before["threads"] + 2
    assert (
        after["maps"] <= before["maps"] + 100
    )  # thread stacks/malloc arenas; each zombie kept 3 maps
    assert after["rss_kib"] <= before["rss_kib"] + 32 * 1024
    assert rate_after >= 0.5 * rate_before
    assert "Traceback" not in a.log()


def test_a_registration_flood_is_rate_limited_per_user(cluster: Cluster) -> None:
    a, b = (
        cluster.daemon("a", config="apps:\n  register_rate: 20\n  register_burst: 40\n"),
        cluster.daemon("b"),
    )
    cluster.server(b)
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="good"))
    rate(stub, 0.3)  # warm up
    rate_before, _ = rate(stub, 1.0)
    attack = subprocess.Popen(
        [sys.executable, "-c", FLOOD, str(a.prefix / "app.sock"), "1000"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    rate_during, errors_during = rate(stub, 1.5)
    ok, refused, detail = attack.communicate(timeout=120)[0].strip().split(" ", 2)
    print(
        f"\nregistration flood of 1000: {ok} registered, {refused} refused; well-behaved client "
        f"{rate_before:.0f} RPC/s before, {rate_during:.0f} during ({errors_during} errors)"
    )
    assert int(ok) + int(refused) == 1000
    assert 40 <= int(ok) < 500, "the burst is admitted, then at most register_rate per second"
    assert "apps.register_rate" in detail and "uid 0" in detail
    assert errors_during == 0


def test_too_many_apps_are_resource_exhausted_naming_the_limit(cluster: Cluster) -> None:
    a = cluster.daemon("a", config="apps:\n  max: 3\n  max_per_uid: 2\n")
    path = str(a.prefix / "app.sock")
    socks = []
    for i in range(2):
        s = open_control(path)
        _, fds = request(s, {"op": "register", "name": f"app{i}"})
        for fd in fds:
            os.close(fd)
        socks.append(s)
    with open_control(path) as s, pytest.raises(ControlError) as info:
        request(s, {"op": "register", "name": "one-too-many"})
    assert info.value.code() == StatusCode.RESOURCE_EXHAUSTED
    assert "uid 0" in info.value.details() and "apps.max_per_uid = 2" in info.value.details()
    socks.pop().close()  # one leaves: room again
    assert wait_apps(a, {"app0"}) == ["app0"]
    with open_control(path) as s:
        _reply, fds = request(s, {"op": "register", "name": "again"})
        for fd in fds:
            os.close(fd)
    for s in socks:
        s.close()


def test_connection_that_never_registers_is_closed(cluster: Cluster) -> None:
    a = cluster.daemon("a", config="apps:\n  register_timeout: 0.5\n")
    with open_control(str(a.prefix / "app.sock")) as s:
        s.settimeout(10)
        msg, _ = recv_msg(s)  # end of stream: the daemon hung up on the idle connection
    assert msg is None
    assert "did not register within 0.5s" in a.log()


def deep(n: int) -> bytes:
    return b'{"op":"ping","x":' + b"[" * n + b"]" * n + b"}"


@pytest.mark.parametrize("which", ["app.sock", "ctl.sock"])
def test_deeply_nested_json_is_invalid_argument_and_the_connection_lives(
    cluster: Cluster, which: str
) -> None:
    a = cluster.daemon("a")
    with open_control(str(a.prefix / which)) as s:
        for n in (33, 100_000):
            s.sendall(deep(n))
            reply, _ = recv_msg(s)
            assert reply is not None and not reply["ok"], reply
            assert (
                reply["code"] == StatusCode.INVALID_ARGUMENT and "deeper than 32" in reply["error"]
            )
        send_msg(
            s, {"op": "ping" if which == "app.sock" else "status", "x": [[[[1]]]], "s": "[" * 1000}
        )
        reply, _ = recv_msg(s)
    # still served: the app socket says "register first", the operator socket answers
    assert reply is not None
    assert reply["ok"] if which == "ctl.sock" else reply["code"] == StatusCode.FAILED_PRECONDITION
    assert "Traceback" not in a.log() and "RecursionError" not in a.log()


# --------------------------------------------------------------------------- thread exhaustion

PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


def _pids_cgroup(name: str) -> Path:
    if not (PIDS_CGROUP / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids controller at /sys/fs/cgroup/pids")
    if os.geteuid() != 0:
        pytest.skip("a pids cgroup needs root")
    cg = PIDS_CGROUP / name
    cg.mkdir(exist_ok=True)
    return cg


def test_a_pids_limit_does_not_matter_for_registrations(cluster: Cluster) -> None:
    # one control loop serves every app: registering starts no thread, so a daemon
    # with no room for a single new thread still takes 60 apps
    a = cluster.daemon("a")
    cg = _pids_cgroup(f"mrpc-test-{os.getpid()}")
    socks = []
    try:
        (cg / "cgroup.procs").write_text(str(a.pid))
        threads = resources(a.pid)["threads"]
        (cg / "pids.max").write_text(str(threads))  # no room for another thread
        for i in range(60):
            s = open_control(str(a.prefix / "app.sock"), timeout=5)
            reply, fds = request(s, {"op": "register", "name": f"app{i}"})
            for fd in fds:
                os.close(fd)
            socks.append(s)
            assert reply["ok"]
        after = resources(a.pid)["threads"]
        events = (
            int((cg / "pids.events").read_text().split()[1])
            if (cg / "pids.events").exists()
            else -1
        )
        print(
            f"\npids.max {threads}: 60 of 60 apps registered; daemon threads {threads} before, {after} "
            f"after; pids.events max={events}"
        )
        assert after == threads
        # the operator socket keeps a thread per connection: it is refused cleanly, once logged
        with open_control(str(a.prefix / "ctl.sock"), timeout=5) as s:
            refusal, _ = recv_msg(s)  # told before it could ask anything
        assert refusal is not None and refusal["code"] == StatusCode.RESOURCE_EXHAUSTED, refusal
        assert "cannot take another operator connection" in refusal["error"]
        (cg / "pids.max").write_text("max")
        assert len(a.apps()) == 60
        assert a.log().count("cannot start its thread") == 1
    finally:
        for s in socks:
            s.close()
        if a.proc.poll() is None:
            (PIDS_CGROUP / "cgroup.procs").write_text(str(a.pid))
        cg.rmdir()


def test_accept_loop_survives_running_out_of_fds(cluster: Cluster) -> None:
    a = cluster.daemon("a")
    base = resources(a.pid)["fds"]
    soft = Path(f"/proc/{a.pid}/limits").read_text().split("Max open files")[1].split()[0]
    subprocess.run(["prlimit", f"--pid={a.pid}", f"--nofile={base + 3}:"], check=True)
    conns, replies = [], []
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(str(a.prefix / "app.sock"))
            conns.append(s)
        for s in conns:
            s.settimeout(0.5)
            try:
                reply, _ = recv_msg(s)
            except (TimeoutError, ConnectionResetError):
                continue
            replies.append(reply)
    finally:
        for s in conns:
            s.close()
    print(
        f"\nRLIMIT_NOFILE {base + 3}: {sum(1 for r in replies if r)} of 20 connections told "
        f"RESOURCE_EXHAUSTED"
    )
    assert any(r and r["code"] == StatusCode.RESOURCE_EXHAUSTED for r in replies)
    subprocess.run(["prlimit", f"--pid={a.pid}", f"--nofile={soft}:"], check=True)
    time.sleep(0.3)
    with open_control(str(a.prefix / "app.sock"), timeout=5) as s:
        reply, fds = request(s, {"op": "register", "name": "after"})
        for fd in fds:
            os.close(fd)
    assert reply["ok"]
