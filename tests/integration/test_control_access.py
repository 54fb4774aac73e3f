"""Who may do what over the control sockets: operators by their credentials,
service names by their owner (other Unix users are real users here)."""

from __future__ import annotations

import grp
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

import libmrpc
from libmrpc import StatusCode
from tests.integration.conftest import APPS, ROOT, App, Cluster, Daemon, User

testing = libmrpc.load_proto(ROOT / "schemas" / "testing.proto")

OPERATE = """
import json, os, sys
from libmrpc._control import open_control, recv_msg, request, send_msg
prefix, register_first = sys.argv[1], sys.argv[2] == "app"
if register_first:  # this process is an mrpc application first
    app = open_control(os.path.join(prefix, "app.sock"))
    _, fds = request(app, {"op": "register", "name": "probe"})
def status():
    with open_control(os.path.join(prefix, "ctl.sock")) as s:
        send_msg(s, {"op": "status"})
        reply, _ = recv_msg(s)
    return reply["code"] if not reply["ok"] else 0
out = [status()]
pid = os.fork()
if pid == 0:  # a child of the application
    print(json.dumps([status()]), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def ops_group(other_user: User, third_user: User) -> Iterator[tuple[str, int]]:
    """A fresh group; third_user is listed in it (/etc/group) but its processes below never hold it."""
    name = f"mrpcops{os.getpid() % 100000}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    try:
        subprocess.run(["usermod", "-aG", name, third_user.name], check=True, capture_output=True)
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], capture_output=True, check=False)


def run_as(
    user: User, argv: list[str], gid: int | None = None, groups: list[int] | None = None
) -> list[int]:
    r = subprocess.run(
        user.python + argv,
        user=user.uid,
        group=gid if gid is not None else user.gid,
        extra_groups=groups or [],
        env=user._env({}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return [code for line in r.stdout.split() for code in json.loads(line)]


def test_operators_are_authorized_by_the_credentials_they_hold(
    cluster: Cluster, other_user: User, third_user: User, ops_group: tuple[str, int]
) -> None:
    name, gid = ops_group
    a = cluster.daemon("a", config=f"operator_group: {name}\n")
    os.chmod(cluster.base, 0o755)
    os.chmod(
        a.prefix / "ctl.sock", 0o666
    )  # a loose socket mode: the daemon's own check must still hold
    probe = ["-c", OPERATE, str(a.prefix)]
    denied = int(StatusCode.PERMISSION_DENIED)
    # holding the group (supplementary or primary) is what counts, also for an app and its child
    assert run_as(other_user, [*probe, "app"], groups=[gid]) == [0, 0]
    assert run_as(other_user, [*probe, "-"], gid=gid) == [0, 0]
    # listed in /etc/group but not holding it, connecting first or from a child: refused
    assert run_as(third_user, [*probe, "-"]) == [denied, denied]
    assert run_as(third_user, [*probe, "app"]) == [denied, denied]
    assert run_as(other_user, [*probe, "app"]) == [denied, denied]
    r = other_user.run(other_user.python + ["-m", "mrpcd.ctl", "--prefix", str(a.prefix), "status"])
    assert (
        r.returncode != 0 and "PERMISSION_DENIED" in r.stderr and f"group {name!r}" in r.stderr
    ), r.stderr
    # root and the daemon's own user may operate even while this process is an application
    libmrpc.connect("127.0.0.1:1", prefix=a.prefix, name="root-app")
    assert a.ctl("status")["apps"] == 1


def server_as(cluster: Cluster, user: User, d: Daemon, name: str, wait: bool = True) -> App:
    proc = user.popen(
        user.python + [str(APPS / "server_app.py"), str(d.prefix), "--name", name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    app = App(proc, name)
    cluster.apps.append(app)
    if wait:
        app.wait_ready()
    return app


def refused(app: App) -> str:
    _, err = app.proc.communicate(timeout=60)
    assert app.proc.returncode != 0, "the server was allowed to serve"
    return err


def test_first_user_to_serve_a_name_cannot_hijack_it_from_the_daemons_user(
    cluster: Cluster, other_user: User, third_user: User
) -> None:
    a, b = cluster.daemon("a"), cluster.daemon("b")
    os.chmod(cluster.base, 0o755)
    eve = server_as(cluster, other_user, b, "eve")  # first to claim mrpctest.Test on root's daemon
    cluster.server(b, name="real")  # root's real server takes the service over
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="client"))
    for _ in range(5):
        assert stub.Call(testing.Request(payload=b"secret"), timeout=10).served_by == "real"
    (svc,) = b.ctl("services")["services"]
    assert (
        svc["service"] == "mrpctest.Test"
        and svc["owner_uid"] == 0
        and svc["served_by"]["app"] == "real"
    )
    listing = {x["name"]: x for x in b.apps()}
    assert listing["real"]["serves"] == ["mrpctest.Test"] and listing["eve"]["serves"] == []
    assert listing["eve"]["uid"] == other_user.uid
    assert "took service mrpctest.Test over from app 'eve'" in b.log()
    eve.stop()
    # the name stays root's: another user (or eve again) is refused, naming owner and config key
    err = refused(server_as(cluster, third_user, b, "mallory", wait=False))
    assert "PERMISSION_DENIED" in err and "mrpctest.Test" in err and "uid 0 owns that name" in err
    assert "`services`" in err
    assert stub.Call(testing.Request(payload=b"x"), timeout=10).served_by == "real"


def test_an_unprivileged_user_owns_the_name_it_served_first(
    cluster: Cluster, other_user: User, third_user: User
) -> None:
    b = cluster.daemon("b")
    os.chmod(cluster.base, 0o755)
    server_as(cluster, other_user, b, "eve").stop()  # eve served it first, then left
    err = refused(server_as(cluster, third_user, b, "mallory", wait=False))
    assert f"uid {other_user.uid} owns that name" in err
    server_as(cluster, other_user, b, "eve2")  # eve herself may serve it again
    assert {s["service"]: s["owner_uid"] for s in b.ctl("services")["services"]} == {
        "mrpctest.Test": other_user.uid
    }


def test_a_services_rule_refuses_other_users_up_front(cluster: Cluster, other_user: User) -> None:
    a = cluster.daemon("a")
    b = cluster.daemon("b", config="services:\n  - {name: 'mrpctest.*', uids: [root]}\n")
    os.chmod(cluster.base, 0o755)
    err = refused(server_as(cluster, other_user, b, "eve", wait=False))
    assert "PERMISSION_DENIED" in err and "services[0]" in err and "mrpctest.Test" in err
    cluster.server(b, name="real")
    stub = testing.TestStub(libmrpc.connect(b.listen, prefix=a.prefix, name="client"))
    assert stub.Call(testing.Request(payload=b"x"), timeout=10).served_by == "real"
    text = subprocess.run(
        [sys.executable, "-m", "mrpcd.ctl", "--prefix", str(b.prefix), "services"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "mrpctest.Test: owner uid 0 (app real" in text and "rule services[0]" in text
