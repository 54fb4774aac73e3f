"""Two network namespaces joined by a veth pair, and daemons and apps run inside them.

``Netns.create()`` makes ``mrpcns-<n>-a`` and ``mrpcns-<n>-b`` with 10.77.<n>.1/24
and 10.77.<n>.2/24 on the two ends of a veth pair; ``close()`` kills what it
started (by pid) and deletes both namespaces (which deletes the veth pair).
Prefixes stay plain directories: an app reaches its daemon through the prefix
(the same filesystem), so only the daemons' TCP crosses from one namespace to
the other. Skips the test, with the reason, where ``ip netns`` is not allowed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import APPS, ROOT, App, Cluster, Daemon


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


class Netns:
    def __init__(self, n: int) -> None:
        self.n = n
        self.names = (f"mrpcns-{n}-a", f"mrpcns-{n}-b")
        self.addrs = (f"10.77.{n}.1", f"10.77.{n}.2")
        self.veths = (f"mrpcns{n}a", f"mrpcns{n}b")

    @classmethod
    def create(cls) -> Netns:
        """Two fresh namespaces and their veth pair; a number in use (another run's)
        is skipped, never taken over."""
        start = os.getpid() % 200
        for i in range(20):
            ns = cls(20 + (start + i) % 200)
            made = []
            for name in ns.names:
                r = _ip("netns", "add", name)
                if r.returncode != 0:
                    break
                made.append(name)
            if len(made) == 2:
                ns._link()
                return ns
            for name in made:
                _ip("netns", "del", name)
            if "exists" not in r.stderr:
                pytest.skip(f"cannot create network namespaces here: ip netns add: {r.stderr}")
        pytest.skip("no free mrpcns-* namespace number after 20 tries")

    def _link(self) -> None:
        va, vb = self.veths
        steps = [
            ("link", "add", va, "type", "veth", "peer", "name", vb),
            ("link", "set", va, "netns", self.names[0]),
            ("link", "set", vb, "netns", self.names[1]),
        ]
        for name, veth, addr in zip(self.names, self.veths, self.addrs, strict=True):
            steps += [
                ("-n", name, "addr", "add", f"{addr}/24", "dev", veth),
                ("-n", name, "link", "set", veth, "up"),
                ("-n", name, "link", "set", "lo", "up"),
            ]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                if step[0] == "link":
                    _ip("link", "del", va)  # still in this namespace (if it was made)
                self.close()
                pytest.skip(f"cannot set up a veth pair here: ip {' '.join(step)}: {r.stderr}")

    def close(self) -> None:
        for name in self.names:
            _ip("netns", "del", name)  # takes its end of the veth pair, and so the pair

    def daemon(self, cluster: Cluster, side: int, name: str, config: str) -> Daemon:
        """An mrpcd inside namespace ``side`` (0 = a, 1 = b), listening on its veth
        address; registered with ``cluster`` so it is stopped and its log checked."""
        prefix = cluster.base / name
        log = cluster.base / f"{name}.log"
        cfg = cluster.base / f"{name}.yaml"
        cfg.write_text(config)
        argv = [
            "ip", "netns", "exec", self.names[side],
            sys.executable, "-m", "mrpcd", "run", "--prefix", str(prefix),
            "--listen", f"{self.addrs[side]}:0", "--config", str(cfg),
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
        d = Daemon(prefix, proc, log)
        cluster.daemons.append(d)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"mrpcd exited with {proc.returncode}:\n{d.log()}")
            try:
                d.state = json.loads((prefix / "mrpcd.json").read_text())
            except (OSError, ValueError):
                d.state = {}
            if d.state.get("pid") == proc.pid:  # `ip netns exec` execs: the pid is mrpcd's
                return d
            time.sleep(0.02)
        raise AssertionError(f"mrpcd not ready after 20s:\n{d.log()}")

    def app(self, cluster: Cluster, side: int, script: str, *args: str, name: str) -> App:
        """An app process inside namespace ``side``; READY awaited."""
        argv = ["ip", "netns", "exec", self.names[side], sys.executable, str(APPS / script)]
        proc = subprocess.Popen(
            [*argv, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        app = App(proc, name)
        cluster.apps.append(app)
        app.wait_ready()
        return app


def netns_of(pid: int) -> str:
    """The network namespace of a process (to check a daemon really runs in one)."""
    return os.readlink(Path("/proc") / str(pid) / "ns" / "net")
